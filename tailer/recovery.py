"""Recovery from a lost replication slot: recreate it, then republish what it may not have delivered.

A slot is lost when PostgreSQL invalidates it (the WAL it held back passed
``max_slot_wal_keep_size``: ``pg_replication_slots.wal_status = 'lost'``, and
``START_REPLICATION`` fails) or when it is dropped. The changes it had not delivered are
gone from the WAL, but their events are still rows of the events table.

Where to republish from. The rows carry no commit LSN, and ``recorded_at`` (the
transaction's start) is not commit order: a transaction that started before the last
acknowledged one may commit after it. Transaction ids give a bound that holds: a slot's
``catalog_xmin`` is the oldest transaction still running when decoding passed a point at
or before the slot's ``confirmed_flush_lsn``, so every transaction committing after that
position — every one whose events Kinesis may not have acknowledged — has an id at or
after it, and so has every row it inserted (``xmin``; a subtransaction's id is newer than
its parent's). An invalidated slot keeps its ``catalog_xmin``; for a dropped one the tailer
uses the last value it read (it only moves forward, so an older value bounds too). This
sends a little more than was lost: the transactions between the horizon and the confirmed
position, usually seconds' worth (the horizon follows the position at each
``xl_running_xacts`` record, about every 15 s), or more behind a long transaction that
holds an id. Consumers apply by version, so the extra events are no-ops. Per stream, the
first version at or after the horizon and every later one are sent, in version order
(version order is commit order within a stream; see :mod:`tailer.republish`), so a
stream's republished events are one unbroken run.

Order. The slot is created again *first*, exporting the snapshot it starts at
(:func:`tailer.stream.exported_slot`); the table is read in that snapshot, which holds
exactly the transactions committed before the slot's first change; only then does the
tailer stream the slot. Everything is sent once between the two (plus the horizon's slack),
and each stream's events arrive in version order: the ones from the table, then the
ones from the slot.

Crash safety. Before the lost slot is dropped, a marker slot ``<slot>_recover_<xid>`` is
created: physical, holding no WAL, its name carrying the horizon. It is dropped only once
everything is republished. A tailer that finds a marker (a recovery cut short by a kill, an
outage or a publish error) runs the recovery again from the marker's horizon, dropping
whatever slot has that name by then: ``tagbus migrate`` creates a missing slot, and a slot
created after the loss does not hold what came before it.

What cannot be recovered: a slot dropped while no tailer ran (and none kept a marker)
looks like a first start to the next tailer, which then relays only what commits after
it creates the slot. ``tagbus republish --since`` re-sends a range by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Final

import psycopg
from psycopg import sql

from kernel.schema import stored_event
from tailer.errors import DatabaseUnavailableError, SlotConfigurationError
from tailer.sink import RecordSink
from tailer.slot import SlotReader, SlotStatus, libpq_url
from tailer.stream import exported_slot

#: Between a slot's name and the horizon in the name of its recovery marker.
MARKER_INFIX: Final = "_recover_"
#: PostgreSQL's ``FirstNormalTransactionId``: a horizon that takes in every row.
FIRST_NORMAL_XID: Final = 3
#: Events handed to the sink at once: one full PutRecords request.
DEFAULT_CHUNK_SIZE: Final = 500
_MAX_SLOT_NAME: Final = 63


@dataclass(frozen=True, slots=True)
class SlotLoss:
    """A slot to recreate: why, and the transaction id from which the events table is republished."""

    #: ``invalidated`` (past ``max_slot_wal_keep_size``), ``dropped``, or ``unfinished`` (a
    #: marker of a recovery that did not complete).
    reason: str
    horizon_xid: int
    #: How far the lost slot had been confirmed, when known (for the log).
    confirmed_flush_lsn: int | None = None


@dataclass(frozen=True, slots=True)
class SlotRecovery:
    """What a recovery did."""

    loss: SlotLoss
    #: Where the new slot starts: the table had everything committed before it.
    start_lsn: int
    events: int
    streams: int
    seconds: float


def marker_name(slot_name: str, horizon_xid: int) -> str:
    """The recovery marker's slot name for ``slot_name``, carrying ``horizon_xid``."""
    name = f"{slot_name}{MARKER_INFIX}{horizon_xid}"
    if len(name) > _MAX_SLOT_NAME:
        raise SlotConfigurationError(
            f"slot name {slot_name!r} is too long to recover: at most "
            f"{_MAX_SLOT_NAME - len(MARKER_INFIX) - 10} characters leave room for its recovery marker"
        )
    return name


