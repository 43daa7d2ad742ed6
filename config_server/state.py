"""A config server's state: every key's entry, a bounded history of changes, and the watchers.

Everything here runs on the server's event loop and takes no locks; a source, which runs in
its own thread, hands its reads over through :class:`LoopSink`, which hops onto the loop.

Entries (tombstones included) only ever move to a higher version of their key, so a snapshot
that overlaps the stream, a resend or a snapshot older than the state change nothing. Every
change that does move a key is appended to the history in the order it was applied (its
*release order*) and handed to the watchers whose tenant and prefixes match.

Resuming. With several shards a change may be released after one of a higher position, so
the history is not sorted by position; ``_reached[i]``, the state's position once entry ``i``
was applied, is. A watcher that has seen position ``S`` has seen every entry up to the one
that first brought the state to ``S`` (it learnt ``S`` from that entry, or from a snapshot or
progress message sent after it), but maybe not the late, lower-positioned entries released
after that one. So a resumed watch gets the history from the first entry whose ``_reached``
is at least ``S``: that is the suffix from the first entry *positioned* after ``S``, plus the
late entries before it that the watcher may have missed; what it had already is sent again,
which the version rule makes harmless.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from projections.model import ConfigChange

log = logging.getLogger(__name__)

#: Entries handed to the loop at once when a source loads a snapshot, so that a large one
#: does not hold the loop (and every stream on it) for the whole load.
LOAD_CHUNK = 5_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's state as served: a value (as JSON text) or a tombstone (``deleted``)."""

    tenant: str
    key: str
    #: The value as JSON text; empty on a tombstone.
    value_json: str
    version: int
    position: int
    updated_at: datetime
    deleted: bool

    @classmethod
    def of(cls, change: ConfigChange) -> Entry:
        """The entry a change leaves; ``TypeError`` for a value JSON cannot hold."""
        value_json = "" if change.deleted else orjson.dumps(change.value).decode()
        updated_at = change.updated_at if change.updated_at.tzinfo else change.updated_at.replace(tzinfo=UTC)
        return cls(
            tenant=change.tenant,
            key=str(change.key),
            value_json=value_json,
            version=change.version,
            position=change.position,
            updated_at=updated_at,
            deleted=change.deleted,
        )


def sort_key(key: str) -> tuple[str, str]:
    """Keys are ordered by tag, then path, as ``GET /v1/config`` lists them."""
    tag, _, path = key.partition(":")
    return tag, path


