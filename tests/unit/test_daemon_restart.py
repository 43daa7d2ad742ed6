"""The consumer restarts its MultiLangDaemon when it dies (KCL exits the JVM when one processor dies)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from consumers.daemon import DaemonSettings, run_daemon
from tests.fixtures.waiting import wait_for


def _fake_java(tmp_path: Path, body: str) -> Path:
    """An executable standing in for ``java``: counts its runs in ``runs``, then runs ``body``."""
    script = tmp_path / "java"
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys, time\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = int(runs.read_text()) + 1 if runs.exists() else 1\n"
        "runs.write_text(str(n))\n" + body
    )
    script.chmod(0o755)
    return script


def _settings() -> DaemonSettings:
    return DaemonSettings(stream_name="s", processor_command=("true",))


def test_a_daemon_that_dies_is_started_again(tmp_path: Path) -> None:
    # First run dies like the JVM after a processor was killed (exit 1); the second exits cleanly.
    java = _fake_java(tmp_path, "sys.exit(1 if n == 1 else 0)\n")
    code = run_daemon(_settings(), jars_dir=tmp_path, workdir=tmp_path / "run", java=str(java), restart_delay=0)
    assert code == 0
    assert (tmp_path / "runs").read_text() == "2"


def test_a_crash_loop_gives_up_with_the_exit_code(tmp_path: Path) -> None:
    java = _fake_java(tmp_path, "sys.exit(3)\n")
    code = run_daemon(
        _settings(), jars_dir=tmp_path, workdir=tmp_path / "run", java=str(java), restart_delay=0, max_restarts=2
    )
    assert code == 3
    assert (tmp_path / "runs").read_text() == "3"


def test_a_stop_signal_is_forwarded_and_not_followed_by_a_restart(tmp_path: Path) -> None:
    # The fake daemon exits 143 on SIGTERM (as the JVM does); that exit must not be restarted.
    # Left alone it would exit 0 after 30 s: a 143 shows the signal was passed on.
    armed = tmp_path / "armed"
    java = _fake_java(
        tmp_path,
        "import signal\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        f"pathlib.Path({str(armed)!r}).touch()\ntime.sleep(30)\nsys.exit(0)\n",
    )
    runs = tmp_path / "runs"

    def stop_once_armed() -> None:
        wait_for(armed.exists, "the fake daemon to handle SIGTERM", 20)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=stop_once_armed)
    timer.start()
    code = run_daemon(_settings(), jars_dir=tmp_path, workdir=tmp_path / "run", java=str(java), restart_delay=0)
    timer.join()
    assert code == 143
    assert runs.read_text() == "1"
