"""Local stack manager: starts, checks and stops the background parts of the embedded stack.

Each part is one detached process with a pid file ``.tagbus/run/<part>.pid`` and a log
``.tagbus/logs/<part>.log``. ``up`` starts only parts whose pid file does not name a live
process of that part (a stale pid file is replaced), waits until each answers a real
request, and fails with the part's name and log file when it does not. ``down`` signals
only processes named by our pid files, after checking that the pid still runs the
command we started (pids get reused).

Parts, in start order:

=========  ==========================================================  ===============
part       process                                                     answers on
=========  ==========================================================  ===============
postgres   Debian's ``postgres`` on ``.tagbus/pg`` (as user postgres)  127.0.0.1:55432
kinesis    kinesis-mock ``node main.js`` (npm kinesis-local)           4568 h1+h2c, 4567 TLS
dynamodb   DynamoDB Local (Java), ``-sharedDb`` in .tagbus/dynamodb-data  8000
moto       ``moto_server`` (SSM Parameter Store, CloudWatch)           5000
bus        ``python -m tagbus bus``                                    8080 /healthz
tailer     ``python -m tagbus tailer``                                 (alive)
consumer   ``python -m tagbus consumer``                               (alive)
config     ``python -m tagbus config-server``                          50051 gRPC health, 8081
=========  ==========================================================  ===============
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from consumers.daemon import APPLICATION_NAME as CONSUMER_APPLICATION
from consumers.daemon import daemon_processes
from consumers.daemon import worker_id as consumer_worker_id
from tagbus import install, stack_lock

__all__ = [
    "ALL_PARTS",
    "APP_PARTS",
    "INFRA_PARTS",
    "PartSpec",
    "PartStartError",
    "PartStatus",
    "StackConfig",
    "StackError",
    "down",
    "format_status",
    "part_specs",
    "spawn_detached",
    "stack_env",
    "status",
    "stop_part",
    "up",
    "wait_healthy",
    "write_env_file",
]

INFRA_PARTS: tuple[str, ...] = ("postgres", "kinesis", "dynamodb", "moto")
APP_PARTS: tuple[str, ...] = ("bus", "tailer", "consumer", "config", "keeper")
ALL_PARTS: tuple[str, ...] = INFRA_PARTS + APP_PARTS

_POSTGRES_USER = "postgres"
_DB_USER = "tagbus"
_DB_PASSWORD = "tagbus"
_DB_NAME = "tagbus"
_DYNAMODB_LOCAL_MAIN = "software.amazon.dynamodb.services.local.main.ServerRunner"


class StackError(RuntimeError):
    """A stack operation failed; the message is one line meant for the user."""


class PartStartError(StackError):
    """A part did not become healthy; carries the part's name and its log file."""

    def __init__(self, part: str, log: Path, reason: str) -> None:
        super().__init__(f"{part}: {reason} (log: {log})")
        self.part = part
        self.log = log
        self.reason = reason


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which ports and names it uses."""

    root: Path = field(default_factory=Path.cwd)
    postgres_port: int = 55432
    kinesis_port: int = 4568
    kinesis_tls_port: int = 4567
    dynamodb_port: int = 8000
    moto_port: int = 5000
    http_port: int = 8080
    grpc_port: int = 50051
    config_http_port: int = 8081
    stream_name: str = "tagbus-events"
    stream_shards: int = 1
    region: str = "us-east-1"
    python: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, root: Path | None = None) -> StackConfig:
        """The default layout, with ports overridable (``TAGBUS_PG_PORT``, ``TAGBUS_KINESIS_PORT``,
        ``TAGBUS_KINESIS_TLS_PORT``, ``TAGBUS_DYNAMODB_PORT``, ``TAGBUS_MOTO_PORT``, ``TAGBUS_HTTP_PORT``,
        ``TAGBUS_GRPC_PORT``, ``TAGBUS_CONFIG_HTTP_PORT``) so that two checkouts can run their stacks side by side."""
        env = os.environ if environ is None else environ
        names = {
            "postgres_port": "TAGBUS_PG_PORT",
            "kinesis_port": "TAGBUS_KINESIS_PORT",
            "kinesis_tls_port": "TAGBUS_KINESIS_TLS_PORT",
            "dynamodb_port": "TAGBUS_DYNAMODB_PORT",
            "moto_port": "TAGBUS_MOTO_PORT",
            "http_port": "TAGBUS_HTTP_PORT",
            "grpc_port": "TAGBUS_GRPC_PORT",
            "config_http_port": "TAGBUS_CONFIG_HTTP_PORT",
        }
        ports: dict[str, int] = {}
        for field_name, var in names.items():
            value = env.get(var)
            if value:
                if not value.isdigit() or not 0 < int(value) < 65536:
                    raise StackError(f"{var} must be a port number, not {value!r}")
                ports[field_name] = int(value)
        if root is not None:
            return cls(root=root, **ports)  # type: ignore[arg-type]
        return cls(**ports)  # type: ignore[arg-type]

    @property
    def state(self) -> Path:
        return install.state_dir(self.root)

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    @property
    def venv_python(self) -> Path:
        if self.python is not None:
            return self.python
        candidate = self.root.resolve() / ".venv" / "bin" / "python"
        return candidate if candidate.is_file() else Path(sys.executable)

    @property
    def database_url(self) -> str:
        return f"postgresql://{_DB_USER}:{_DB_PASSWORD}@127.0.0.1:{self.postgres_port}/{_DB_NAME}"

    def pid_file(self, part: str) -> Path:
        return self.run_dir / f"{part}.pid"

    def log_file(self, part: str) -> Path:
        return self.log_dir / f"{part}.log"


@dataclass(frozen=True)
class PartSpec:
    """How to start one part and how to tell that it works.

    ``ports`` must be free before the start: a health check would otherwise pass against
    whatever else answers there. ``marker`` is a substring of ``/proc/<pid>/cmdline`` that identifies the process, so a
    reused pid is never taken for ours. ``health`` raises until the part answers.
    ``prepare`` runs before the first start (installs, initdb); ``after_start`` once the
    part is healthy (bootstrap of roles and databases).
    """

    name: str
    argv: tuple[str, ...]
    cwd: Path
    marker: str
    health: Callable[[], object]
    ports: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    env_factory: Callable[[], Mapping[str, str]] | None = None
    inherit_env: bool = True
    timeout: float = 60.0
    min_alive: float = 0.0
    stop_signal: signal.Signals = signal.SIGTERM
    #: Seconds to wait after the stop signal before SIGKILL, when longer than ``down``'s.
    stop_timeout: float = 0.0
    signal_group: bool = True
    user: str | None = None
    prepare: Callable[[], None] | None = None
    after_start: Callable[[], None] | None = None
    #: What to tell the operator when the part is not healthy in time (``None``: nothing to add).
    slow_start_hint: Callable[[], str | None] | None = None
    #: Called when the part is found dead without having been stopped (its pid file left
    #: behind), or had to be killed: it may have lost what it had not saved.
    on_crash: Callable[[], None] | None = None
    #: Processes of this part that its pid no longer leads (e.g. a KCL daemon an older run
    #: left behind when its consumer was killed): ``stop_part`` ends them, ``up`` before a start.
    strays: Callable[[], Sequence[int]] | None = None


@dataclass(frozen=True)
class PartStatus:
    """Whether a part runs, under which pid, and where its log is."""

    name: str
    running: bool
    pid: int | None
    log: Path


# -- environment -------------------------------------------------------------------------


def stack_env(config: StackConfig | None = None) -> dict[str, str]:
    """The environment the app processes run with (also written to ``.tagbus/env``)."""
    cfg = config or StackConfig.from_env()
    kinesis = f"http://127.0.0.1:{cfg.kinesis_port}"
    dynamodb = f"http://127.0.0.1:{cfg.dynamodb_port}"
    moto = f"http://127.0.0.1:{cfg.moto_port}"
    return {
        "TAGBUS_DATABASE_URL": cfg.database_url,
        "TAGBUS_STREAM_NAME": cfg.stream_name,
        "TAGBUS_HTTP_PORT": str(cfg.http_port),
        "TAGBUS_GRPC_PORT": str(cfg.grpc_port),
        "TAGBUS_CONFIG_HTTP_PORT": str(cfg.config_http_port),
        "TAGBUS_JWT_SECRET": _jwt_secret(cfg),
        # kinesis-mock's cost grows with every record it holds (docs/local-stack.md): the local
        # tailer packs events into KPL records (the KCL de-aggregates) unless told otherwise.
        "TAGBUS_TAILER_AGGREGATE": os.environ.get("TAGBUS_TAILER_AGGREGATE", "1"),
        # When the local pipeline falls behind the bus, the bus sheds ingest by tier long before
        # the slot's WAL nears max_slot_wal_keep_size (``event_bus.backpressure``); 0 turns it off.
        "TAGBUS_BACKPRESSURE_LAG_BYTES": os.environ.get("TAGBUS_BACKPRESSURE_LAG_BYTES", str(256 * 1_048_576)),
        "TAGBUS_BACKPRESSURE_FRESHNESS_SECONDS": os.environ.get("TAGBUS_BACKPRESSURE_FRESHNESS_SECONDS", "60"),
        "AWS_ENDPOINT_URL_KINESIS": kinesis,
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb,
        "AWS_ENDPOINT_URL_SSM": moto,
        "AWS_ENDPOINT_URL_CLOUDWATCH": moto,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": cfg.region,
        "AWS_REGION": cfg.region,
    }


def write_env_file(config: StackConfig | None = None) -> Path:
    """Write ``.tagbus/env``: ``export`` lines to ``source`` in a shell."""
    cfg = config or StackConfig.from_env()
    cfg.state.mkdir(parents=True, exist_ok=True)
    path = cfg.state / "env"
    lines = [f"export {key}={shlex.quote(value)}" for key, value in stack_env(cfg).items()]
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# generated by tagbus.stack; source it: . .tagbus/env\n")
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _jwt_secret(cfg: StackConfig) -> str:
    """A random HS256 secret, generated once and kept in ``.tagbus/jwt-secret`` (0600)."""
    path = cfg.state / "jwt-secret"
    if not path.is_file():
        cfg.state.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


# -- the parts ---------------------------------------------------------------------------


def part_specs(config: StackConfig | None = None) -> dict[str, PartSpec]:
    """Every part's spec, in start order."""
    cfg = config or StackConfig.from_env()
    specs = [
        _postgres_spec(cfg),
        _kinesis_spec(cfg),
        _dynamodb_spec(cfg),
        _moto_spec(cfg),
        _app_spec(
            cfg, "bus", health=lambda: _http_ok(f"http://127.0.0.1:{cfg.http_port}/healthz"), ports=(cfg.http_port,)
        ),
        _app_spec(cfg, "tailer"),
        # The consumer forwards SIGTERM to its KCL daemon, which lets each record processor
        # checkpoint and hands its leases back; signalling the whole group would kill the
        # processors before they are asked to shut down.
        _app_spec(
            cfg,
            "consumer",
            health=lambda: _consumer_ok(cfg),
            prepare=lambda: _prepare_consumer(cfg),
            signal_group=False,
            timeout=120.0,
            strays=lambda: daemon_processes(cfg.state / "kcl-run"),
        ),
        # Healthy once it has caught up with the stream (it answers NOT_SERVING until then).
        _app_spec(
            cfg,
            "config",
            command="config-server",
            health=lambda: _config_server_ok(cfg),
            ports=(cfg.grpc_port, cfg.config_http_port),
            timeout=120.0,
        ),
        # Last up, first down: it must not start again what `tagbus down` is stopping.
        # It finishes the round it is in on SIGTERM: a stream renewal must not be cut short.
        _app_spec(cfg, "keeper", stop_timeout=600.0),
    ]
    return {spec.name: spec for spec in specs}


