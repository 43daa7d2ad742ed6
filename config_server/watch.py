"""One watch stream, whatever its protocol: the frames it sends and the bounds it keeps.

A :class:`WatchSession` turns the state's :class:`~config_server.state.Opening` into frames —
snapshot chunks or the resumed backlog, then live changes, progress every interval — and
ends the stream cleanly at its lifetime cap (after a progress, so the client resumes without
a gap) or with a resync when the watcher was cut. The protocol writes each frame inside
:meth:`WatchSession.writing`; a write that a cut watcher does not drain within the grace
period is interrupted (the task is cancelled, :attr:`WatchSession.interrupted` set), so a
client that stopped reading cannot hold a stream slot forever.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from config_server.access import Caller, Refusal, Refused, not_ready
from config_server.settings import ConfigServerSettings
from config_server.state import (
    ConfigState,
    Entry,
    HistoryTooShort,
    Opening,
    ResumeOpening,
    SnapshotOpening,
)

HISTORY_TOO_SHORT = "HISTORY_TOO_SHORT"
TOO_SLOW = "TOO_SLOW"


@dataclass(frozen=True, slots=True)
class SnapshotFrame:
    entries: list[Entry]
    position: int
    done: bool


@dataclass(frozen=True, slots=True)
class ProgressFrame:
    position: int
    at: datetime
    source_lag_ms: int


@dataclass(frozen=True, slots=True)
class ResyncFrame:
    reason: str
    oldest_position: int
    detail: str


class Keepalive:
    """Nothing to send for a while: a protocol without its own pings sends a comment."""


KEEPALIVE = Keepalive()

#: A change is sent as its entry (a tombstone is a delete).
Frame = SnapshotFrame | Entry | ProgressFrame | ResyncFrame | Keepalive


def _chunks(entries: list[Entry], most: int, most_bytes: int) -> Iterator[tuple[list[Entry], bool]]:
    """Snapshot chunks of at most ``most`` entries and about ``most_bytes`` (one entry at least); the last is done."""
    chunk: list[Entry] = []
    size = 0
    for entry in entries:
        cost = len(entry.key) + len(entry.value_json) + len(entry.tenant) + 64
        if chunk and (len(chunk) == most or size + cost > most_bytes):
            yield chunk, False
            chunk, size = [], 0
        chunk.append(entry)
        size += cost
    yield chunk, True


class ServiceStats:
    """Counters of the requests and watch streams of both protocols, read by the metrics at scrape time."""

    def __init__(self) -> None:
        #: Get/List/Watch requests by (method, outcome): ``ok`` or a :class:`Refusal` value.
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.open: collections.Counter[str] = collections.Counter()
        self.opened: collections.Counter[str] = collections.Counter()
        #: Changes written to streams, by protocol.
        self.sent: collections.Counter[str] = collections.Counter()
        self.resyncs: collections.Counter[str] = collections.Counter()
        self.cuts: collections.Counter[str] = collections.Counter()
        #: Streams ended because their client did not drain a resync within the grace period.
        self.interrupted: collections.Counter[str] = collections.Counter()


class StreamSlots:
    """Open watch streams per token tenant, bounded: one tenant cannot take the server's streams."""

    def __init__(self, per_tenant: int) -> None:
        self._per_tenant = per_tenant
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        count = self._open.get(tenant, 0)
        if count >= self._per_tenant:
            raise Refused(
                Refusal.EXHAUSTED,
                f"tenant {tenant!r} has {count} watch streams open, the most one tenant may hold; close one first",
                retry_after=5,
            )
        self._open[tenant] = count + 1

    def release(self, tenant: str) -> None:
        count = self._open.get(tenant, 0) - 1
        if count > 0:
            self._open[tenant] = count
        else:
            self._open.pop(tenant, None)


