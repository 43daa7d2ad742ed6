"""The events table as an append-only store: idempotent appends, stream versions, reads.

Commit order: versions are assigned under the row lock of the stream's row in
``streams``, which is held until the appending transaction commits, so two writers of one
stream commit in version order and the WAL (which the tailer reads) carries each stream's
events in version order; the same lock is what keeps ``(tenant_id, stream_id, version)``
unique, since the partitioned events table cannot carry that unique index.

Idempotency rests on the primary key of ``event_keys`` (tenant_id, event_id), which a
statement-level trigger fills from every insert into ``events`` in the same statement
(migration 0003): a concurrent repeat blocks on the key until the first commits, then
fails and is retried, finding the committed row. The key row also holds stream, version,
digest and the event's ``(id, recorded_at)``, so a repeat is answered from ``event_keys``
alone and ``GET /v1/events/{id}`` reads one partition.

``events`` has one partition per month and no DEFAULT partition: an insert for a month
without a partition fails, which :class:`NoPartition` (a 503) reports loudly; the bus
creates partitions months ahead (``event_bus.partitions``).

Every statement on these tables is defined here once; the group committer
(:mod:`event_bus.group_commit`) runs the same ones, and :func:`append_statement` is the
stream statement and the insert of one event joined into a single statement for its pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from event_bus.validation import NewEvent
from kernel.envelope import StoredEvent
from kernel.schema import stored_event

# The key row gives the event's primary key, so the join reads one partition's index.
SELECT_EVENT = (
    "SELECT e.event_id, e.tenant_id, e.stream_id, e.version, e.type, e.source, e.subject, e.occurred_at,"
    " e.recorded_at, e.data::text, e.metadata, e.digest FROM event_keys k"
    " JOIN events e ON e.id = k.id AND e.recorded_at = k.recorded_at"
    " WHERE k.tenant_id = %s AND k.event_id = %s"
)
SELECT_KEY = "SELECT stream_id, version, recorded_at, digest FROM event_keys WHERE tenant_id = %s AND event_id = %s"
SELECT_STREAM = (
    "SELECT event_id, tenant_id, stream_id, version, type, source, subject, occurred_at, recorded_at, data::text,"
    " metadata, digest FROM events WHERE tenant_id = %s AND stream_id = %s AND version >= %s"
    " ORDER BY version LIMIT %s"
)
BUMP_STREAM = (
    "INSERT INTO streams (tenant_id, stream_id, version) VALUES (%s, %s, 1)"
    " ON CONFLICT (tenant_id, stream_id) DO UPDATE SET version = streams.version + 1, updated_at = now()"
    " RETURNING version"
)
CREATE_STREAM = (
    "INSERT INTO streams (tenant_id, stream_id, version) VALUES (%s, %s, 1)"
    " ON CONFLICT (tenant_id, stream_id) DO NOTHING RETURNING version"
)
BUMP_STREAM_IF = (
    "UPDATE streams SET version = version + 1, updated_at = now()"
    " WHERE tenant_id = %s AND stream_id = %s AND version = %s RETURNING version"
)
CURRENT_VERSION = "SELECT version FROM streams WHERE tenant_id = %s AND stream_id = %s"
# The columns an append writes: insert_params() order, with the version fourth. Statements
# are composed once, here, into plain strings: nothing is rendered again per execution.
_APPENDED_COLUMNS = sql.SQL(
    "event_id, tenant_id, stream_id, version, type, source, subject, occurred_at, data, metadata, digest"
)
INSERT_EVENT = (
    sql.SQL("INSERT INTO events ({}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING recorded_at")
    .format(_APPENDED_COLUMNS)
    .as_string()
)
# A stream statement above as a CTE, and the event's insert with the version it returned:
# one statement per event. A stale expected version makes the CTE return no row, so nothing
# is inserted and nothing fails.
_WITH_INSERT = sql.SQL(
    "WITH s AS ({}) INSERT INTO events ({}) SELECT %s, %s, %s, s.version, %s, %s, %s, %s, %s, %s, %s FROM s"
    " RETURNING version, recorded_at"
)
APPEND_NEXT = _WITH_INSERT.format(sql.SQL(BUMP_STREAM), _APPENDED_COLUMNS).as_string()
APPEND_NEW_STREAM = _WITH_INSERT.format(sql.SQL(CREATE_STREAM), _APPENDED_COLUMNS).as_string()
APPEND_IF_VERSION = _WITH_INSERT.format(sql.SQL(BUMP_STREAM_IF), _APPENDED_COLUMNS).as_string()

# Set-based writing of new events (no expectedversion): one upsert bumps every touched
# stream by its count of events, one insert writes every row. The streams are upserted in
# (tenant, stream) order so that concurrent writers lock their rows in the same order.
# Each statement takes its rows as ONE jsonb parameter (a JSON array of objects, dumped by
# orjson) unpacked by jsonb_to_recordset: psycopg dumps Python lists into text[] arrays
# element by element in Python, which costs the bus's CPU many times one orjson document
# (JSON null becomes SQL NULL, as None did).
BUMP_STREAMS = (
    "INSERT INTO streams (tenant_id, stream_id, version)"
    " SELECT t, s, n FROM jsonb_to_recordset(%s::jsonb) AS u(t text, s text, n bigint) ORDER BY t, s"
    " ON CONFLICT (tenant_id, stream_id) DO UPDATE"
    " SET version = streams.version + EXCLUDED.version, updated_at = now()"
    " RETURNING tenant_id, stream_id, version, now()"
)
# The rows themselves go in by COPY, PostgreSQL's cheapest write (no JSON document for the
# server to unpack): in alternating rounds against an INSERT … SELECT over
# jsonb_to_recordset, large batches took less of the database's CPU per event and ran faster.
# COPY fires the statement trigger that fills event_keys like an INSERT.
COPY_EVENTS = sql.SQL("COPY events ({}) FROM STDIN").format(_APPENDED_COLUMNS).as_string()
FIND_EXISTING = (
    "SELECT e.tenant_id, e.event_id, e.stream_id, e.version, e.recorded_at, e.digest"
    " FROM jsonb_to_recordset(%s::jsonb) AS k(tenant_id text, event_id text)"
    " JOIN event_keys e ON e.tenant_id = k.tenant_id AND e.event_id = k.event_id"
)

_RETRIES = 5


class StoreError(Exception):
    """Base of the event store's errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or is overloaded; nothing was written."""


