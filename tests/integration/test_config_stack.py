"""The stack's config part, through clients no one here wrote: grpcurl, curl, and the CLI.

Against the running stack (``tagbus up`` starts the config part): each test posts a change
for a tenant of its own through the bus and waits, with a deadline, until the outside client
shows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernel.auth import issue_dev_token
from tagbus import install, settings, stack
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
TAGBUS = ROOT / ".venv" / "bin" / "tagbus"
SERVICE = "tagbus.config.v1.ConfigService"
DEADLINE = 60.0


@pytest.fixture(scope="module")
def cfg() -> stack.StackConfig:
    return stack.StackConfig.from_env(root=ROOT)


@pytest.fixture(scope="module")
def env(cfg: stack.StackConfig) -> dict[str, str]:
    """The environment of the stack's processes, for the clients run here."""
    return {**os.environ, **stack.stack_env(cfg)}


@pytest.fixture(scope="module")
def config_part(cfg: stack.StackConfig) -> stack.PartStatus:
    """The running config part (started, with what it depends on, when it is not)."""
    from tagbus import lifecycle

    statuses = lifecycle.up(cfg)
    assert statuses["config"].running, f"config part not running; log {statuses['config'].log}"
    return statuses["config"]


@pytest.fixture(scope="module")
def grpcurl() -> str:
    return str(install.install_grpcurl(ROOT))


@pytest.fixture
def tenant() -> str:
    return f"cfgstack-{uuid.uuid4().hex[:10]}"


def token(env: Mapping[str, str], tenant: str, scope: str = "events:write config:read") -> str:
    s = settings.load(env, home=ROOT / ".tagbus")
    assert s.auth.jwt_secret
    return issue_dev_token(
        s.auth.jwt_secret,
        tenant=tenant,
        tier="enterprise",
        scope=scope,
        issuer=s.auth.issuer,
        audience=s.auth.audience,
        now=time.time(),
    )


