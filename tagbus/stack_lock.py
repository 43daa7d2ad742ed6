"""One operation on the local stack at a time: ``tagbus up``, the keeper's revivals, stream renewals.

An ``flock`` on ``.tagbus/run/stack.lock``. Two of these at once would start a part twice, or
renew the stream under a ``tagbus up`` that is starting the consumer. The lock is re-entrant
within a process (a renewal calls ``tagbus up``'s code for the parts it restarts), and the
kernel releases it when its holder dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_held = threading.local()


@contextmanager
def held(run_dir: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the stack lock for the body; yields ``False`` (without it) when ``blocking`` is off and it is taken."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield True
        finally:
            _held.depth -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "stack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        _held.depth = 1
        try:
            yield True
        finally:
            _held.depth = 0
    finally:
        os.close(fd)  # closing the descriptor releases the lock
