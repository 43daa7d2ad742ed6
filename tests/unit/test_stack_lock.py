"""The stack lock: re-entrant within a thread, exclusive between processes, gone with its holder."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagbus import stack_lock

REPO = Path(__file__).resolve().parents[2]

#: Takes the lock (waiting for it), says so, and holds it until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from tagbus import stack_lock
with stack_lock.held(Path(sys.argv[1])) as got:
    print("held" if got else "not held", flush=True)
    sys.stdin.read()
"""
#: Tries the lock without waiting and prints whether it got it.
PROBE = """
import sys
from pathlib import Path
from tagbus import stack_lock
with stack_lock.held(Path(sys.argv[1]), blocking=False) as got:
    print(got)
"""


def python(snippet: str, run_dir: Path, *, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", snippet, str(run_dir)], cwd=REPO, text=True, stdin=stdin, stdout=subprocess.PIPE
    )


def another_process_gets_it(run_dir: Path) -> bool:
    probe = python(PROBE, run_dir)
    out, _ = probe.communicate(timeout=30)
    assert probe.returncode == 0
    return {"True\n": True, "False\n": False}[out]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds the lock of ``tmp_path / "run"``."""
    child = python(HOLDER, tmp_path / "run", stdin=subprocess.PIPE)
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.kill()
        child.wait(30)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


def test_held_is_reentrant_in_one_thread(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with stack_lock.held(run_dir) as outer:
        assert outer is True
        with stack_lock.held(run_dir, blocking=False) as inner:
            assert inner is True
        assert another_process_gets_it(run_dir) is False  # the inner exit did not release it
    assert another_process_gets_it(run_dir) is True


def test_another_thread_is_another_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    got: list[bool] = []

    def attempt() -> None:
        with stack_lock.held(run_dir, blocking=False) as mine:
            got.append(mine)

    with stack_lock.held(run_dir):
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(30)
    assert got == [False]


def test_another_process_cannot_take_it_while_this_one_holds_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with stack_lock.held(run_dir):
        assert another_process_gets_it(run_dir) is False
    assert another_process_gets_it(run_dir) is True


def test_this_process_gets_it_once_another_releases_it(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    run_dir = tmp_path / "run"
    with stack_lock.held(run_dir, blocking=False) as mine:
        assert mine is False
    assert holder.stdin is not None
    holder.stdin.close()  # the holder leaves its `with` and ends
    assert holder.wait(30) == 0
    with stack_lock.held(run_dir, blocking=False) as mine:
        assert mine is True


def test_the_lock_goes_with_a_holder_that_is_killed(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    run_dir = tmp_path / "run"
    with stack_lock.held(run_dir, blocking=False) as mine:
        assert mine is False
    holder.kill()  # SIGKILL: no `finally` runs in the holder
    assert holder.wait(30) == -9
    with stack_lock.held(run_dir, blocking=False) as mine:
        assert mine is True
