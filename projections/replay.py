"""Replay: rebuild the config read models straight from the events table.

:class:`ReplayRunner` streams the ``config.*`` events of the events table through a
server-side cursor, keeps only each ``(tenant, key)``'s final state in memory (memory grows
with keys, never with events), then writes those final states through the stores, using
the same projection code as the consumer (:meth:`ConfigChange.from_event`, the tag router's
stores).

Why ``ORDER BY id`` is safe although ``id`` order is insert order, not commit order
-----------------------------------------------------------------------------------
The identity ``id`` is drawn at insert time, so two transactions can commit in the opposite
order of their ids. A relay that *polls* by id would skip the lower id when it commits late;
the replay does not poll. It reads one ``REPEATABLE READ`` snapshot, and within it every
row is there or not, whatever its id. Order only matters between events of one key, and the
coalescer keeps each key's *highest version*, not its last row, so the final state does not
depend on the order rows arrive in. (Besides, a key's versions are assigned under its
stream's row lock, held until commit, so one key's ids do increase with its versions.)

What the snapshot misses is the work of the *catch-up* passes (below): everything that was
not yet committed when the snapshot was taken, which is not the same as ``id > max id read``.
A transaction can draw an id below that maximum and commit after the snapshot. Every such
transaction was still running at the snapshot, so its transaction id is at least the
snapshot's ``xmin``; the catch-up therefore takes ``id > max_id OR xmin is not older than
snapshot.xmin``. Taking a few events twice is harmless: catch-ups write conditionally.

Poison events: the live consumer dead-letters a config event it cannot project and keeps
the key's previous valid state. The replay does the same: when a key's highest version is
malformed (or of an unregistered tag), it falls back to the key's highest *valid* version
(looked up in the same snapshot) and counts the event in ``failed``.

Zero-downtime rebuild (DynamoDB)
--------------------------------
A store that is :class:`~projections.stores.base.Rebuildable` (an aliased DynamoDB table, or
the in-memory store) is rebuilt into a fresh copy when the replay is full (no ``tenant`` or
``since`` filter, every tag of that store selected). The replay only speaks to the port: a
:class:`~projections.stores.base.Generation` is the fresh copy. For DynamoDB:

1. ``new_generation`` creates a fresh table ``<logical>-<generation>``; the live consumer
   keeps writing the current one (conditionally), and readers keep reading it;
2. read the snapshot and ``bulk_put`` each key's final state into the fresh table,
   unconditionally (safe: nobody else writes that table yet);
3. catch up once (conditionally, through the generation's ``writer``) with what committed
   since the snapshot, so that readers switched over see no older values than before;
4. ``switch``: one conditional ``PutItem`` on the alias
   (:class:`~projections.stores.dynamodb.TableAlias`); readers and consumers follow within
   the alias TTL;
5. wait out that TTL (``switch_wait``, by default the generation's ``settle_seconds``): from
   then on every writer resolves the fresh table;
6. catch up again from the mark of step 3, conditionally, into the fresh table. An update
   the live consumer put into the old table before it noticed the switch was committed
   before this pass's snapshot, so this pass carries it over; an update committed after the
   snapshot is applied by the consumer after step 5, hence into the fresh table. Nothing is
   lost, and the conditional writes let the consumer and the catch-up meet in any order;
7. after ``drop_after`` seconds (the grace period for slow readers), ``drop_previous``
   removes the old table. A replay that fails before its switch removes the fresh one
   (``discard``).

Anything narrower (``--tenant``, ``--since``, a tag sharing its store with unselected tags),
and any store that cannot be rebuilt, is applied *in place*: conditionally, through the
store's normal ``apply``, next to the live consumer — it can only add versions the store
lacks, never go backwards.

SSM: no alias. The final states go through :meth:`SSMConfigStore.apply`, the normal
read-compare-write (one read per ten keys, a write only for newer versions). SSM has no
conditional put, so a consumer writing a key between the replay's read and write could be
overwritten by an older state; the catch-up pass re-applies every event committed since the
snapshot and repairs that. The remaining race (with the catch-up's own writes) is as narrow
as one request; for strict guarantees, replay SSM while the consumers are stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from kernel.envelope import CONFIG_TYPES, StoredEvent
from projections.errors import ProjectionError, StoreError
from projections.model import ConfigChange
from projections.router import TagRouter
from projections.stores.base import ConfigStore, Generation, GenerationSwitch, Outcome, Rebuildable

_COLUMNS = ("id", "tenant_id", "stream_id", "version", "event_id", "type", "source", "recorded_at")
# Row layout: the columns above, then data as JSON text (parsed for final states only).
_ID, _TENANT, _STREAM, _VERSION, _EVENT_ID, _TYPE, _SOURCE, _RECORDED_AT, _DATA = range(9)

#: The snapshot's mark: its xmin (as a 32-bit xid) and the highest id it holds.
SNAPSHOT_MARK = sql.SQL("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, coalesce(max(id), 0) FROM events")
#: Rows not in a snapshot taken earlier: a later id, or a transaction not older than its xmin
#: (``age`` is computed against one stable xid within a transaction, and is maximal for
#: frozen rows, which are old by definition).
_AFTER_MARK = sql.SQL("(id > %(mark_id)s OR age(xmin) <= age(%(mark_xmin)s::text::xid))")

Row = tuple[Any, ...]
ProgressCallback = Callable[["ReplayProgress"], None]


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which events a replay takes: one tenant, one tag, events recorded since a moment."""

    tenant: str | None = None
    tag: str | None = None
    since: datetime | None = None

    def where(self) -> tuple[sql.Composable, dict[str, Any]]:
        clauses: list[sql.Composable] = [sql.SQL("type = ANY(%(types)s)")]
        params: dict[str, Any] = {"types": sorted(CONFIG_TYPES)}
        if self.tenant is not None:
            clauses.append(sql.SQL("tenant_id = %(tenant)s"))
            params["tenant"] = self.tenant
        if self.tag is not None:
            # A config event's stream is its key, "<tag>:<path>".
            clauses.append(sql.SQL("starts_with(stream_id, %(tag_prefix)s)"))
            params["tag_prefix"] = f"{self.tag}:"
        if self.since is not None:
            if self.since.tzinfo is None:
                raise ValueError("since must be timezone-aware")
            clauses.append(sql.SQL("recorded_at >= %(since)s"))
            params["since"] = self.since
        return sql.SQL(" AND ").join(clauses), params


