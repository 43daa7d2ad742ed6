"""No orphans, no twins, with the real KCL daemon: a private consumer part, killed with ``kill -9``.

The shared stack's parts are left alone. A consumer part of the test's own runs against
the stack's emulators with its own state directory, stream, KCL application (lease
tables) and worker id, started by :func:`tagbus.stack.spawn_detached` as ``tagbus up``
starts it. Fixed names on purpose (as in ``test_stack.py``): a new KCL application waits a
random 1-30 s before its first shard sync, so only the first run pays that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from consumers.daemon import daemon_processes
from consumers.worker_lock import WorkerLock
from tagbus import install, stack
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
STREAM = "tagbus-orphans-test"
APPLICATION = "tagbus-orphans-test"
WORKER = f"{APPLICATION}@{socket.gethostname()}"


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: the JVM starts processors from worker threads)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(found))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tail_of(log: Path) -> Callable[[], str]:
    """The end of ``log``, read when a wait times out."""
    return lambda: log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture(scope="module")
def shared() -> stack.StackConfig:
    """The shared stack's layout; its emulators must be running (nothing here starts or stops them)."""
    config = stack.StackConfig.from_env(root=ROOT)
    statuses = stack.status(config)
    down = [name for name in ("kinesis", "dynamodb", "moto") if not statuses[name].running]
    if down:
        pytest.fail(f"the local stack's {', '.join(down)} not running: `tagbus up` first", pytrace=False)
    return config


@pytest.fixture(scope="module")
def private_stream(shared: stack.StackConfig) -> str:
    env = stack.stack_env(shared)
    kinesis = boto3.session.Session().client(  # type: ignore[call-overload]
        "kinesis",
        endpoint_url=env["AWS_ENDPOINT_URL_KINESIS"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    try:
        with contextlib.suppress(kinesis.exceptions.ResourceInUseException):
            kinesis.create_stream(StreamName=STREAM, ShardCount=1)
        kinesis.get_waiter("stream_exists").wait(StreamName=STREAM, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
    finally:
        kinesis.close()
    return STREAM


@pytest.fixture
def private(shared: stack.StackConfig, private_stream: str, tmp_path: Path) -> Iterator[stack.StackConfig]:
    """A state directory of the test's own, on the shared emulators' ports; its processes killed after."""
    config = dataclasses.replace(shared, root=tmp_path, stream_name=private_stream)
    config.state.mkdir(parents=True)
    (config.state / "kcl-jars").symlink_to(install.install_kcl_jars(ROOT))
    try:
        yield config
    finally:
        for pid in daemon_processes(config.state / "kcl-run"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stack.stop_part(config, consumer_spec(config), timeout=5.0)


def consumer_spec(config: stack.StackConfig) -> stack.PartSpec:
    """The stack's consumer part, with this test's worker id, application and state directory."""
    spec = stack.part_specs(config)["consumer"]
    own = (
        ("TAGBUS_HOME", str(config.state)),
        ("TAGBUS_CONSUMER_WORKER_ID", WORKER),
        ("TAGBUS_CONSUMER_APPLICATION", APPLICATION),
    )
    return dataclasses.replace(spec, env=spec.env + own)


def part_env(config: stack.StackConfig, spec: stack.PartSpec) -> dict[str, str]:
    return {**os.environ, **dict(spec.env), **stack.stack_env(config)}


def test_kill_9_of_a_consumer_leaves_no_daemon_or_processor_and_a_twin_is_refused(
    private: stack.StackConfig,
) -> None:
    spec = consumer_spec(private)
    log = private.log_file("consumer")
    consumer = stack.spawn_detached(spec, private.pid_file("consumer"), log)
    jvm: list[int] = []
    processors: list[int] = []

    def daemon_and_processor() -> bool:
        jvm[:] = [pid for pid in children(consumer) if "MultiLangDaemon" in cmdline(pid)]
        processors[:] = [pid for pid in children(jvm[0]) if "tagbus.processor" in cmdline(pid)] if jvm else []
        return bool(jvm and processors)

    # A processor runs once the daemon holds the shard's lease.
    wait_for(
        daemon_and_processor, "the KCL daemon to start a record processor", 180, interval=0.1, explain=tail_of(log)
    )
    tree = {consumer, *jvm, *processors}
    assert set(daemon_processes(private.state / "kcl-run")) == tree - {consumer}

    # A twin on this host, same worker id: refused at once, in one line naming the holder.
    twin = subprocess.run(
        [str(private.venv_python), "-m", "tagbus", "consumer"],
        cwd=private.root,
        env=part_env(private, spec),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert twin.returncode == 1
    lines = twin.stderr.strip().splitlines()
    assert len(lines) == 1, twin.stderr
    assert f"pid {consumer}" in lines[0] and WORKER in lines[0]
    assert all(running(pid) for pid in tree)
    assert [pid for pid in children(consumer) if "MultiLangDaemon" in cmdline(pid)] == jvm

    os.kill(consumer, signal.SIGKILL)
    wait_for(
        lambda: not any(running(pid) for pid in tree),
        "the daemon and its processors to die",
        30,
        interval=0.1,
        explain=tail_of(log),
    )
    assert daemon_processes(private.state / "kcl-run") == []
    assert not stack.stop_part(private, spec, timeout=5.0)  # nothing left for `tagbus down` to stop
    with WorkerLock(private.run_dir, WORKER) as lock:  # the worker id is free again
        assert lock.held