class NoPartition(StoreUnavailable):
    """No partition of ``events`` covers now: partition maintenance has not run (``tagbus maintain``)."""


def no_partition(error: pg_errors.CheckViolation) -> StoreError:
    # events has no CHECK constraint, so a check violation reported on it is the
    # partition router's "no partition of relation events found for row".
    if error.diag.table_name == "events":
        return NoPartition("no partition of events covers the current month; run `tagbus maintain`")
    return StoreError(str(error))


@dataclass(eq=False)
class VersionConflict(StoreError):
    """``expectedversion`` did not match the stream's current version."""

    index: int
    stream: str
    expected: int
    current: int


@dataclass(eq=False)
class IdConflict(StoreError):
    """An event id was reused with different content."""

    index: int
    event_id: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an appended (or already stored) event sits."""

    id: str
    tenant: str
    stream: str
    version: int
    recorded_at: datetime
    created: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "stream": self.stream,
            "version": self.version,
            "recorded_at": self.recorded_at.isoformat().replace("+00:00", "Z"),
        }


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_dumps(orjson.dumps, context=conn)
    set_json_loads(orjson.loads, context=conn)


class EventStore:
    """Appends events to and reads them from the events table through a connection pool."""

    def __init__(self, database_url: str, *, pool_size: int = 16, pool_timeout: float = 5.0) -> None:
        self._pool = AsyncConnectionPool(
            database_url,
            min_size=min(4, pool_size),
            max_size=pool_size,
            timeout=pool_timeout,
            configure=_configure,
            open=False,
            kwargs={"autocommit": False},
        )

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection (not in autocommit mode)."""
        return self._pool.connection()

    async def ping(self) -> bool:
        try:
            async with self._pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, PoolTimeout):
            return False
        return True

    async def append(self, events: Sequence[NewEvent]) -> list[AppendResult]:
        """Append ``events`` in one transaction: all of them are stored, or none."""
        if _set_writable(events):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    return await write_new(conn, events)
            except (pg_errors.UniqueViolation, pg_errors.DeadlockDetected):
                # An id is stored already (a repeat), or a concurrent writer got in first:
                # the event-by-event path settles each event.
                pass
            except pg_errors.CheckViolation as e:
                raise no_partition(e) from e
            except PoolTimeout as e:
                raise StoreUnavailable("no database connection available in time") from e
            except psycopg.OperationalError as e:
                raise StoreUnavailable("the database is unreachable") from e
        for attempt in range(_RETRIES):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    return [await _append_one(conn, i, e) for i, e in enumerate(events)]
            except pg_errors.UniqueViolation as e:
                # A concurrent writer committed the same id (or stream version) first:
                # run again, and the repeat is then answered from the committed row.
                if attempt == _RETRIES - 1:
                    raise StoreUnavailable("too much contention on one event id or stream") from e
            except pg_errors.DeadlockDetected as e:
                if attempt == _RETRIES - 1:
                    raise StoreUnavailable("too much contention between batches") from e
                await asyncio.sleep(0.01 * (attempt + 1))
            except pg_errors.CheckViolation as e:
                raise no_partition(e) from e
            except PoolTimeout as e:
                raise StoreUnavailable("no database connection available in time") from e
            except psycopg.OperationalError as e:
                raise StoreUnavailable("the database is unreachable") from e
        raise AssertionError("unreachable")

    async def get(self, tenant: str, event_id: str) -> StoredEvent | None:
        rows = await self._fetch(SELECT_EVENT, (tenant, event_id))
        return stored_event(rows[0]) if rows else None

    async def read_stream(self, tenant: str, stream: str, from_version: int, limit: int) -> list[StoredEvent]:
        rows = await self._fetch(SELECT_STREAM, (tenant, stream, from_version, limit))
        return [stored_event(r) for r in rows]

    async def _fetch(self, query: str, params: tuple[Any, ...]) -> list[TupleRow]:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, params)
                rows = await cur.fetchall()
                await conn.rollback()
                return rows
        except PoolTimeout as e:
            raise StoreUnavailable("no database connection available in time") from e
        except psycopg.OperationalError as e:
            raise StoreUnavailable("the database is unreachable") from e