class WatchSession:
    """An open watch stream: its registration, its frames and its bounds.

    Create it with :meth:`open` (which takes the caller's stream slot and registers the
    watcher), iterate :meth:`frames`, write each inside :meth:`writing`, and :meth:`close`
    it in a ``finally``.
    """

    def __init__(
        self,
        state: ConfigState,
        opening: Opening,
        *,
        caller: Caller,
        slots: StreamSlots,
        settings: ConfigServerSettings,
        stats: ServiceStats,
        protocol: str,
        since: int | None,
    ) -> None:
        self._state = state
        self._opening = opening
        self._caller = caller
        self._slots = slots
        self._settings = settings
        self._stats = stats
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._watcher = opening.watcher if not isinstance(opening, HistoryTooShort) else None
        self._floor = since or 0
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: The stream's task was cancelled because its client did not drain a write in time.
        self.interrupted = False
        if self._watcher is not None:
            self._watcher.on_cut = self._on_cut
        stats.open[protocol] += 1
        stats.opened[protocol] += 1

    @classmethod
    def open(
        cls,
        state: ConfigState,
        *,
        caller: Caller,
        prefixes: tuple[str, ...],
        since: int | None,
        slots: StreamSlots,
        settings: ConfigServerSettings,
        stats: ServiceStats,
        protocol: str,
    ) -> WatchSession:
        """Register a watch for ``caller``; :class:`Refused` when not ready or past the tenant's streams."""
        if not state.ready:
            raise not_ready()
        slots.acquire(caller.tenant)
        tenant = None if caller.all_tenants else caller.tenant
        try:
            opening = state.open(tenant, prefixes, since=since, bound=settings.watcher_queue_size)
        except BaseException:
            slots.release(caller.tenant)
            raise
        return cls(
            state,
            opening,
            caller=caller,
            slots=slots,
            settings=settings,
            stats=stats,
            protocol=protocol,
            since=since,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._state.close(self._watcher)
            self._watcher.on_cut = None
        self._slots.release(self._caller.tenant)
        self._stats.open[self._protocol] -= 1

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Wrap each write: a cut watcher's write that does not complete in the grace period is interrupted."""
        self._writing = True
        if self._watcher is not None and self._watcher.cut:
            self._arm()
        try:
            yield
        finally:
            self._writing = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def sent(self, frame: Frame) -> None:
        if isinstance(frame, Entry):
            self._stats.sent[self._protocol] += 1

    async def frames(self, *, keepalive_seconds: float | None = None) -> AsyncGenerator[Frame, None]:
        """The stream's frames; with ``keepalive_seconds``, :data:`KEEPALIVE` after that long without one."""
        opening = self._opening
        if isinstance(opening, HistoryTooShort):
            self._stats.resyncs[HISTORY_TOO_SHORT] += 1
            yield ResyncFrame(
                HISTORY_TOO_SHORT,
                opening.oldest_position,
                f"the server's history starts after that position; watch again without since "
                f"(a new snapshot), or from at least {opening.oldest_position}",
            )
            return
        watcher = opening.watcher
        settings = self._settings
        if isinstance(opening, SnapshotOpening):
            self._floor = opening.position
            for chunk, done in _chunks(opening.entries, settings.snapshot_chunk_size, settings.snapshot_chunk_bytes):
                if watcher.cut:
                    break
                yield SnapshotFrame(chunk, opening.position, done=done)
        else:
            assert isinstance(opening, ResumeOpening)
            self._floor = opening.position
            for entry in opening.backlog:
                if watcher.cut:
                    break
                yield entry
            if not watcher.cut:
                yield self._progress(opening.position)

        loop = self._loop
        interval = settings.progress_interval_seconds
        jitter = settings.stream_lifetime_jitter
        end = loop.time() + settings.stream_lifetime_seconds * random.uniform(1 - jitter, 1 + jitter)
        next_progress = loop.time() + interval
        quiet = keepalive_seconds if keepalive_seconds is not None else float("inf")
        last = loop.time()
        while True:
            if watcher.cut:
                yield self._too_slow()
                return
            now = loop.time()
            ending = watcher.closed or now >= end
            if ending or now >= next_progress:
                # Everything the state applied up to ``position`` that this watcher wants is
                # queued now: send that much, then say so.
                position = max(self._floor, self._state.position)
                for _ in range(len(watcher)):
                    if watcher.cut or not len(watcher):
                        break
                    yield watcher.pop()
                if watcher.cut:
                    continue
                yield self._progress(position)
                if ending:
                    return
                last = loop.time()
                next_progress = last + interval
                continue
            if len(watcher):
                yield watcher.pop()
                last = loop.time()
                continue
            if now >= last + quiet:
                yield KEEPALIVE
                last = loop.time()
                continue
            await watcher.wait(loop, min(next_progress, end, last + quiet))

    def _progress(self, position: int) -> ProgressFrame:
        return ProgressFrame(position, datetime.now(UTC), self._state.source_lag_ms())

    def _too_slow(self) -> ResyncFrame:
        self._stats.resyncs[TOO_SLOW] += 1
        return ResyncFrame(
            TOO_SLOW,
            self._state.oldest_position,
            f"this watcher let {self._settings.watcher_queue_size} changes wait unread; watch again without since",
        )

    def _on_cut(self) -> None:
        self._stats.cuts[self._protocol] += 1
        if self._writing:
            self._arm()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._settings.cut_grace_seconds, self._interrupt)

    def _interrupt(self) -> None:
        self._timer = None
        if self._writing and self._task is not None and not self._closed:
            self.interrupted = True
            self._stats.interrupted[self._protocol] += 1
            self._task.cancel()
