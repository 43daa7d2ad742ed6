"""Republish: send a range of the events table to the Kinesis stream again.

For downstream consumers that rebuild from the stream (a new consumer, a read model
rebuilt after a bug) when the events have aged out of Kinesis retention. The events go
through the tailer's :class:`~tailer.KinesisPublisher`, so requests keep the
same limits (≤ 500 records, ≤ 5 MiB) and a partial ``PutRecords`` failure resends the
failed entry and everything after it of the same partition key, in order.

Order. The events table has no commit LSN, and neither the identity ``id`` nor
``recorded_at`` is commit order across transactions: both are taken before the commit,
so two concurrent transactions can commit in the opposite order. Commit order across
streams is therefore not recoverable from the table — and it is not needed: the only
order the stream promises is per partition key, and the key is a function of
``(tenant, stream)``. Within one ``(tenant, stream)``, version order *is* commit order,
because the bus assigns version n+1 under the row lock of the stream's ``streams`` row,
held until version n's transaction committed (see :mod:`event_bus.store`). So rows are
read ``ORDER BY tenant_id, stream_id, version`` — the ``(tenant_id, stream_id, version)`` unique
index — and each stream's events reach its shard in version order, exactly as the tailer
would have sent them. Records carry no ``position`` (it is unknown here); consumers apply
by version, so a republished event that a read model already holds is a no-op.

Range. ``since`` selects, per stream, the first version recorded at or after ``since``;
that version and *every later one* of the stream are republished. ``recorded_at`` is the
transaction's start time, so it is not monotonic in version; filtering on it row by row
could republish version 7 but skip version 6 of the same stream.

The rows are read from one REPEATABLE READ snapshot through a server-side cursor, so
memory stays bounded by ``chunk_size`` whatever the range.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql

from kernel.schema import stored_event
from tailer.errors import DatabaseUnavailableError
from tailer.sink import RecordSink
from tailer.slot import libpq_url

#: Events handed to the publisher at once: one full PutRecords request.
DEFAULT_CHUNK_SIZE: Final = 500

_SELECT: Final = sql.SQL(
    """
    WITH starts AS (
        SELECT tenant_id, stream_id, min(version) AS first_version
        FROM events
        WHERE recorded_at >= %(since)s {tenant_filter} {stream_filter}
        GROUP BY tenant_id, stream_id
    )
    SELECT e.event_id, e.tenant_id, e.stream_id, e.version, e.type, e.source, e.subject,
           e.occurred_at, e.recorded_at, e.data::text, e.metadata
    FROM starts s
    JOIN events e ON e.tenant_id = s.tenant_id AND e.stream_id = s.stream_id AND e.version >= s.first_version
    ORDER BY e.tenant_id, e.stream_id, e.version
    """
)


@dataclass(frozen=True, slots=True)
class RepublishSummary:
    """What a republish sent."""

    #: ``None``: every tenant.
    tenant: str | None
    since: datetime
    stream: str | None
    events: int
    streams: int
    seconds: float


def republish(
    database_url: str,
    publisher: RecordSink,
    *,
    tenant: str | None,
    since: datetime,
    stream: str | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> RepublishSummary:
    """Publish ``tenant``'s events from ``since`` on (one ``stream`` or all), per stream in version order.

    ``tenant=None`` sends every tenant's (the local stack does so into a fresh stream after
    kinesis-mock lost records; see :mod:`tagbus.generations`).

    ``publisher`` is normally a :class:`~tailer.KinesisPublisher`; it returns
    only once every record is acknowledged and raises the tailer's publish errors
    (oversize, rejected) otherwise. ``progress`` is called with the running total after
    each acknowledged chunk. Database failures raise
    :class:`~tailer.DatabaseUnavailableError`; a republish that fails part-way
    can simply be run again (consumers apply by version).
    """
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if stream is not None and tenant is None:
        raise ValueError("a stream is named within a tenant")
    tenant_filter = sql.SQL("AND tenant_id = %(tenant)s") if tenant is not None else sql.SQL("")
    stream_filter = sql.SQL("AND stream_id = %(stream)s") if stream is not None else sql.SQL("")
    query = _SELECT.format(tenant_filter=tenant_filter, stream_filter=stream_filter)
    params: dict[str, Any] = {"tenant": tenant, "since": since, "stream": stream}
    started = time.monotonic()
    published = 0
    streams = 0
    last_stream: tuple[str, str] | None = None
    try:
        with psycopg.connect(libpq_url(database_url), application_name="tagbus-republish") as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction(), conn.cursor(name="tagbus_republish") as cursor:
                cursor.itersize = chunk_size
                cursor.execute(query, params)
                while rows := cursor.fetchmany(chunk_size):
                    chunk = [stored_event(row) for row in rows]
                    for event in chunk:
                        if (event.tenant, event.stream) != last_stream:
                            streams += 1
                            last_stream = (event.tenant, event.stream)
                    publisher.publish(chunk)
                    published += len(chunk)
                    if progress is not None:
                        progress(published)
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailableError(f"republish stopped after {published} events: {exc}".strip()) from exc
    return RepublishSummary(
        tenant=tenant,
        since=since,
        stream=stream,
        events=published,
        streams=streams,
        seconds=time.monotonic() - started,
    )
