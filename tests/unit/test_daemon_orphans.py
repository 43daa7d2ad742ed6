"""No orphans, no twins: the daemon dies with its consumer, strays are found and stopped, one consumer per worker id.

The mechanism on small process trees of Python stand-ins (no JVM, no emulators): a
"consumer" process runs :func:`consumers.daemon.run_daemon` with a fake ``java`` that starts
a child reading its stdin, as the MultiLangDaemon starts record processors.
``tests/integration/test_stack_orphans.py`` does the same with the real KCL daemon.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.daemon import RUN_DIR_VARIABLE, DaemonSettings, daemon_processes, run_daemon
from consumers.worker_lock import WorkerIdTaken, WorkerLock, lock_path
from tagbus import stack
from tests.fixtures.waiting import wait_for

WORKER = "tagbus-test-worker@host"

# Stands in for java: starts a "processor" that blocks reading its stdin (the pipe this
# process holds), records both pids, and waits to be killed.
FAKE_JAVA = textwrap.dedent(
    """\
    #!{python}
    import os, pathlib, subprocess, sys, time
    processor = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    pathlib.Path({pids!r}).write_text(f"{{os.getpid()}} {{processor.pid}}")
    time.sleep(600)
    """
)

CONSUMER = textwrap.dedent(
    """\
    import pathlib, sys
    from consumers.daemon import DaemonSettings, run_daemon
    tmp = pathlib.Path(sys.argv[1])
    settings = DaemonSettings(stream_name="s", processor_command=("true",), worker_id={worker!r})
    sys.exit(run_daemon(settings, jars_dir=tmp, workdir=tmp / "run", java=sys.argv[2], lock_dir=tmp / "locks"))
    """
).format(worker=WORKER)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


#: A wait on processes starting or dying, which may take a while on a busy machine.
wait_until = functools.partial(wait_for, timeout=15.0)


@pytest.fixture
def consumer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """A consumer process running a fake daemon; yields it, the daemon's pid and its processor's."""
    pids = tmp_path / "pids"
    java = tmp_path / "java"
    java.write_text(FAKE_JAVA.format(python=sys.executable, pids=str(pids)))
    java.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-c", CONSUMER, str(tmp_path), str(java)], env=env)
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, "the fake daemon and its processor")
        daemon, processor = (int(p) for p in pids.read_text().split())
        yield process, daemon, processor
    finally:
        for pid in (process.pid, *daemon_processes(tmp_path / "run")):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def test_kill_9_of_the_consumer_takes_its_daemon_and_processor_with_it(
    consumer: tuple[subprocess.Popen[bytes], int, int], tmp_path: Path
) -> None:
    process, daemon, processor = consumer
    assert sorted(daemon_processes(tmp_path / "run")) == sorted([daemon, processor])
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The daemon by its parent-death signal; the processor by end-of-file on its stdin.
    wait_until(lambda: not running(daemon), "the daemon to die with its consumer")
    wait_until(lambda: not running(processor), "the processor to die with its daemon")
    assert daemon_processes(tmp_path / "run") == []


def test_a_second_consumer_with_the_same_worker_id_is_refused_while_the_first_lives(
    consumer: tuple[subprocess.Popen[bytes], int, int], tmp_path: Path
) -> None:
    process, daemon, _ = consumer
    runs = tmp_path / "second-java-ran"
    java = tmp_path / "second-java"
    java.write_text(f"#!/bin/sh\ntouch {runs}\n")
    java.chmod(0o755)
    settings = DaemonSettings(stream_name="s", processor_command=("true",), worker_id=WORKER)
    with pytest.raises(WorkerIdTaken) as info:
        run_daemon(settings, jars_dir=tmp_path, workdir=tmp_path / "run2", java=str(java), lock_dir=tmp_path / "locks")
    message = str(info.value)
    assert "\n" not in message
    assert f"pid {process.pid}" in message and WORKER in message
    assert not runs.exists(), "the refused consumer started a daemon"
    assert running(daemon)

    # The claim ends with the process, however it ends: a kill -9 leaves no stale lock.
    process.send_signal(signal.SIGKILL)
    process.wait()
    with WorkerLock(tmp_path / "locks", WORKER) as lock:
        assert lock.held


def test_lock_files_of_ids_that_differ_only_in_unsafe_characters_are_distinct(tmp_path: Path) -> None:
    assert lock_path(tmp_path, "a/b") != lock_path(tmp_path, "a_b")
    assert lock_path(tmp_path, "a/b").parent == tmp_path
    with WorkerLock(tmp_path, "a/b"), WorkerLock(tmp_path, "a_b") as other:
        assert other.held


def test_down_stops_daemons_an_older_run_left_behind(tmp_path: Path) -> None:
    # A daemon whose consumer is gone (an older run, without the parent-death signal): found
    # by its command line, its child by descent, and a process by the environment marker.
    config = stack.StackConfig(root=tmp_path)
    run_dir = config.state / "kcl-run"
    run_dir.mkdir(parents=True)
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    orphan = subprocess.Popen(
        [sys.executable, "-c", sleeper + " time.sleep(600)", "--properties-file", f"{run_dir}/x.properties"],
        start_new_session=True,
    )
    marked = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, RUN_DIR_VARIABLE: str(run_dir.resolve())},
        start_new_session=True,
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        wait_until(lambda: len(daemon_processes(run_dir)) == 3, "the orphan, its child and the marked process")
        found = daemon_processes(run_dir)
        assert orphan.pid in found and marked.pid in found and other.pid not in found

        spec = stack.part_specs(config)["consumer"]
        assert stack.stop_part(config, spec, timeout=5.0)  # no pid file: only strays to stop
        wait_until(lambda: not any(running(pid) for pid in found), "the strays to stop")
        assert running(other.pid)
        assert not stack.stop_part(config, spec, timeout=5.0)
    finally:
        for process in (orphan, marked, other):
            process.kill()
            process.wait()
