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

DynamoDB: zero-downtime rebuild
-------------------------------
A full replay of a tag stored in DynamoDB (no ``tenant`` or ``since`` filter, every tag of
that table selected) never touches the live table:

1. create a fresh table ``<logical>-<generation>``; the live consumer keeps writing the
   current one (conditionally), and readers keep reading it;
2. read the snapshot and write each key's final state into the fresh table with
   unconditional ``BatchWriteItem`` (safe: nobody else writes that table yet);
3. catch up once (conditionally, into the fresh table) with what committed since the
   snapshot, so that readers switched over see no older values than before;
4. switch the alias (:class:`~projections.stores.dynamodb.TableAlias`) with one conditional
   ``PutItem``: readers and consumers follow within the alias TTL;
5. wait out that TTL (``switch_wait``): from then on every writer resolves the fresh table;
6. catch up again from the mark of step 3, conditionally, into the fresh table. An update
   the live consumer put into the old table before it noticed the switch was committed
   before this pass's snapshot, so this pass carries it over; an update committed after the
   snapshot is applied by the consumer after step 5, hence into the fresh table. Nothing is
   lost, and the conditional writes let the consumer and the catch-up meet in any order;
7. after ``drop_after`` seconds (the grace period for slow readers), drop the old table.

Anything narrower (``--tenant``, ``--since``, a tag sharing its table with unselected tags)
is applied *in place*: conditionally, through the store's normal ``apply``, next to the live
consumer — it can only add versions the table lacks, never go backwards.

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
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import sql

from kernel.envelope import CONFIG_TYPES, StoredEvent
from projections.errors import ProjectionError, StoreError
from projections.model import ConfigChange
from projections.router import TagRouter
from projections.stores.base import ConfigStore, Outcome
from projections.stores.botocore_errors import error_code, translate
from projections.stores.dynamodb import ALIAS_TTL, BATCH_WRITE_MAX, AliasTarget, DynamoDBConfigStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

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
    """A DynamoDB table rebuilt and switched to."""

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
    expected: AliasTarget | None = None
    new_table: str | None = None
    writer: ConfigStore | None = None  # where catch-ups go: the fresh table, or the store itself
    switched: bool = False


class ReplayRunner:
    """Rebuilds the read models of a :class:`TagRouter` from the events table.

    ``rebuild``: ``None`` rebuilds DynamoDB tables into a fresh generation whenever the
    filter allows it (see the module docstring), ``False`` always applies in place, ``True``
    insists (``ValueError`` if the filter does not allow it). ``switch_wait`` must be at
    least the alias TTL of every reader and writer; ``drop_after`` (seconds after the
    switch) removes the old table, ``None`` keeps it.
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
        switch_wait: float = 2 * ALIAS_TTL + 0.5,
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
                    self._prepare_generation(target)
            return self._run(targets, selection, started, report)
        except BaseException:
            # A fresh table nobody was switched to is garbage: remove it.
            for target in targets:
                if target.new_table is not None and not target.switched:
                    with contextlib.suppress(BotoCoreError, ClientError):
                        _client(target.store).delete_table(TableName=target.new_table)
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
            self._sleep(self._switch_wait)
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
            can = isinstance(store, DynamoDBConfigStore) and store.alias is not None and full
            if self._rebuild is True and not can:
                raise ValueError(
                    f"cannot rebuild the store of {tag!r} into a fresh table: only a full replay "
                    "(no tenant or since, every tag of the table) of an aliased DynamoDB table can"
                )
            target.rebuild = can and self._rebuild is not False
        return list(by_store.values())

    def _prepare_generation(self, target: _Target) -> None:
        store = target.store
        assert isinstance(store, DynamoDBConfigStore) and store.alias is not None
        store.alias.ensure_table()
        expected = store.alias.read()
        client = _client(store)
        generation = expected.generation + 1
        # A table of a crashed or concurrent replay may hold the next name: take a free one
        # (two replays that race still cannot both switch: the switch is conditional).
        while _table_exists(client, f"{store.table_name}-{generation}"):
            generation += 1
        target.expected = expected
        target.new_table = f"{store.table_name}-{generation}"
        store.ensure_table(table=target.new_table)
        target.writer = store.bound_to(target.new_table)

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
        store = target.store
        assert isinstance(store, DynamoDBConfigStore) and target.new_table is not None
        table = target.new_table
        # Small enough chunks that every thread gets work, whole requests of 25 each.
        per_thread = -(-len(changes) // (self._write_concurrency * 4))
        size = max(BATCH_WRITE_MAX, min(self._write_chunk, -(-per_thread // BATCH_WRITE_MAX) * BATCH_WRITE_MAX))
        chunks = [changes[i : i + size] for i in range(0, len(changes), size)]
        done = 0
        with ThreadPoolExecutor(self._write_concurrency, thread_name_prefix="replay-write") as pool:
            for count in pool.map(lambda chunk: store.bulk_put(chunk, table=table), chunks):
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
                applied += self._apply(target.writer or target.store, changes, lambda _: None)[0]
        return tail.events_read, applied, mark

    # -- switching ---------------------------------------------------------------------

    def _switch(self, target: _Target) -> TableSwitch:
        store = target.store
        assert isinstance(store, DynamoDBConfigStore) and store.alias is not None
        assert target.expected is not None and target.new_table is not None
        generation = int(target.new_table.rsplit("-", 1)[1])
        store.alias.switch(target.expected, target.new_table, generation)
        target.switched = True
        return TableSwitch(store.table_name, target.expected.table, target.new_table, generation, old_dropped=False)

    def _drop_old(self, target: _Target, switch: TableSwitch) -> TableSwitch:
        store = target.store
        try:
            _client(store).delete_table(TableName=switch.old_table)
        except ClientError as e:
            if error_code(e) != "ResourceNotFoundException":
                raise translate(e, store="dynamodb", operation="DeleteTable") from e
        except BotoCoreError as e:
            raise translate(e, store="dynamodb", operation="DeleteTable") from e
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


def _client(store: ConfigStore) -> DynamoDBClient:
    assert isinstance(store, DynamoDBConfigStore)
    return store.client


def _table_exists(client: DynamoDBClient, name: str) -> bool:
    try:
        client.describe_table(TableName=name)
    except ClientError as e:
        if error_code(e) == "ResourceNotFoundException":
            return False
        raise translate(e, store="dynamodb", operation="DescribeTable") from e
    except BotoCoreError as e:
        raise translate(e, store="dynamodb", operation="DescribeTable") from e
    return True