def find_loss(reader: SlotReader, status: SlotStatus | None, *, remembered_horizon: int | None) -> SlotLoss | None:
    """Whether the slot must be recreated, given its ``status`` and what this tailer remembers.

    ``remembered_horizon`` is the slot's ``catalog_xmin`` as this tailer last read it (``None``
    if it never saw the slot: a missing slot is then a first start). A marker left by an
    unfinished recovery always calls for one, from the oldest horizon known.
    """
    loss: SlotLoss | None = None
    if status is not None and status.wal_status == "lost":
        horizon = status.catalog_xmin if status.catalog_xmin is not None else FIRST_NORMAL_XID
        loss = SlotLoss("invalidated", horizon, status.confirmed_flush_lsn)
    elif status is None and remembered_horizon is not None:
        loss = SlotLoss("dropped", remembered_horizon)
    unfinished = _marker_horizons(reader)
    if not unfinished:
        return loss
    oldest = _oldest(reader, [*unfinished, *([loss.horizon_xid] if loss is not None else [])])
    if loss is None:
        return SlotLoss("unfinished", oldest)
    return replace(loss, horizon_xid=oldest)


def recover_slot(
    database_url: str,
    reader: SlotReader,
    loss: SlotLoss,
    sink: RecordSink,
    *,
    table: str = "events",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SlotRecovery:
    """Recreate ``reader``'s slot and republish the events table from ``loss.horizon_xid`` into ``sink``.

    Returns once the sink acknowledged everything and the marker is gone. Raises the
    sink's publish errors and :class:`~tailer.DatabaseUnavailableError`; the marker then
    stays, and the next attempt starts over.
    """
    started = time.monotonic()
    slot = reader.slot_name
    reader.create_marker(marker_name(slot, loss.horizon_xid))
    reader.drop_slot(slot)
    events = streams = 0
    try:
        with psycopg.connect(libpq_url(database_url), application_name="tagbus-tailer-recovery") as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with exported_slot(libpq_url(database_url), slot) as (start_lsn, snapshot):
                # The first statement of the transaction; once imported, the snapshot no
                # longer needs the connection that exported it.
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            with conn.cursor(name="tagbus_tailer_recovery") as cursor:
                cursor.itersize = chunk_size
                cursor.execute(_SELECT.format(table=sql.Identifier(table)), {"horizon": str(loss.horizon_xid)})
                last: tuple[str, str] | None = None
                while rows := cursor.fetchmany(chunk_size):
                    chunk = [stored_event(row) for row in rows]
                    for event in chunk:
                        if (event.tenant, event.stream) != last:
                            streams += 1
                            last = (event.tenant, event.stream)
                    sink.publish(chunk)
                    events += len(chunk)
            conn.rollback()
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailableError(f"slot recovery stopped after {events} events: {exc}".strip()) from exc
    for marker in reader.markers(f"{slot}{MARKER_INFIX}"):
        reader.drop_slot(marker)
    return SlotRecovery(loss, start_lsn, events, streams, time.monotonic() - started)


# Per stream, the first version inserted by a transaction at or after the horizon and
# every later one. age() compares transaction ids modulo wraparound, as PostgreSQL does.
_SELECT: Final = sql.SQL(
    """
    WITH starts AS (
        SELECT tenant_id, stream_id, min(version) AS first_version
        FROM {table}
        WHERE age(xmin) <= age(%(horizon)s::xid)
        GROUP BY tenant_id, stream_id
    )
    SELECT e.event_id, e.tenant_id, e.stream_id, e.version, e.type, e.source, e.subject,
           e.occurred_at, e.recorded_at, e.data::text, e.metadata
    FROM starts s
    JOIN {table} e ON e.tenant_id = s.tenant_id AND e.stream_id = s.stream_id AND e.version >= s.first_version
    ORDER BY e.tenant_id, e.stream_id, e.version
    """
)


def _marker_horizons(reader: SlotReader) -> list[int]:
    prefix = f"{reader.slot_name}{MARKER_INFIX}"
    return [int(name[len(prefix) :]) for name in reader.markers(prefix) if name[len(prefix) :].isdigit()]


def _oldest(reader: SlotReader, xids: list[int]) -> int:
    """The oldest of ``xids``, comparing as PostgreSQL does (modulo wraparound)."""
    if len(xids) == 1:
        return xids[0]
    try:
        row = reader.connection.execute(
            "SELECT x FROM unnest(%s::text[]) AS x ORDER BY age(x::xid) DESC LIMIT 1", ([str(x) for x in xids],)
        ).fetchone()
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailableError(str(exc).strip()) from exc
    assert row is not None
    return int(row[0])
