"""One live consumer per KCL worker id on a host: an ``flock`` held for the consumer's lifetime.

Two MultiLangDaemons with the same worker id take a shard's lease from each other
without end (each renewal by one is a "lease lost" for the other), and a stable worker id
is the default (:func:`consumers.daemon.worker_id`). So a consumer claims its worker id
before it starts its daemon: an exclusive ``flock`` on ``consumer-<worker id>.lock``, held
until the process ends. The kernel releases it however the process ends, ``kill -9``
included, so a stale lock file never blocks a start; the file only says which pid held it
last, for the error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
from pathlib import Path
from types import TracebackType

__all__ = ["WorkerIdTaken", "WorkerLock", "lock_path"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


class WorkerIdTaken(RuntimeError):
    """Another live consumer on this host holds the worker id; the message is one line."""

    def __init__(self, worker_id: str, path: Path, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "a process"
        super().__init__(
            f"KCL worker id {worker_id!r} is held by a live consumer on this host ({who}, lock {path}): "
            "stop it first (`tagbus down consumer`), or give this one another TAGBUS_CONSUMER_WORKER_ID"
        )
        self.worker_id = worker_id
        self.path = path
        self.holder = holder


def lock_path(directory: Path, worker_id: str) -> Path:
    """The lock file of ``worker_id`` in ``directory`` (a name safe for any worker id)."""
    safe = _UNSAFE.sub("_", worker_id)
    if safe != worker_id:
        # Two ids that differ only in the characters replaced must not share a lock.
        safe += "-" + hashlib.sha256(worker_id.encode()).hexdigest()[:8]
    return directory / f"consumer-{safe}.lock"


class WorkerLock:
    """The claim of one KCL worker id on this host, for as long as this process holds it."""

    def __init__(self, directory: Path, worker_id: str) -> None:
        self.worker_id = worker_id
        self.path = lock_path(directory, worker_id)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WorkerIdTaken` naming the pid that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Close-on-exec: the daemon and its processors must not keep the claim alive.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkerIdTaken(self.worker_id, self.path, holder) from e
            raise
        # The file is never removed: a new inode would let a second claimant lock that one
        # while the first still holds the old.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkerLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