@dataclass(frozen=True, slots=True)
class SnapshotMark:
    """What a snapshot held: everything up to ``max_id`` of transactions older than ``xmin``."""

    xmin: int
    max_id: int


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    """Where a replay is; ``phase`` is ``read``, ``write``, ``catch-up``, ``switch`` or ``done``."""

    phase: str
    events_read: int
    keys: int
    #: ids of the snapshot being read: a progress bar can go from ``min_id`` to ``max_id``.
    last_id: int = 0
    min_id: int = 0
    max_id: int = 0
    keys_written: int = 0
    keys_total: int = 0


@dataclass(frozen=True, slots=True)
class ReplayFailure:
    """A config event the replay could not project (the consumer dead-lettered it too)."""

    tenant: str
    event_id: str
    error: str


@dataclass(frozen=True, slots=True)
class TableSwitch:
    """A store rebuilt and switched to: its logical name, the copies (tables) before and after."""

    alias: str
    old_table: str
    new_table: str
    generation: int
    old_dropped: bool


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay did, for the CLI's summary and the benchmark."""

    events_read: int
    keys: int
    keys_written: int
    stale: int
    tombstones: int
    failed: int
    catch_up_events: int
    catch_up_applied: int
    seconds: float
    read_seconds: float
    write_seconds: float
    switches: tuple[TableSwitch, ...] = ()
    failures: tuple[ReplayFailure, ...] = ()

    @property
    def events_per_second(self) -> float:
        return self.events_read / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Coalesced:
    """Final states of one pass: per ``(tenant, key)``, the winning change."""

    changes: dict[tuple[str, str], ConfigChange] = field(default_factory=dict)
    events_read: int = 0
    failures: list[ReplayFailure] = field(default_factory=list)
    failed: int = 0


@dataclass
class _Target:
    """One store of the selection, and how the replay writes it."""

    store: ConfigStore
    tags: frozenset[str]
    rebuild: bool
    generation: Generation | None = None
    switched: bool = False

    @property
    def writer(self) -> ConfigStore:
        """Where catch-ups go: the fresh copy being rebuilt, or the store itself."""
        return self.generation.writer if self.generation is not None else self.store