async def _append_one(conn: psycopg.AsyncConnection[Any], index: int, event: NewEvent) -> AppendResult:
    cur = await conn.execute(SELECT_KEY, (event.tenant, event.id))
    existing = await cur.fetchone()
    if existing is not None:
        return repeat_result(index, event, existing)
    version = await _next_version(conn, index, event)
    cur = await conn.execute(INSERT_EVENT, _with_version(insert_params(event), version))
    row = await cur.fetchone()
    assert row is not None
    return AppendResult(event.id, event.tenant, event.stream, version, row[0], created=True)


def repeat_result(index: int, event: NewEvent, stored: Sequence[Any]) -> AppendResult:
    """The answer to an id stored already: its original result if the content matches.

    ``stored`` is (stream, version, recorded_at, digest) of the stored event. Different
    content under the same id raises :class:`IdConflict` (``index``: the event's place in
    its request).
    """
    stream, version, recorded_at, digest = stored
    if digest != event.digest:
        raise IdConflict(index, event.id)
    return AppendResult(event.id, event.tenant, stream, version, recorded_at, created=False)


async def _next_version(conn: psycopg.AsyncConnection[Any], index: int, event: NewEvent) -> int:
    statement, _, params = _versioning(event)
    cur = await conn.execute(statement, params)
    row = await cur.fetchone()
    if row is not None:
        return int(row[0])
    cur = await conn.execute(CURRENT_VERSION, (event.tenant, event.stream))
    current = await cur.fetchone()
    raise VersionConflict(index, event.stream, event.expected_version or 0, int(current[0]) if current else 0)