def post_change(cfg: stack.StackConfig, env: Mapping[str, str], tenant: str, key: str, value: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/tests/config-stack",
        "type": "config.set",
        "data": {"key": key, "value": value},
    }
    response = httpx.post(
        f"http://127.0.0.1:{cfg.http_port}/v1/events",
        json=event,
        headers={"Authorization": f"Bearer {token(env, tenant)}"},
        timeout=10.0,
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


class Lines:
    """A child process whose output lines are read in a thread, so a test can wait with a deadline."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, found: Callable[[str], bool], *, timeout: float = DEADLINE) -> str:
        """The first line (from here on) for which ``found`` is true; fails at the deadline or EOF."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"{self.process.args!r} ended first; output: {self.seen[-20:]}; stderr: {self.stderr()}")
            self.seen.append(line)
            if found(line):
                return line
        pytest.fail(f"not seen within {timeout:.0f}s; output so far: {self.seen[-20:]}")

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def running(argv: list[str], env: Mapping[str, str]) -> Iterator[Lines]:
    lines = Lines(argv, env)
    try:
        yield lines
    finally:
        lines.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the part itself -----------------------------------------------------------------------


def test_config_ports_move_with_the_environment(tmp_path: Path) -> None:
    moved = {"TAGBUS_GRPC_PORT": "50061", "TAGBUS_CONFIG_HTTP_PORT": "8091"}
    local = stack.StackConfig.from_env(moved, root=tmp_path)
    env = stack.stack_env(local)
    assert (env["TAGBUS_GRPC_PORT"], env["TAGBUS_CONFIG_HTTP_PORT"]) == ("50061", "8091")
    spec = stack.part_specs(local)["config"]
    assert spec.ports == (50061, 8091)
    assert spec.argv[-3:] == ("-m", "tagbus", "config-server")
    assert stack.APP_PARTS.index("config") > stack.APP_PARTS.index("consumer")  # `up` starts it after
    server = settings.load({**env, "TAGBUS_CONFIG_HISTORY_SIZE": "5000"}, home=tmp_path).config_server()
    assert (server.grpc_port, server.http_port, server.history_size) == (50061, 8091, 5000)
    with pytest.raises(stack.StackError, match="TAGBUS_GRPC_PORT"):
        stack.StackConfig.from_env({"TAGBUS_GRPC_PORT": "grpc"}, root=tmp_path)
    with pytest.raises(settings.SettingsError, match="TAGBUS_CONFIG_UPSTREAM"):
        settings.load({"TAGBUS_CONFIG_UPSTREAM": "no-port"}, home=tmp_path)
    with pytest.raises(settings.SettingsError, match="TAGBUS_CONFIG_PROGRESS_INTERVAL_SECONDS"):
        settings.load({"TAGBUS_CONFIG_PROGRESS_INTERVAL_SECONDS": "soon"}, home=tmp_path).config_server()


def test_status_shows_the_config_part(config_part: stack.PartStatus, cfg: stack.StackConfig) -> None:
    result = subprocess.run([str(TAGBUS), "status"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("config "))
    assert line.split()[1:3] == ["running", str(config_part.pid)]
    assert cfg.pid_file("config").read_text().strip() == str(config_part.pid)
    assert "config server" in result.stdout  # its position and lag, from its /metrics


# -- grpcurl, through reflection -----------------------------------------------------------


def test_grpcurl_lists_the_services_through_reflection(
    config_part: stack.PartStatus, grpcurl: str, cfg: stack.StackConfig
) -> None:
    result = subprocess.run(
        [grpcurl, "-plaintext", f"127.0.0.1:{cfg.grpc_port}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    described = subprocess.run(
        [grpcurl, "-plaintext", f"127.0.0.1:{cfg.grpc_port}", "describe", SERVICE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert described.returncode == 0, described.stderr
    assert "rpc Watch" in described.stdout


def test_grpcurl_watches_and_lists_a_change_posted_through_the_bus(
    config_part: stack.PartStatus, grpcurl: str, cfg: stack.StackConfig, env: dict[str, str], tenant: str
) -> None:
    header = f"authorization: Bearer {token(env, tenant, scope='config:read')}"
    target = f"127.0.0.1:{cfg.grpc_port}"
    watch = [grpcurl, "-plaintext", "-format-error", "-H", header, "-d", '{"prefixes": ["tenantconfig:grpcurl/"]}']
    with running([*watch, target, f"{SERVICE}/Watch"], env) as stream:
        stream.wait_for(lambda line: '"done": true' in line)  # the (empty) snapshot ended
        posted = post_change(cfg, env, tenant, "tenantconfig:grpcurl/flag", {"on": True})
        stream.wait_for(lambda line: '"key": "tenantconfig:grpcurl/flag"' in line)
        change = stream.wait_for(lambda line: '"version"' in line)
        assert f'"{posted["version"]}"' in change  # uint64 is a JSON string in protobuf's JSON

    listed = subprocess.run(
        [grpcurl, "-plaintext", "-H", header, "-d", '{"prefix": "tenantconfig:grpcurl/"}', target, f"{SERVICE}/List"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert [(e["key"], json.loads(e["value_json"]), e["tenant"]) for e in entries] == [
        ("tenantconfig:grpcurl/flag", {"on": True}, tenant)
    ]


def test_grpcurl_without_a_token_is_unauthenticated(
    config_part: stack.PartStatus, grpcurl: str, cfg: stack.StackConfig
) -> None:
    result = subprocess.run(
        [grpcurl, "-plaintext", "-d", '{"prefix": "tenantconfig:"}', f"127.0.0.1:{cfg.grpc_port}", f"{SERVICE}/List"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr


# -- curl on the Server-Sent Events URL ------------------------------------------------------


def test_curl_on_the_sse_url_sees_a_change_posted_through_the_bus(
    config_part: stack.PartStatus, cfg: stack.StackConfig, env: dict[str, str], tenant: str
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = f"http://127.0.0.1:{cfg.config_http_port}/v1/config:watch?prefix=tenantconfig:sse/"
    header = f"Authorization: Bearer {token(env, tenant, scope='config:read')}"
    with running([curl, "-sS", "-N", "-H", header, url], env) as stream:
        stream.wait_for(lambda line: line.startswith("event:") or line.startswith("id:"))  # the stream is open
        posted = post_change(cfg, env, tenant, "tenantconfig:sse/limit", 42)
        data = stream.wait_for(lambda line: line.startswith("data:") and "tenantconfig:sse/limit" in line)
    change = json.loads(data.removeprefix("data:"))
    assert change["key"] == "tenantconfig:sse/limit"
    assert change["value"] == 42
    assert int(change["version"]) == posted["version"]


# -- tagbus config watch ---------------------------------------------------------------------


def test_tagbus_config_watch_prints_a_change_as_it_arrives(
    config_part: stack.PartStatus, cfg: stack.StackConfig, env: dict[str, str], tenant: str
) -> None:
    argv = [str(TAGBUS), "config", "watch", "--tenant", tenant, "--prefix", "paramconfig:watch/", "--json"]
    with running(argv, env) as stream:
        stream.wait_for(lambda line: '"ready"' in line)
        posted = post_change(cfg, env, tenant, "paramconfig:watch/pool-size", 12)
        line = stream.wait_for(lambda line: "paramconfig:watch/pool-size" in line)
        change = json.loads(line)
        assert change["key"] == "paramconfig:watch/pool-size"
        assert change["value"] == 12
        assert change["version"] == posted["version"]
        assert change["position"] > 0
        assert change["delay_ms"] >= 0
        stream.process.send_signal(2)  # Ctrl-C
        assert stream.process.wait(timeout=15) == 0


def test_tagbus_config_watch_fails_in_one_line_on_a_bad_token(
    config_part: stack.PartStatus, env: dict[str, str]
) -> None:
    wrong = {**env, "TAGBUS_JWT_SECRET": "not-the-stack-secret-" + "x" * 32}
    result = subprocess.run(
        [str(TAGBUS), "config", "watch", "--tenant", "acme", "--prefix", "tenantconfig:"],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "UNAUTHENTICATED" in result.stderr


def test_tagbus_config_watch_fails_in_one_line_when_no_server_answers(env: dict[str, str]) -> None:
    nowhere = {**env, "TAGBUS_GRPC_PORT": str(free_port())}
    result = subprocess.run(
        [str(TAGBUS), "config", "watch", "--tenant", "acme", "--prefix", "tenantconfig:", "--connect-timeout", "3"],
        env=nowhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "unreachable" in result.stderr


# -- a server chained to the stack's ---------------------------------------------------------


def test_a_server_chained_to_the_stack_part_serves_what_is_posted(
    config_part: stack.PartStatus, cfg: stack.StackConfig, env: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    grpc_port, http_port = free_port(), free_port()
    chained = {
        **env,
        "TAGBUS_GRPC_PORT": str(grpc_port),
        "TAGBUS_CONFIG_HTTP_PORT": str(http_port),
        "TAGBUS_CONFIG_UPSTREAM": f"127.0.0.1:{cfg.grpc_port}",
    }
    log = tmp_path / "chained.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(TAGBUS), "config-server"], env=chained, stdout=out, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            if _ready(f"http://127.0.0.1:{http_port}/readyz"):
                return True
            assert server.poll() is None, log.read_text()
            return False

        wait_for(
            ready, "the chained server to be ready", DEADLINE, interval=0.2, explain=lambda: log.read_text()[-2000:]
        )
        posted = post_change(cfg, env, tenant, "tenantconfig:chained/mode", "replica")
        argv = [str(TAGBUS), "config", "watch", "--tenant", tenant, "--prefix", "tenantconfig:chained/", "--since", "0"]
        with running([*argv, "--json"], chained) as stream:
            line = stream.wait_for(lambda line: "tenantconfig:chained/mode" in line)
        change = json.loads(line)
        assert (change["value"], change["version"]) == ("replica", posted["version"])
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0, log.read_text()[-2000:]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False