def _postgres_spec(cfg: StackConfig) -> PartSpec:
    bindir = _lazy_bindir()
    pgdata = cfg.state / "pg"
    socket_dir = cfg.state / "pg-socket"
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(cfg.postgres_port),
        "unix_socket_directories": str(socket_dir),
        "wal_level": "logical",
        "max_replication_slots": "10",
        "max_wal_senders": "10",
        "synchronous_commit": "on",
        "max_connections": "200",
        "shared_buffers": "256MB",
        # A tailer that is down must not fill the disk with retained WAL: past this the slot
        # is invalidated (tagbus status shows "lost") and `tagbus republish` re-sends.
        "max_slot_wal_keep_size": "8GB",
    }
    argv = [str(bindir / "postgres"), "-D", str(pgdata)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    user = _POSTGRES_USER if os.geteuid() == 0 else None
    return PartSpec(
        name="postgres",
        argv=tuple(argv),
        cwd=cfg.state,
        marker=f"-D {pgdata}",
        ports=(cfg.postgres_port,),
        health=lambda: _postgres_ok(cfg, "postgres"),
        env=(("LC_ALL", "C.UTF-8"),),
        timeout=60.0,
        # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") waits for clients.
        stop_signal=signal.SIGINT,
        # Backends share the postmaster's group; only the postmaster must get the signal.
        signal_group=False,
        user=user,
        prepare=lambda: _initdb(cfg, bindir, pgdata, socket_dir, user),
        after_start=lambda: _bootstrap_database(cfg),
    )


def _kinesis_spec(cfg: StackConfig) -> PartSpec:
    package = cfg.state / "kinesis-mock" / "node_modules" / "kinesis-local"
    data = cfg.state / "kinesis-data"
    node = _lazy_tool("node")
    return PartSpec(
        name="kinesis",
        # kinesis-mock keeps every record in its JS heap and the default ceiling ran out under
        # load tests (docs/local-stack.md); the keeper's renewals bound what it holds. The
        # ceiling is not reserved.
        argv=(node, "--max-old-space-size=12288", "main.js"),
        # main.js reads server.json (its TLS certificate) from the working directory.
        cwd=package,
        marker="main.js",
        ports=(cfg.kinesis_port, cfg.kinesis_tls_port),
        health=lambda: _kinesis_ok(cfg),
        env=(
            ("KINESIS_MOCK_PLAIN_PORT", str(cfg.kinesis_port)),
            ("KINESIS_MOCK_TLS_PORT", str(cfg.kinesis_tls_port)),
            ("AWS_REGION", cfg.region),
            ("INITIALIZE_STREAMS", f"{cfg.stream_name}:{cfg.stream_shards}:{cfg.region}"),
            ("SHARD_LIMIT", "50"),
            ("SHOULD_PERSIST_DATA", "true"),
            ("LOAD_DATA_IF_EXISTS", "true"),
            ("PERSIST_PATH", str(data)),
            # kinesis-mock serializes its whole state on every persist, on its one JS thread,
            # answering nothing meanwhile. It also persists when it exits, so it saves only
            # then: what a kill -9 loses, the stack republishes from the events table when it
            # starts kinesis-mock again (tagbus.generations.repair_after_crash).
            ("PERSIST_INTERVAL", "86400s"),
            ("LOG_LEVEL", "WARN"),
        ),
        # It reloads its saved state before it answers: up to one generation of the stream.
        timeout=120.0,
        # On SIGTERM it writes its whole state out; a SIGKILL mid-write leaves a truncated file.
        stop_timeout=120.0,
        prepare=lambda: _prepare_kinesis(cfg, data),
        on_crash=lambda: _mark_kinesis_crashed(data),
        slow_start_hint=lambda: kinesis_reload_hint(data / "kinesis-data.json"),
    )


#: A saved kinesis-mock state past this size may take longer to reload than `tagbus up` waits
#: (reload costs: docs/local-stack.md).
KINESIS_BIG_STATE_BYTES = 100 * 1024 * 1024


def kinesis_reload_hint(state: Path) -> str | None:
    """Why kinesis-mock may still be starting, and how to reset it, when its saved state is big."""
    try:
        size = state.stat().st_size
    except OSError:
        return None
    if size < KINESIS_BIG_STATE_BYTES:
        return None
    return (
        f"kinesis-mock reloads its saved state ({size / 1e6:,.0f} MB, {state}) before it answers, which"
        " can take minutes; wait and run `tagbus up` again, or start with empty streams:"
        f" `tagbus down && rm -rf {state.parent}` (`tagbus republish` re-sends a range of events)"
    )


def _dynamodb_spec(cfg: StackConfig) -> PartSpec:
    home = cfg.state / "dynamodb-local"
    data = cfg.state / "dynamodb-data"
    java = _lazy_tool("java")
    return PartSpec(
        name="dynamodb",
        argv=(
            java,
            "-Xmx512m",
            f"-Djava.library.path={home / 'native'}",
            "-cp",
            str(home / "lib" / "*"),
            _DYNAMODB_LOCAL_MAIN,
            "-port",
            str(cfg.dynamodb_port),
            "-sharedDb",
            "-dbPath",
            str(data),
            "-disableTelemetry",
        ),
        cwd=cfg.state,
        marker=_DYNAMODB_LOCAL_MAIN,
        ports=(cfg.dynamodb_port,),
        health=lambda: _aws_call(cfg, "dynamodb", "list_tables", Limit=1),
        timeout=60.0,
        prepare=lambda: _prepare_dynamodb(cfg, data),
    )


def _moto_spec(cfg: StackConfig) -> PartSpec:
    moto_server = cfg.venv_python.parent / "moto_server"
    return PartSpec(
        name="moto",
        argv=(str(moto_server), "-H", "127.0.0.1", "-p", str(cfg.moto_port)),
        cwd=cfg.state,
        marker="moto_server",
        ports=(cfg.moto_port,),
        health=lambda: _moto_ok(cfg),
        timeout=60.0,
        prepare=lambda: _require_file(moto_server, "moto_server missing: pip install 'moto[server]' into the venv"),
    )


def _app_spec(
    cfg: StackConfig,
    name: str,
    *,
    health: Callable[[], object] | None = None,
    prepare: Callable[[], None] | None = None,
    signal_group: bool = True,
    ports: tuple[int, ...] = (),
    timeout: float = 60.0,
    command: str | None = None,
    strays: Callable[[], Sequence[int]] | None = None,
    stop_timeout: float = 0.0,
) -> PartSpec:
    command = command or name
    return PartSpec(
        name=name,
        argv=(str(cfg.venv_python), "-m", "tagbus", command),
        cwd=cfg.root.resolve(),
        marker=f"-m tagbus {command}",
        ports=ports,
        health=health or (lambda: None),
        env_factory=lambda: stack_env(cfg),
        timeout=timeout,
        min_alive=1.0,
        signal_group=signal_group,
        prepare=prepare,
        strays=strays,
        stop_timeout=stop_timeout,
    )


# -- the operations ----------------------------------------------------------------------


def up(config: StackConfig | None = None, parts: Sequence[str] | None = None) -> dict[str, PartStatus]:
    """Start every part in ``parts`` (default: all) that is not running; wait until healthy."""
    cfg = config or StackConfig.from_env()
    with stack_lock.held(cfg.run_dir):
        return _up(cfg, _select(parts))


def _up(cfg: StackConfig, wanted: list[str]) -> dict[str, PartStatus]:
    specs = part_specs(cfg)
    for directory in (cfg.run_dir, cfg.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    write_env_file(cfg)
    for name in wanted:
        spec = specs[name]
        if _live_pid(cfg, spec) is not None:
            continue
        died = cfg.pid_file(name).exists()
        if died:
            print(f"tagbus: {name}: found dead (its pid file was left behind); starting it again", file=sys.stderr)
            if spec.on_crash is not None:
                spec.on_crash()
        cfg.pid_file(name).unlink(missing_ok=True)
        _stop_strays(spec, timeout=15.0)  # a second instance beside them would fight them
        # A killed process loses its command line (its memory goes first) before its sockets
        # close; with a large heap that takes a while, so a part found dead gets time to let go.
        busy = _busy_ports(spec.ports, wait=15.0 if died else 0.0)
        if busy:
            raise StackError(
                f"{name}: port {', '.join(map(str, busy))} already in use by a process this stack did not start "
                f"(another checkout's stack? see `ss -ltnp`)"
            )
        if spec.prepare is not None:
            try:
                spec.prepare()
            except install.InstallError as e:
                raise StackError(f"{name}: {e}") from e
        pid = spawn_detached(spec, cfg.pid_file(name), cfg.log_file(name))
        wait_healthy(spec, pid, cfg.log_file(name))
        if spec.after_start is not None:
            spec.after_start()
    return status(cfg)


def down(
    config: StackConfig | None = None, parts: Sequence[str] | None = None, *, timeout: float = 15.0
) -> dict[str, PartStatus]:
    """Stop the parts we started (default: all), apps first, each by its pid file."""
    cfg = config or StackConfig.from_env()
    specs = part_specs(cfg)
    if "keeper" in _select(parts):  # before the lock: a keeper renewing the stream holds it
        stop_part(cfg, specs["keeper"], timeout=timeout)
    with stack_lock.held(cfg.run_dir):
        for name in reversed(_select(parts)):
            stop_part(cfg, specs[name], timeout=timeout)
    return status(cfg)


def status(config: StackConfig | None = None) -> dict[str, PartStatus]:
    """Per part: running or not, its pid and its log file."""
    cfg = config or StackConfig.from_env()
    result: dict[str, PartStatus] = {}
    for name, spec in part_specs(cfg).items():
        pid = _live_pid(cfg, spec)
        result[name] = PartStatus(name=name, running=pid is not None, pid=pid, log=cfg.log_file(name))
    return result


def spawn_detached(spec: PartSpec, pid_file: Path, log_file: Path) -> int:
    """Start ``spec.argv`` in its own session, output appended to ``log_file``; writes the pid file."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) if spec.inherit_env else {}
    env.update(spec.env)
    if spec.env_factory is not None:
        env.update(spec.env_factory())
    extra: dict[str, Any] = {}
    if spec.user is not None:
        account = pwd.getpwnam(spec.user)
        extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env.update({"HOME": account.pw_dir, "USER": spec.user, "LOGNAME": spec.user})
    with open(log_file, "ab") as log:
        log.write(
            f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}: {shlex.join(spec.argv)}\n".encode()
        )
        log.flush()
        try:
            process = subprocess.Popen(
                list(spec.argv),
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **extra,
            )
        except OSError as e:
            raise PartStartError(spec.name, log_file, f"cannot start {spec.argv[0]}: {e}") from e
    # Kept so the child is reaped (no zombie, no ResourceWarning) while this process lives.
    _CHILDREN[process.pid] = process
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{process.pid}\n")
    os.replace(tmp, pid_file)
    return process.pid


def wait_healthy(spec: PartSpec, pid: int, log_file: Path) -> None:
    """Poll ``spec.health`` until it passes while ``pid`` stays alive; PartStartError otherwise."""
    started = time.monotonic()
    deadline = started + spec.timeout
    last_error = "no answer yet"
    while True:
        if not _alive(pid, spec.marker):
            code = _exit_code(pid)
            raise PartStartError(spec.name, log_file, f"exited during start{code}; last lines:\n{_tail(log_file)}")
        try:
            spec.health()
        except Exception as e:  # any failure here means "not healthy yet"
            last_error = f"{type(e).__name__}: {e}"
        else:
            if time.monotonic() - started >= spec.min_alive:
                return
        if time.monotonic() >= deadline:
            hint = spec.slow_start_hint() if spec.slow_start_hint else None
            reason = f"not healthy after {spec.timeout:.0f}s ({last_error})" + (f"; {hint}" if hint else "")
            raise PartStartError(spec.name, log_file, reason)
        time.sleep(0.25)


def stop_part(config: StackConfig, spec: PartSpec, *, timeout: float = 15.0) -> bool:
    """Stop one part by its pid file: its stop signal, wait, then SIGKILL. True if it was running."""
    pid_file = config.pid_file(spec.name)
    pid = _live_pid(config, spec)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return _stop_strays(spec, timeout=timeout)
    _signal(pid, spec.stop_signal, group=spec.signal_group)
    deadline = time.monotonic() + max(timeout, spec.stop_timeout)
    while time.monotonic() < deadline and _alive(pid, spec.marker):
        time.sleep(0.1)
    if _alive(pid, spec.marker):
        _signal(pid, signal.SIGKILL, group=True)
        if spec.on_crash is not None:
            spec.on_crash()
        end = time.monotonic() + 5.0
        while time.monotonic() < end and _alive(pid, spec.marker):
            time.sleep(0.1)
    else:
        # The leader is gone; whatever it left in its group (e.g. a JVM's children) goes too.
        # Safe: Linux does not hand out a pid that is still some group's id.
        _signal(pid, signal.SIGKILL, group=True)
    pid_file.unlink(missing_ok=True)
    _stop_strays(spec, timeout=timeout)
    return True


def _stop_strays(spec: PartSpec, *, timeout: float) -> bool:
    """End the part's processes that no pid file names: SIGTERM, then SIGKILL. True if there were any."""
    pids = list(spec.strays()) if spec.strays is not None else []
    if not pids:
        return False
    print(
        f"tagbus: {spec.name}: stopping processes left by an earlier run: {' '.join(map(str, pids))}", file=sys.stderr
    )
    for pid in pids:
        _signal(pid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL, group=False)
    return True


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


# -- process helpers ---------------------------------------------------------------------

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _select(parts: Sequence[str] | None) -> list[str]:
    if parts is None:
        return list(ALL_PARTS)
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        raise StackError(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(ALL_PARTS)}")
    return [p for p in ALL_PARTS if p in parts]


def _live_pid(cfg: StackConfig, spec: PartSpec) -> int | None:
    try:
        pid = int(cfg.pid_file(spec.name).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, spec.marker) else None


def _alive(pid: int, marker: str) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: its exit status is the truth. The marker check below is for pids read
        # from pid files, and a starting process's cmdline can briefly lack the marker.
        return child.poll() is None
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline


def _exit_code(pid: int) -> str:
    child = _CHILDREN.get(pid)
    if child is not None and child.returncode is not None:
        return f" with exit code {child.returncode}"
    return ""


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            # Every part runs in its own session (start_new_session), so pgid == pid.
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()


def _busy_ports(ports: Sequence[int], *, wait: float) -> list[int]:
    """The ports still in use after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        busy = [port for port in ports if _port_in_use(port)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.2)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])


def _require_file(path: Path, message: str) -> None:
    if not path.is_file():
        raise StackError(message)


def _lazy_tool(name: str) -> str:
    """Path of a tool, or its bare name so ``status`` works without it (prepare checks)."""
    try:
        return install.require_tool(name)
    except install.MissingToolError:
        return name


def _lazy_bindir() -> Path:
    try:
        return install.find_postgres_bindir()
    except install.MissingToolError:
        return Path("/usr/lib/postgresql/missing/bin")


# -- health checks and preparation ---------------------------------------------------------


def _aws_call(cfg: StackConfig, service: str, operation: str, **params: Any) -> Any:
    """One API call on a local part, with a client that is closed afterwards (no socket left)."""
    client = _client(cfg, service)
    try:
        return getattr(client, operation)(**params)
    finally:
        client.close()


def _client(cfg: StackConfig, service: str) -> Any:
    """A boto3 client for a local part that fails fast (one try, short timeouts)."""
    import boto3
    from botocore.config import Config

    endpoints = {
        "kinesis": cfg.kinesis_port,
        "dynamodb": cfg.dynamodb_port,
        "ssm": cfg.moto_port,
        "cloudwatch": cfg.moto_port,
    }
    return boto3.session.Session().client(  # type: ignore[call-overload]
        service,
        endpoint_url=f"http://127.0.0.1:{endpoints[service]}",
        region_name=cfg.region,
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )


def _http_ok(url: str) -> None:
    import httpx

    response = httpx.get(url, timeout=2.0)
    response.raise_for_status()


def _postgres_ok(cfg: StackConfig, dbname: str) -> None:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=cfg.postgres_port,
        user=_DB_USER,
        password=_DB_PASSWORD,
        dbname=dbname,
        connect_timeout=2,
    ) as conn:
        conn.execute("SELECT 1")


def _kinesis_ok(cfg: StackConfig) -> None:
    summary = _aws_call(cfg, "kinesis", "describe_stream_summary", StreamName=cfg.stream_name)
    if summary["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        raise StackError(f"stream {cfg.stream_name} is not ACTIVE yet")


def _consumer_ok(cfg: StackConfig) -> None:
    """Healthy once a KCL worker holds the lease of every open shard.

    A fresh KCL 3.x application waits a random 1-30 s before its first shard sync (hard-coded),
    so "the process is alive" is not enough: events would sit unprocessed until then.
    """
    shards = _aws_call(cfg, "kinesis", "list_shards", StreamName=cfg.stream_name)["Shards"]
    open_shards = {s["ShardId"] for s in shards if "EndingSequenceNumber" not in s["SequenceNumberRange"]}
    leases = _aws_call(cfg, "dynamodb", "scan", TableName=CONSUMER_APPLICATION, ConsistentRead=True)["Items"]
    # Owned by this stack's worker: a lease still naming a stopped worker is not being processed.
    me = consumer_worker_id({**os.environ, **stack_env(cfg)})
    owned = {item["leaseKey"]["S"] for item in leases if item.get("leaseOwner", {}).get("S") == me}
    if not open_shards <= owned:
        raise StackError(f"no KCL lease yet for {', '.join(sorted(open_shards - owned))}")


#: The service whose health ``tagbus up`` waits for: the config server reports it SERVING
#: only once its change source has caught up.
CONFIG_SERVICE = "tagbus.config.v1.ConfigService"


def _config_server_ok(cfg: StackConfig) -> None:
    """The gRPC health check of the config service answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=CONFIG_SERVICE), timeout=2.0
        )
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        raise StackError(f"{CONFIG_SERVICE} is {status} (still catching up with the stream?)")