class Watcher:
    """One watch stream's registration: what it wants, and the changes waiting for it.

    ``tenant`` is ``None`` for a watch of every tenant. The queue is bounded: the state
    cuts a watcher whose queue is full (:attr:`cut`), drops what was waiting, and stops
    feeding it; the stream then tells its client to list again.
    """

    __slots__ = ("_bound", "_queue", "_waiter", "closed", "cut", "gate", "on_cut", "prefixes", "tenant")

    def __init__(self, tenant: str | None, prefixes: tuple[str, ...], *, bound: int, gate: int = 0) -> None:
        self.tenant = tenant
        self.prefixes = prefixes
        #: Changes are held back until the state reaches this position (a resume from a
        #: position this server has not reached yet).
        self.gate = gate
        self.cut = False
        #: Ended by the server (it is stopping): the stream says where it got to and ends.
        self.closed = False
        #: Called by the state when it cuts the watcher, on the loop.
        self.on_cut: Callable[[], None] | None = None
        self._bound = bound
        self._queue: collections.deque[Entry] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def matches(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    def __len__(self) -> int:
        return len(self._queue)

    def pop(self) -> Entry:
        return self._queue.popleft()

    def _push(self, entry: Entry) -> bool:
        if len(self._queue) >= self._bound:
            return False
        self._queue.append(entry)
        self.wake()
        return True

    def _cut(self) -> None:
        self.cut = True
        self._queue.clear()
        self.wake()
        if self.on_cut is not None:
            self.on_cut()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """Until something is queued, the watcher is cut or closed, or ``loop.time()`` reaches ``until``."""
        if self._queue or self.cut or self.closed:
            return
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(until, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class SnapshotOpening:
    """A watch without ``since``: the current entries under its prefixes, valid at ``position``."""

    watcher: Watcher
    entries: list[Entry]
    position: int


@dataclass(frozen=True, slots=True)
class ResumeOpening:
    """A watch resumed from ``since``: the changes it may lack, then the live ones."""

    watcher: Watcher
    backlog: list[Entry]
    #: What the watcher has every change up to once ``backlog`` is sent.
    position: int


@dataclass(frozen=True, slots=True)
class HistoryTooShort:
    """A watch whose ``since`` is older than the history can answer; no watcher was registered."""

    oldest_position: int


Opening = SnapshotOpening | ResumeOpening | HistoryTooShort


class _Tenant:
    """One tenant's entries, their key order, and the watchers of that tenant alone."""

    __slots__ = ("_order", "_unsorted", "entries", "watchers")

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.watchers: set[Watcher] = set()
        self._order: list[str] = []
        # New keys are sorted in when the order is next read: a snapshot load adds many at
        # once, and one sort of a sorted run plus a tail is cheaper than an insort each.
        self._unsorted: list[str] = []

    def add_key(self, key: str) -> None:
        self._unsorted.append(key)

    def order(self) -> list[str]:
        if self._unsorted:
            self._order.extend(self._unsorted)
            self._unsorted.clear()
            self._order.sort(key=sort_key)
        return self._order


@dataclass(slots=True)
class StateStats:
    """Counters of the state, read by the metrics at scrape time."""

    applied: int = 0
    #: Changes that did not move their key (resends, snapshot/stream overlaps).
    stale: int = 0
    #: Changes whose value JSON cannot hold (the read models refuse them too).
    rejected: int = 0
    #: Changes queued for watchers.
    deliveries: int = 0
    cuts: int = 0
    source_failures: int = 0


class ConfigState:
    """Entries by ``(tenant, key)``, the history of recent changes, and the watchers to feed.

    Not thread-safe: call it on the event loop only (a source goes through :class:`LoopSink`).
    """

    def __init__(self, *, history_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self._history_size = history_size
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._all_tenants: set[Watcher] = set()
        self._position = 0
        # The history: entries in release order, and the state's position after each one
        # (non-decreasing, so it can be bisected). Entries before ``_start`` are trimmed.
        self._history: list[Entry] = []
        self._reached: list[int] = []
        self._start = 0
        # Resumes from below this position cannot be answered: what came before it was
        # loaded from a snapshot or trimmed from the history.
        self._oldest = 0
        self._ready = False
        self._ready_listeners: list[Callable[[], None]] = []
        self._lag_ms = 0
        self._caught_up_at: float | None = None
        self.last_source_error: str | None = None
        self.stats = StateStats()

    # -- what a source feeds (on the loop) --------------------------------------------

    def load(self, entries: Iterable[ConfigChange]) -> None:
        """Merge a snapshot's entries by version.

        Before the server is ready nothing watches and no one can have seen these changes
        from this server, so they only raise the oldest position a resume can start from.
        Afterwards (the source had to start over), an entry that moves its key is a change
        the stream did not bring: it goes through the history to the watchers like any other.
        """
        if self._ready:
            self.apply(entries)
            return
        for change in entries:
            entry = self._merge(change)
            if entry is not None:
                self._position = max(self._position, entry.position)
                self._oldest = max(self._oldest, entry.position)

    def apply(self, changes: Iterable[ConfigChange]) -> None:
        """Apply changes in the source's order; each that moves its key is recorded and fanned out."""
        for change in changes:
            entry = self._merge(change)
            if entry is None:
                continue
            self._position = max(self._position, entry.position)
            self._record(entry)
            self._fan_out(entry)

    def caught_up(self, lag_ms: int) -> None:
        """The source has delivered what it knows of; the first call makes the server ready."""
        self._lag_ms = max(0, lag_ms)
        self._caught_up_at = self._clock()
        if not self._ready:
            self._ready = True
            log.info("config state ready at position %d (%d tenants)", self._position, len(self._tenants))
            for listener in self._ready_listeners:
                listener()

    def source_failed(self, error: Exception) -> None:
        self.stats.source_failures += 1
        self.last_source_error = f"{type(error).__name__}: {error}"
        log.warning("config source failed (it retries): %s", self.last_source_error)

    # -- reads --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def on_ready(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the loop) when the state becomes ready, or now if it is."""
        if self._ready:
            listener()
        else:
            self._ready_listeners.append(listener)

    @property
    def position(self) -> int:
        """The highest position applied: every answer reflects the changes up to it."""
        return self._position

    @property
    def oldest_position(self) -> int:
        """The lowest ``since`` a watch can still resume from."""
        return self._oldest

    @property
    def history_length(self) -> int:
        return len(self._history) - self._start

    def source_lag_ms(self) -> int:
        """How far the source is behind its head: as it last said, plus the time since it said so."""
        if self._caught_up_at is None:
            return 0
        return self._lag_ms + int((self._clock() - self._caught_up_at) * 1000)

    def get(self, tenant: str, key: str) -> Entry | None:
        """A key's current entry; ``None`` when it is absent or deleted."""
        space = self._tenants.get(tenant)
        entry = space.entries.get(key) if space is not None else None
        return None if entry is None or entry.deleted else entry

    def entry(self, tenant: str, key: str) -> Entry | None:
        """A key's current entry, tombstones included."""
        space = self._tenants.get(tenant)
        return space.entries.get(key) if space is not None else None

    def page(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None = None
    ) -> tuple[list[Entry], str | None]:
        """A tenant's live entries under ``prefix`` in key order after ``start_after``, and the next page's start.

        ``prefix`` is ``<tag>:`` and any start of a path, or the start of a tag (empty: every
        key), as :func:`kernel.keys.may_prefix_key` allows.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        space = self._tenants.get(tenant)
        if space is None:
            return [], None
        order = space.order()
        tag, sep, path = prefix.partition(":")
        # Keys under a prefix are contiguous in (tag, path) order (for a prefix without ':'
        # the tags that start with it are), and start at the first key not below it.
        lo = bisect.bisect_left(order, (tag, path) if sep else (tag, ""), key=sort_key)
        if start_after is not None:
            lo = max(lo, bisect.bisect_right(order, sort_key(start_after), key=sort_key))
        items: list[Entry] = []
        for index in range(lo, len(order)):
            key = order[index]
            if not key.startswith(prefix):
                break
            entry = space.entries[key]
            if entry.deleted:
                continue
            if len(items) == limit:
                return items, items[-1].key
            items.append(entry)
        return items, None

    def tenants(self) -> int:
        return len(self._tenants)

    # -- watchers -----------------------------------------------------------------------

    def open(self, tenant: str | None, prefixes: Sequence[str], *, since: int | None, bound: int) -> Opening:
        """Register a watcher of ``tenant`` (``None``: every tenant) under ``prefixes``.

        Without ``since`` it starts with a snapshot; with it, with the history from the
        first entry that brought the state to ``since`` (see the module's docstring), or
        with :class:`HistoryTooShort` when that lies before what the history keeps.
        Whatever is applied after this call is queued for the watcher.
        """
        unique = tuple(dict.fromkeys(prefixes))
        if since is None:
            watcher = Watcher(tenant, unique, bound=bound)
            opening: Opening = SnapshotOpening(watcher, self._snapshot(tenant, unique), self._position)
        elif since < self._oldest:
            return HistoryTooShort(self._oldest)
        else:
            watcher = Watcher(tenant, unique, bound=bound, gate=since if since > self._position else 0)
            first = bisect.bisect_left(self._reached, since, lo=self._start)
            backlog = [
                e for e in self._history[first:] if (tenant is None or e.tenant == tenant) and e.key.startswith(unique)
            ]
            opening = ResumeOpening(watcher, backlog, max(since, self._position))
        if tenant is None:
            self._all_tenants.add(watcher)
        else:
            self._space(tenant).watchers.add(watcher)
        return opening

    def close(self, watcher: Watcher) -> None:
        """Stop feeding a watcher (its stream ended); closing twice is harmless."""
        if watcher.tenant is None:
            self._all_tenants.discard(watcher)
        else:
            space = self._tenants.get(watcher.tenant)
            if space is not None:
                space.watchers.discard(watcher)

    def close_all(self) -> None:
        """Ask every stream to end (the server is stopping); they say where they got to first."""
        for watcher in self._watchers():
            watcher.closed = True
            watcher.wake()

    def watcher_count(self) -> int:
        return len(self._all_tenants) + sum(len(s.watchers) for s in self._tenants.values())

    # -- internals ----------------------------------------------------------------------

    def _space(self, tenant: str) -> _Tenant:
        space = self._tenants.get(tenant)
        if space is None:
            space = self._tenants[tenant] = _Tenant()
        return space

    def _merge(self, change: ConfigChange) -> Entry | None:
        """The change's entry if it moves its key (now stored), else ``None``."""
        space = self._space(change.tenant)
        key = str(change.key)
        current = space.entries.get(key)
        if current is not None and current.version >= change.version:
            self.stats.stale += 1
            return None
        try:
            entry = Entry.of(change)
        except TypeError as e:
            # orjson refuses it (an integer beyond 64 bits, say); the read models refuse the
            # same change, so skipping it keeps this state equal to theirs.
            self.stats.rejected += 1
            log.warning("change of %s (tenant %s, version %d) skipped: %s", key, change.tenant, change.version, e)
            return None
        if current is None:
            space.add_key(key)
        space.entries[key] = entry
        self.stats.applied += 1
        return entry

    def _record(self, entry: Entry) -> None:
        self._history.append(entry)
        self._reached.append(self._position)
        if len(self._history) - self._start > self._history_size:
            # A resume from at or below the trimmed entry's position might need it.
            self._oldest = max(self._oldest, self._reached[self._start] + 1)
            self._start += 1
            if self._start >= self._history_size:
                del self._history[: self._start]
                del self._reached[: self._start]
                self._start = 0

    def _fan_out(self, entry: Entry) -> None:
        space = self._tenants[entry.tenant]
        slow: list[Watcher] = []
        for group in (space.watchers, self._all_tenants):
            for watcher in group:
                if not entry.key.startswith(watcher.prefixes):
                    continue
                if watcher.gate:
                    if self._position < watcher.gate:
                        continue
                    watcher.gate = 0
                if watcher._push(entry):
                    self.stats.deliveries += 1
                else:
                    slow.append(watcher)
        for watcher in slow:
            self.close(watcher)
            self.stats.cuts += 1
            watcher._cut()

    def _snapshot(self, tenant: str | None, prefixes: tuple[str, ...]) -> list[Entry]:
        names = [tenant] if tenant is not None else sorted(self._tenants)
        entries: list[Entry] = []
        for name in names:
            space = self._tenants.get(name)
            if space is None:
                continue
            for key in space.order():
                if key.startswith(prefixes):
                    entry = space.entries[key]
                    if not entry.deleted:
                        entries.append(entry)
        return entries

    def _watchers(self) -> Iterator[Watcher]:
        yield from list(self._all_tenants)
        for space in self._tenants.values():
            yield from list(space.watchers)


class LoopSink:
    """The :class:`~config_server.source.ChangeSink` a source's thread calls: each call hops onto the loop.

    Calls are applied in the order they were made. At most ``max_pending`` of them wait for
    the loop at a time; past it the source's thread waits, so a source faster than the loop
    is slowed down rather than queueing without bound. After :meth:`close` calls are dropped
    (the server is stopping, and the source with it).
    """

    def __init__(self, state: ConfigState, loop: asyncio.AbstractEventLoop, *, max_pending: int = 64) -> None:
        self._state = state
        self._loop = loop
        self._slots = threading.Semaphore(max_pending)
        self._closed = threading.Event()

    def load(self, entries: Iterable[ConfigChange]) -> None:
        chunk: list[ConfigChange] = []
        for change in entries:
            chunk.append(change)
            if len(chunk) >= LOAD_CHUNK:
                self._submit(self._state.load, chunk)
                chunk = []
        if chunk:
            self._submit(self._state.load, chunk)

    def apply(self, changes: Sequence[ConfigChange]) -> None:
        if changes:
            self._submit(self._state.apply, list(changes))

    def caught_up(self, *, lag_ms: int) -> None:
        self._submit(self._state.caught_up, lag_ms)

    def source_failed(self, error: Exception) -> None:
        self._submit(self._state.source_failed, error)

    def close(self) -> None:
        self._closed.set()

    def _submit(self, method: Callable[[Any], None], argument: Any) -> None:
        while not self._slots.acquire(timeout=0.25):
            if self._closed.is_set():
                return
        if self._closed.is_set():
            self._slots.release()
            return

        def run() -> None:
            try:
                method(argument)
            finally:
                self._slots.release()

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            # The loop is closed: the server has stopped.
            self._slots.release()
            self._closed.set()
