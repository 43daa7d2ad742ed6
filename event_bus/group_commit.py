"""Group commit: concurrent single-event requests share one transaction and one WAL flush.

Each waiting request is answered only after the transaction holding its event committed
(``synchronous_commit`` stays on).

A group costs two statements whatever its size: one upsert of the touched streams' versions
and one COPY of all rows (``write_new``). Events with an ``expectedversion`` are checked one
statement each, in psycopg's pipeline mode; a stale ``expectedversion`` simply inserts no row.

Ids are not looked up first: a repeated id (a producer's retry) fails the COPY on
``event_keys``' unique index, and the group is written again after one look-up of its ids,
which answers the repeats from their stored rows. Done first, the look-up was a large share of
the database's work per event and almost always found nothing (``docs/benchmarks.md``).

What can still abort that second attempt — a concurrent repeat of the same id committed by
another group in between, or a deadlock — sends each of its requests down the
one-transaction-per-request path of :meth:`EventStore.append`, which is slower but settles
every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import PoolTimeout

from event_bus.store import (
    CURRENT_VERSION,
    AppendResult,
    EventStore,
    IdConflict,
    StoreUnavailable,
    VersionConflict,
    append_statement,
    find_existing,
    no_partition,
    repeat_result,
    write_new,
)
from event_bus.validation import NewEvent


@dataclass(eq=False)
class _Pending:
    event: NewEvent
    future: asyncio.Future[AppendResult]
    done: bool = field(default=False)
    enqueued: float = field(default_factory=time.monotonic)

    def settle(self, outcome: AppendResult | Exception) -> None:
        if self.done or self.future.done():
            return
        self.done = True
        if isinstance(outcome, Exception):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


class GroupCommitter:
    """Collects single-event appends and commits them together.

    ``workers`` groups may be in flight at once (each on its own connection), and a group
    takes at most ``max_group`` waiting requests. ``max_waiting`` bounds the queue: past
    it, requests are refused at once with :class:`StoreUnavailable` (the app answers 503)
    instead of waiting towards a timeout. ``max_delay`` bounds the wait itself: a request
    that waited longer for its group is refused unwritten, and while the last group taken
    had waited that long, new requests are refused at once (a queue that has been late
    stays late until it drains: admitting more only makes everyone wait past their timeout).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        workers: int = 4,
        max_group: int = 256,
        max_waiting: int = 4_096,
        max_delay: float = 1.0,
        on_commit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._max_delay = max_delay
        self._clock = clock
        #: How long the requests of the last group taken had waited, at most.
        self._lag = 0.0
        self._workers = workers
        self._max_group = max_group
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_waiting)
        self._tasks: list[asyncio.Task[None]] = []
        self._on_commit = on_commit or (lambda _: None)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"group-commit-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            self._queue.get_nowait().settle(StoreUnavailable("the bus is shutting down"))

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    async def append(self, event: NewEvent) -> AppendResult:
        """Append one event; returns after the transaction holding it committed."""
        if self._lag > self._max_delay and not self._queue.empty():
            raise StoreUnavailable(f"requests wait over {self._max_delay:g}s for the database")
        pending = _Pending(event, asyncio.get_running_loop().create_future(), enqueued=self._clock())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise StoreUnavailable("too many requests waiting for the database") from None
        return await pending.future

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            while len(group) < self._max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
            group = self._shed_late(group)
            if not group:
                continue
            try:
                await self._commit_group(group)
            except asyncio.CancelledError:
                for pending in group:
                    pending.settle(StoreUnavailable("the bus is shutting down"))
                raise
            except Exception as e:  # never leave a request hanging, whatever happened
                for pending in group:
                    pending.settle(e if isinstance(e, StoreUnavailable) else StoreUnavailable(str(e)))

    def _shed_late(self, group: list[_Pending]) -> list[_Pending]:
        """Refuse (unwritten) the requests that waited past ``max_delay``; the rest go on."""
        now = self._clock()
        self._lag = now - min(p.enqueued for p in group)
        if self._lag <= self._max_delay:
            return group
        keep = []
        for pending in group:
            if now - pending.enqueued > self._max_delay:
                pending.settle(StoreUnavailable(f"waited over {self._max_delay:g}s for the database"))
            else:
                keep.append(pending)
        return keep

    async def _commit_group(self, group: list[_Pending]) -> None:
        # Two requests with one id in one group would collide on the unique index: the
        # later ones wait for the next group, where they are answered as repeats.
        seen: set[tuple[str, str]] = set()
        now: list[_Pending] = []
        later: list[_Pending] = []
        for pending in group:
            key = (pending.event.tenant, pending.event.id)
            (later if key in seen else now).append(pending)
            seen.add(key)
        for pending in later:
            self._queue.put_nowait(pending)
        # Optimistic first: new ids are the rule, so the group is written without looking its
        # ids up. A repeat among them fails the COPY on event_keys' unique index; the group is
        # then written again with the look-up, which answers repeats from their stored rows.
        for look_up in (False, True):
            try:
                await self._write(now, look_up=look_up)
                return
            except psycopg.errors.UniqueViolation:
                continue
            except psycopg.errors.DeadlockDetected:
                break
            except psycopg.errors.CheckViolation as e:
                raise no_partition(e) from e
            except PoolTimeout as e:
                raise StoreUnavailable("no database connection available in time") from e
            except psycopg.OperationalError as e:
                raise StoreUnavailable("the database is unreachable") from e
        # A concurrent writer committed one of the ids after the look-up, or two groups
        # deadlocked: one transaction per request settles every case.
        for pending in now:
            await self._append_alone(pending)

    async def _write(self, group: list[_Pending], *, look_up: bool) -> None:
        conflicts: list[_Pending] = []
        written: list[tuple[_Pending, AppendResult]] = []
        async with self._store.connection() as conn:
            async with conn.transaction():
                existing = await find_existing(conn, [p.event for p in group]) if look_up else {}
                plain: list[_Pending] = []
                guarded: list[_Pending] = []
                for pending in group:
                    found = existing.get((pending.event.tenant, pending.event.id))
                    if found is None:
                        (plain if pending.event.expected_version is None else guarded).append(pending)
                    else:
                        _settle_repeat(pending, found)
                if plain:
                    results = await write_new(conn, [p.event for p in plain])
                    written.extend(zip(plain, results, strict=True))
                # Events with an expected version are checked one by one, in pipeline mode.
                if guarded:
                    async with conn.pipeline():
                        cursors = [await conn.execute(*append_statement(p.event)) for p in guarded]
                        for pending, cur in zip(guarded, cursors, strict=True):
                            row = await cur.fetchone()
                            if row is None:
                                conflicts.append(pending)
                            else:
                                e = pending.event
                                written.append((pending, AppendResult(e.id, e.tenant, e.stream, row[0], row[1], True)))
            # Committed: only now may the requests be answered.
            self._on_commit(len(written))
            for pending, result in written:
                pending.settle(result)
            if conflicts:
                await self._settle_conflicts(conn, conflicts)

    @staticmethod
    async def _settle_conflicts(conn: psycopg.AsyncConnection[Any], conflicts: list[_Pending]) -> None:
        """Answer the events whose expected version was stale: repeats from their stored rows, the rest 409.

        A producer's retry of an event with ``expectedversion`` finds the stream already past
        that version (its first attempt moved it there); without a look-up first, it shows up
        here rather than on the unique index.
        """
        existing = await find_existing(conn, [p.event for p in conflicts])
        for pending in conflicts:
            e = pending.event
            found = existing.get((e.tenant, e.id))
            if found is not None:
                _settle_repeat(pending, found)
                continue
            cur = await conn.execute(CURRENT_VERSION, (e.tenant, e.stream))
            current = await cur.fetchone()
            pending.settle(VersionConflict(0, e.stream, e.expected_version or 0, int(current[0]) if current else 0))
        await conn.rollback()

    async def _append_alone(self, pending: _Pending) -> None:
        if pending.done:
            return
        try:
            [result] = await self._store.append([pending.event])
        except Exception as e:
            pending.settle(e)
        else:
            pending.settle(result)


def _settle_repeat(pending: _Pending, found: TupleRow) -> None:
    """Answer an id stored already (``found``: a :func:`find_existing` row) as :func:`repeat_result` does."""
    try:
        pending.settle(repeat_result(0, pending.event, found[2:6]))
    except IdConflict as conflict:
        pending.settle(conflict)