def _moto_ok(cfg: StackConfig) -> None:
    _aws_call(cfg, "ssm", "describe_parameters", MaxResults=1)
    _aws_call(cfg, "cloudwatch", "list_metrics")


def _initdb(cfg: StackConfig, bindir: Path, pgdata: Path, socket_dir: Path, user: str | None) -> None:
    """Create the private cluster once; its bootstrap superuser is the ``tagbus`` role."""
    if not (bindir / "postgres").is_file():
        install.find_postgres_bindir()  # raises the one-line "install postgresql" error
    owner = pwd.getpwnam(user) if user is not None else None
    for directory in (pgdata, socket_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
    if (pgdata / "PG_VERSION").is_file():
        return
    with tempfile.NamedTemporaryFile("w", prefix="tagbus-pw-", delete=False) as handle:
        handle.write(_DB_PASSWORD + "\n")
        pwfile = Path(handle.name)
    try:
        extra: dict[str, Any] = {}
        if owner is not None:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            extra = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                _DB_USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            cwd=pgdata.parent,
            env={**os.environ, "LC_ALL": "C.UTF-8", **({"HOME": owner.pw_dir} if owner else {})},
            capture_output=True,
            text=True,
            check=False,
            **extra,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        log = cfg.log_file("postgres")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(result.stdout + result.stderr)
        raise PartStartError("postgres", log, f"initdb failed (exit {result.returncode})")


def _bootstrap_database(cfg: StackConfig) -> None:
    """Create database ``tagbus`` (owned by role ``tagbus``) unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1",
        port=cfg.postgres_port,
        user=_DB_USER,
        password=_DB_PASSWORD,
        dbname="postgres",
        autocommit=True,
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_DB_NAME,)).fetchone()
        if exists is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(_DB_NAME), sql.Identifier(_DB_USER))
            )
    _postgres_ok(cfg, _DB_NAME)


def _prepare_kinesis(cfg: StackConfig, data: Path) -> None:
    install.require_tool("node")
    install.install_kinesis_mock(cfg.root)
    data.mkdir(parents=True, exist_ok=True)
    _mark_if_streams_start_empty(data / "kinesis-data.json")


#: Left in the kinesis-mock data folder when it died unsaved (see tagbus.generations).
KINESIS_CRASH_MARK = "crashed"


def _mark_kinesis_crashed(data: Path) -> None:
    """kinesis-mock saves every few minutes and on a clean stop: a crash loses what came since."""
    data.mkdir(parents=True, exist_ok=True)
    (data / KINESIS_CRASH_MARK).touch()


#: Left in the kinesis-mock data folder when it starts with empty streams (see lifecycle.up).
KINESIS_RESET_MARK = "streams-were-reset"


def _mark_if_streams_start_empty(state: Path) -> None:
    """Leave :data:`KINESIS_RESET_MARK` when kinesis-mock will start without a saved state.

    That is a first start, a state set aside as unreadable, or a data folder removed by
    hand while DynamoDB's was kept. In the last case the KCL's leases named sequence numbers
    of the lost stream: the daemon took the shard for ended and consumed nothing for minutes,
    until its lease cleanup and shard sync made a new lease. ``lifecycle.up`` drops those
    lease tables before the consumer starts (on a first start there are none).
    """
    _set_aside_unreadable(state)
    if not state.exists():
        state.with_name(KINESIS_RESET_MARK).touch()


def _set_aside_unreadable(state: Path) -> None:
    """Move a truncated or corrupt kinesis-mock state file aside: it refuses to start on one.

    The emulator then starts with an empty stream (the tailer republishes nothing: the slot
    already moved past what Kinesis acknowledged), so say so loudly.
    """
    if not state.exists():
        return
    try:
        with state.open("rb") as handle:
            orjson.loads(handle.read())
    except (orjson.JSONDecodeError, OSError) as e:
        aside = state.with_name(f"{state.name}.unreadable-{int(time.time())}")
        state.rename(aside)
        print(
            f"tagbus: kinesis: its saved state was unreadable ({e}); moved to {aside.name}, "
            "starting with empty streams",
            file=sys.stderr,
        )


def _prepare_dynamodb(cfg: StackConfig, data: Path) -> None:
    install.require_tool("java")
    install.install_dynamodb_local(cfg.root)
    data.mkdir(parents=True, exist_ok=True)


def _prepare_consumer(cfg: StackConfig) -> None:
    install.require_tool("java")
    install.install_kcl_jars(cfg.root)
    install.install_kclpy(cfg.root, python=cfg.venv_python)


def format_status(statuses: Mapping[str, PartStatus] | Iterable[PartStatus]) -> str:
    """One line per part: name, running/stopped, pid, log — for the CLI."""
    items = statuses.values() if isinstance(statuses, Mapping) else statuses
    return "\n".join(f"{s.name:<9} {'running' if s.running else 'stopped':<8} {s.pid or '-':<8} {s.log}" for s in items)
