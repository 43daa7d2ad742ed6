"""Every part, killed by the pid ``tagbus status`` shows, comes back — and only once.

For each part in turn: ``kill -9`` the pid that ``tagbus status`` prints; every part but the
keeper must be started again by the keeper on its own (no ``tagbus up``); then ``tagbus up``
runs, as an operator would, and every part of the stack must be running as exactly one
instance (one process tree per part, one KCL JVM), with nothing left of the killed one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tagbus import settings as settings_mod
from tagbus import stack
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

#: Seconds the keeper may take to notice a dead part and start it (the consumer's JVM, a
#: kinesis-mock repair and a config server's catch-up included).
REVIVED_WITHIN = 240.0
_STATUS_LINE = re.compile(r"^(?P<part>\w+)\s+(?P<state>running|stopped)\s+(?P<pid>\d+|-)\s")


def _tagbus(*args: str) -> str:
    tagbus = Path(sys.executable).with_name("tagbus")
    done = subprocess.run([str(tagbus), *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"tagbus {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def _status_pids() -> dict[str, int | None]:
    """Each part's pid as ``tagbus status`` prints it."""
    pids: dict[str, int | None] = {}
    for line in _tagbus("status").splitlines():
        if (match := _STATUS_LINE.match(line)) is not None:
            pids[match["part"]] = None if match["pid"] == "-" else int(match["pid"])
    return pids


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every live process: parent pid, command line, working directory."""
    found: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = (int(parent), cmdline, cwd)
    return found


def instances(cfg: stack.StackConfig) -> dict[str, list[int]]:
    """Per part, the roots of the process trees that run it from this checkout."""
    root = str(cfg.root.resolve())
    processes = _processes()
    found: dict[str, list[int]] = {}
    for name, spec in stack.part_specs(cfg).items():
        ours = {
            pid
            for pid, (_, cmdline, cwd) in processes.items()
            if spec.marker in cmdline and (cwd == root or cwd.startswith(f"{root}/"))
        }
        found[name] = sorted(pid for pid in ours if processes[pid][0] not in ours)
    found["kcl-daemon"] = sorted(
        pid
        for pid, (_, cmdline, _) in processes.items()
        if f"--properties-file {(cfg.state / 'kcl-run').resolve()}/" in cmdline
    )
    return found


def _assert_one_of_each(cfg: stack.StackConfig) -> None:
    counted = instances(cfg)
    extra = {name: pids for name, pids in counted.items() if len(pids) != 1}
    assert not extra, f"parts not running exactly once: {extra}"


@pytest.mark.parametrize("part", list(stack.ALL_PARTS))
def test_part_killed_by_its_status_pid_comes_back_once(part: str, live_stack: settings_mod.Settings) -> None:
    cfg = stack.StackConfig.from_env()
    _tagbus("up")
    pid = _status_pids().get(part)
    assert pid is not None, f"tagbus status shows no pid for {part}"

    os.kill(pid, signal.SIGKILL)

    if part != "keeper":  # nothing keeps the keeper; `tagbus up` below starts it again
        wait_for(
            lambda: (stack.status(cfg)[part].pid or pid) != pid or None,
            f"the keeper to start {part} again",
            REVIVED_WITHIN,
            interval=0.5,
            explain=lambda: cfg.log_file("keeper").read_text()[-3000:],
        )
    _tagbus("up")
    statuses = stack.status(cfg)
    assert all(s.running for s in statuses.values()), stack.format_status(statuses)
    assert statuses[part].pid != pid
    _assert_one_of_each(cfg)