def _versioning(event: NewEvent) -> tuple[str, str, tuple[Any, ...]]:
    """The stream statement that gives ``event`` its version, the same joined with the insert, and their parameters."""
    key = (event.tenant, event.stream)
    if event.expected_version is None:
        return BUMP_STREAM, APPEND_NEXT, key
    if event.expected_version == 0:
        return CREATE_STREAM, APPEND_NEW_STREAM, key
    return BUMP_STREAM_IF, APPEND_IF_VERSION, (*key, event.expected_version)


def append_statement(event: NewEvent) -> tuple[str, tuple[Any, ...]]:
    """One statement that versions and inserts ``event``, with its parameters.

    It returns ``(version, recorded_at)``, or no row when the event's ``expectedversion`` is stale.
    """
    _, statement, params = _versioning(event)
    return statement, (*params, *insert_params(event))


def _set_writable(events: Sequence[NewEvent]) -> bool:
    return all(e.expected_version is None for e in events) and len({(e.tenant, e.id) for e in events}) == len(events)


async def find_existing(
    conn: psycopg.AsyncConnection[Any], events: Sequence[NewEvent]
) -> dict[tuple[str, str], TupleRow]:
    """Already stored events among ``events``, by (tenant, id): tenant, id, stream, version, recorded_at, digest."""
    cur = await conn.execute(FIND_EXISTING, (_rows([{"tenant_id": e.tenant, "event_id": e.id} for e in events]),))
    return {(row[0], row[1]): row for row in await cur.fetchall()}


async def write_new(conn: psycopg.AsyncConnection[Any], events: Sequence[NewEvent]) -> list[AppendResult]:
    """Insert events that carry no ``expectedversion``: one upsert, one COPY.

    Versions follow the order of ``events`` within each stream. The caller owns the
    transaction. An id stored already, or written by a concurrent transaction, makes the COPY
    fail with UniqueViolation (``event_keys``' primary key): callers write optimistically and
    settle repeats on that path, rather than look every id up first.
    """
    counts: dict[tuple[str, str], int] = {}
    for e in events:
        counts[(e.tenant, e.stream)] = counts.get((e.tenant, e.stream), 0) + 1
    cur = await conn.execute(BUMP_STREAMS, (_rows([{"t": t, "s": s, "n": n} for (t, s), n in counts.items()]),))
    next_version: dict[tuple[str, str], int] = {}
    recorded_at = None
    for tenant, stream, last, now in await cur.fetchall():
        next_version[(tenant, stream)] = last - counts[(tenant, stream)] + 1
        recorded_at = now
    assert recorded_at is not None
    versions = []
    for e in events:
        key = (e.tenant, e.stream)
        versions.append(next_version[key])
        next_version[key] += 1
    async with conn.cursor() as cur, cur.copy(COPY_EVENTS) as copy:
        for e, v in zip(events, versions, strict=True):
            # SQL NULL is "no payload"; a "data": null payload is stored as JSON null.
            data = orjson.dumps(e.data).decode() if e.has_data or e.data is not None else None
            row = (
                e.id,
                e.tenant,
                e.stream,
                v,
                e.type,
                e.source,
                e.subject,
                e.time,
                data,
                orjson.dumps(e.metadata).decode(),
                e.digest,
            )
            await copy.write_row(row)
    return [
        AppendResult(e.id, e.tenant, e.stream, v, recorded_at, created=True)
        for e, v in zip(events, versions, strict=True)
    ]


def _rows(rows: list[dict[str, Any]]) -> Jsonb:
    """Rows for ``jsonb_to_recordset``, dumped by orjson whatever the connection's JSON setup."""
    return Jsonb(rows, dumps=orjson.dumps)


def insert_params(event: NewEvent) -> tuple[Any, ...]:
    """Parameters of an events-table insert, in column order, without the version."""
    # A "data": null payload is stored as JSON null; SQL NULL means the event had no data.
    data = Jsonb(event.data) if event.data is not None or event.has_data else None
    return (
        event.id,
        event.tenant,
        event.stream,
        event.type,
        event.source,
        event.subject,
        event.time,
        data,
        Jsonb(event.metadata),
        event.digest,
    )


def _with_version(params: tuple[Any, ...], version: int) -> tuple[Any, ...]:
    return (*params[:3], version, *params[3:])