class ReplayRunner:
    """Rebuilds the read models of a :class:`TagRouter` from the events table.

    ``rebuild``: ``None`` rebuilds every :class:`~projections.stores.base.Rebuildable` store
    into a fresh generation whenever the filter allows it (see the module docstring),
    ``False`` always applies in place, ``True`` insists (``ValueError`` if the filter or a
    store does not allow it). ``switch_wait`` must be at least the alias TTL of every reader
    and writer (``None``: the longest ``settle_seconds`` of the generations); ``drop_after``
    (seconds after the switch) removes the old copy, ``None`` keeps it.
    """

    def __init__(
        self,
        database_url: str,
        router: TagRouter,
        *,
        rebuild: bool | None = None,
        fetch_size: int = 20_000,
        write_chunk: int = 500,
        write_concurrency: int = 4,
        switch_wait: float | None = None,
        drop_after: float | None = 30.0,
        max_failures_kept: int = 100,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database_url = database_url
        self._router = router
        self._rebuild = rebuild
        self._fetch_size = fetch_size
        self._write_chunk = write_chunk
        self._write_concurrency = max(1, write_concurrency)
        self._switch_wait = switch_wait
        self._drop_after = drop_after
        self._max_failures_kept = max_failures_kept
        self._sleep = sleep
        self._monotonic = monotonic

    # -- entry point -------------------------------------------------------------------

    def run(
        self,
        *,
        tenant: str | None = None,
        tag: str | None = None,
        since: datetime | None = None,
        progress: ProgressCallback | None = None,
    ) -> ReplaySummary:
        """Replay the selected events; returns the summary. Store errors are raised, not skipped."""
        report = progress or (lambda _: None)
        selection = ReplayFilter(tenant, tag, since)
        if tag is not None:
            self._router.store_for(tag)  # UnknownTag before any work
        started = self._monotonic()
        targets = self._targets(selection)
        try:
            for target in targets:
                if target.rebuild:
                    assert isinstance(target.store, Rebuildable)
                    target.generation = target.store.new_generation()
            return self._run(targets, selection, started, report)
        except BaseException:
            # A fresh copy nobody was switched to is garbage: remove it.
            for target in targets:
                if target.generation is not None and not target.switched:
                    with contextlib.suppress(StoreError):
                        target.generation.discard()
            raise

    def _run(
        self, targets: list[_Target], selection: ReplayFilter, started: float, report: ProgressCallback
    ) -> ReplaySummary:
        """Read, write, catch up and switch (the steps of the module docstring)."""
        with self._connect() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            mark = self._mark(conn)
            bounds = conn.execute(
                sql.SQL("SELECT coalesce(min(id), 0) FROM events WHERE id <= %s"), (mark.max_id,)
            ).fetchone()
            min_id = int(bounds[0]) if bounds else 0
            state = self._read(conn, selection, None, report, min_id=min_id, max_id=mark.max_id)
            conn.execute("COMMIT")
        read_done = self._monotonic()

        written = stale = tombstones = 0
        total = len(state.changes)
        for target in targets:
            changes = [c for c in state.changes.values() if c.key.tag in target.tags]
            tombstones += sum(1 for c in changes if c.deleted)

            def on_write(n: int, done: int = written) -> None:
                report(ReplayProgress("write", state.events_read, total, keys_written=done + n, keys_total=total))

            if target.rebuild:
                written += self._bulk_load(target, changes, on_write)
            else:
                applied, stale_here = self._apply(target.store, changes, on_write)
                written += applied
                stale += stale_here
        write_done = self._monotonic()

        catch_up_events = catch_up_applied = 0
        switches: list[TableSwitch] = []
        switched_at = 0.0
        rebuilt = [t for t in targets if t.rebuild]
        if rebuilt:
            # Before the switch: readers of the fresh table must not see older values than before.
            events, applied, mark = self._catch_up(targets, selection, mark, state, report)
            catch_up_events += events
            catch_up_applied += applied
            for target in rebuilt:
                switches.append(self._switch(target))
            report(ReplayProgress("switch", state.events_read, total, keys_written=written, keys_total=total))
            switched_at = self._monotonic()
            self._sleep(self._settle(rebuilt))
        events, applied, _ = self._catch_up(targets, selection, mark, state, report)
        catch_up_events += events
        catch_up_applied += applied
        if rebuilt and self._drop_after is not None:
            self._sleep(max(0.0, self._drop_after - (self._monotonic() - switched_at)))
            switches = [self._drop_old(target, switch) for target, switch in zip(rebuilt, switches, strict=True)]

        finished = self._monotonic()
        report(ReplayProgress("done", state.events_read, total, keys_written=written, keys_total=total))
        return ReplaySummary(
            events_read=state.events_read,
            keys=total,
            keys_written=written,
            stale=stale,
            tombstones=tombstones,
            failed=state.failed,
            catch_up_events=catch_up_events,
            catch_up_applied=catch_up_applied,
            seconds=finished - started,
            read_seconds=read_done - started,
            write_seconds=write_done - read_done,
            switches=tuple(switches),
            failures=tuple(state.failures),
        )

    # -- planning ----------------------------------------------------------------------

    def _targets(self, selection: ReplayFilter) -> list[_Target]:
        tags = sorted(self._router.registered_tags)
        selected = [t for t in tags if selection.tag is None or t == selection.tag]
        by_store: dict[int, _Target] = {}
        for tag in selected:
            store = self._router.store_for(tag)
            served = frozenset(t for t in tags if self._router.store_for(t) is store)
            target = by_store.get(id(store))
            if target is None:
                target = by_store[id(store)] = _Target(store, frozenset(), rebuild=False)
            target.tags |= {tag}
            full = selection.tenant is None and selection.since is None and served <= set(selected)
            can = isinstance(store, Rebuildable) and store.can_rebuild and full
            if self._rebuild is True and not can:
                raise ValueError(
                    f"cannot rebuild the store of {tag!r} into a fresh copy: only a full replay "
                    "(no tenant or since, every tag of the store) of a rebuildable store (an aliased "
                    "DynamoDB table) can"
                )
            target.rebuild = can and self._rebuild is not False
        return list(by_store.values())

    # -- reading -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(self._database_url, autocommit=True) as conn:
            yield conn

    def _mark(self, conn: psycopg.Connection[Any]) -> SnapshotMark:
        row = conn.execute(SNAPSHOT_MARK).fetchone()
        assert row is not None
        return SnapshotMark(xmin=int(row[0]) % 2**32, max_id=int(row[1]))

    def _read(
        self,
        conn: psycopg.Connection[Any],
        selection: ReplayFilter,
        after: SnapshotMark | None,
        report: ProgressCallback,
        *,
        min_id: int,
        max_id: int,
    ) -> _Coalesced:
        """Stream the selected events in id order and keep each key's highest version."""
        where, params = selection.where()
        if after is not None:
            where = sql.SQL("{} AND {}").format(where, _AFTER_MARK)
            params |= {"mark_id": after.max_id, "mark_xmin": str(after.xmin)}
        query = sql.SQL("SELECT {}, data::text FROM events WHERE {} ORDER BY id").format(
            sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)), where
        )
        winners: dict[tuple[str, str], Row] = {}
        read = 0
        with conn.cursor(name="tagbus_replay") as cursor:
            cursor.itersize = self._fetch_size
            cursor.execute(query, params)
            while rows := cursor.fetchmany(self._fetch_size):
                for row in rows:
                    slot = (row[_TENANT], row[_STREAM])
                    best = winners.get(slot)
                    if best is None or best[_VERSION] < row[_VERSION]:
                        winners[slot] = row
                read += len(rows)
                report(
                    ReplayProgress(
                        "read" if after is None else "catch-up",
                        read,
                        len(winners),
                        last_id=rows[-1][_ID],
                        min_id=min_id,
                        max_id=max_id,
                    )
                )
        state = _Coalesced(events_read=read)
        for row in winners.values():
            change = self._project(conn, selection, row, state)
            if change is not None:
                state.changes[(change.tenant, str(change.key))] = change
        return state

    def _project(
        self, conn: psycopg.Connection[Any], selection: ReplayFilter, row: Row, state: _Coalesced
    ) -> ConfigChange | None:
        """The change of a key's winning row; for a poison winner, of its highest valid version."""
        while True:
            try:
                change = ConfigChange.from_event(_event(row))
                if change is not None:
                    self._router.store_for(change.key.tag)
                    return change
                return None
            except (ProjectionError, ValueError) as e:
                state.failed += 1
                if len(state.failures) < self._max_failures_kept:
                    state.failures.append(ReplayFailure(row[_TENANT], row[_EVENT_ID], f"{type(e).__name__}: {e}"))
            # Same snapshot (the transaction is still open): the key's previous version.
            where, params = selection.where()
            query = sql.SQL(
                "SELECT {}, data::text FROM events WHERE {} AND tenant_id = %(t)s AND stream_id = %(s)s"
                " AND version < %(v)s ORDER BY version DESC LIMIT 1"
            ).format(sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)), where)
            params |= {"t": row[_TENANT], "s": row[_STREAM], "v": row[_VERSION]}
            previous = conn.execute(query, params).fetchone()
            if previous is None:
                return None
            row = tuple(previous)

    # -- writing -----------------------------------------------------------------------

    def _bulk_load(self, target: _Target, changes: Sequence[ConfigChange], on_write: Callable[[int], None]) -> int:
        generation = target.generation
        assert generation is not None
        # Small enough chunks that every thread gets work, made of whole requests.
        request = max(1, generation.request_size)
        per_thread = -(-len(changes) // (self._write_concurrency * 4))
        size = max(request, min(self._write_chunk, -(-per_thread // request) * request))
        chunks = [changes[i : i + size] for i in range(0, len(changes), size)]
        done = 0
        with ThreadPoolExecutor(self._write_concurrency, thread_name_prefix="replay-write") as pool:
            for count in pool.map(generation.bulk_put, chunks):
                done += count
                on_write(done)
        return done

    def _apply(
        self, store: ConfigStore, changes: Sequence[ConfigChange], on_write: Callable[[int], None]
    ) -> tuple[int, int]:
        """Conditional writes through the store's normal path; raises on the first failure."""
        applied = stale = 0
        for start in range(0, len(changes), self._write_chunk):
            result = store.apply(changes[start : start + self._write_chunk])
            for item in result.results:
                if item.outcome is Outcome.APPLIED:
                    applied += 1
                elif item.outcome is Outcome.STALE:
                    stale += 1
            if result.failed:
                first = result.failed[0]
                raise first.error or StoreError(f"{first.change.key}: failed without an error")
            on_write(applied + stale)
        return applied, stale

    def _catch_up(
        self,
        targets: Sequence[_Target],
        selection: ReplayFilter,
        since: SnapshotMark,
        state: _Coalesced,
        report: ProgressCallback,
    ) -> tuple[int, int, SnapshotMark]:
        """Apply, conditionally, what committed after ``since``; returns (events, applied, new mark)."""
        with self._connect() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            mark = self._mark(conn)
            tail = self._read(conn, selection, since, report, min_id=since.max_id, max_id=mark.max_id)
            conn.execute("COMMIT")
        state.failed += tail.failed
        state.failures.extend(tail.failures[: max(0, self._max_failures_kept - len(state.failures))])
        applied = 0
        for target in targets:
            changes = [c for c in tail.changes.values() if c.key.tag in target.tags]
            if changes:
                applied += self._apply(target.writer, changes, lambda _: None)[0]
        return tail.events_read, applied, mark

    # -- switching ---------------------------------------------------------------------

    def _switch(self, target: _Target) -> TableSwitch:
        assert target.generation is not None
        switched: GenerationSwitch = target.generation.switch()
        target.switched = True
        return TableSwitch(switched.name, switched.previous, switched.current, switched.generation, old_dropped=False)

    def _settle(self, rebuilt: Sequence[_Target]) -> float:
        """How long to wait after the switches until every reader and writer follows them."""
        if self._switch_wait is not None:
            return self._switch_wait
        return max(t.generation.settle_seconds for t in rebuilt if t.generation is not None)

    def _drop_old(self, target: _Target, switch: TableSwitch) -> TableSwitch:
        assert target.generation is not None
        target.generation.drop_previous()
        return TableSwitch(switch.alias, switch.old_table, switch.new_table, switch.generation, old_dropped=True)


def _event(row: Row) -> StoredEvent:
    data = orjson.loads(row[_DATA]) if row[_DATA] is not None else None
    return StoredEvent(
        id=row[_EVENT_ID],
        tenant=row[_TENANT],
        stream=row[_STREAM],
        version=int(row[_VERSION]),
        type=row[_TYPE],
        source=row[_SOURCE],
        recorded_at=row[_RECORDED_AT],
        data=data,
    )
