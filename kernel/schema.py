"""The events table and its companions, as SQLAlchemy Core metadata.

DDL is applied only by Alembic (``migrations/``); the application never creates tables.
This metadata is what the migrations are written against and what tests compare with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

from kernel.envelope import StoredEvent

metadata = MetaData()

#: Name of the publication the log tailer decodes (limited to the events table).
PUBLICATION = "tagbus_events"

#: Prefix of the monthly partitions of ``events``: ``events_YYYY_MM`` (UTC months).
PARTITION_PREFIX = "events_"

# Partitioned by RANGE (recorded_at), one partition per UTC month (migration 0003), so
# every unique index must contain recorded_at: the primary key is (id, recorded_at) and
# (tenant_id, event_id) is unique in ``event_keys`` instead.
events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("event_id", Text, nullable=False),
    Column("tenant_id", Text, nullable=False),
    Column("stream_id", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("type", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("subject", Text),
    Column("occurred_at", TIMESTAMP(timezone=True)),
    Column("recorded_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    Column("data", JSONB),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # SHA-256 of the submitted envelope: an exact repeat of an id answers 200, a different
    # body under the same id answers 409.
    Column("digest", Text, nullable=False),
    PrimaryKeyConstraint("id", "recorded_at", name="events_pkey"),
    Index("events_tenant_recorded_at_idx", "tenant_id", "recorded_at"),
    Index("events_tenant_stream_version_idx", "tenant_id", "stream_id", "version"),
    Index("events_type_recorded_at_idx", "type", "recorded_at"),
    postgresql_partition_by="RANGE (recorded_at)",
)

# One row per stored event, filled by a trigger on events in the same statement: the
# idempotency key, and what a repeat is answered with and where the event row lives.
event_keys = Table(
    "event_keys",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("id", BigInteger, nullable=False),
    Column("recorded_at", TIMESTAMP(timezone=True), nullable=False),
    Column("stream_id", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("digest", Text, nullable=False),
    PrimaryKeyConstraint("tenant_id", "event_id", name="event_keys_pkey"),
)

# One row per (tenant, stream) holding its current version. Bumping it with
# INSERT … ON CONFLICT DO UPDATE takes a row lock, so concurrent writers to one stream
# queue on that row and get consecutive versions without gaps.
streams = Table(
    "streams",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("stream_id", Text, primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
)


def stored_event(row: Sequence[Any]) -> StoredEvent:
    """A stored event from a row whose first columns are, in order: ``event_id, tenant_id,
    stream_id, version, type, source, subject, occurred_at, recorded_at, data::text, metadata``.

    ``data`` comes as text (``data::text``): decoded jsonb gives ``None`` for both SQL NULL
    (no payload) and JSON null (a null payload), which the envelope tells apart.
    """
    metadata = dict(row[10] or {})
    data = orjson.loads(row[9]) if row[9] is not None else None
    return StoredEvent(
        id=row[0],
        tenant=row[1],
        stream=row[2],
        version=row[3],
        type=row[4],
        source=row[5],
        subject=row[6],
        time=row[7],
        recorded_at=row[8],
        data=data,
        datacontenttype=metadata.pop("datacontenttype", None),
        metadata=metadata,
        null_data=row[9] is not None and data is None,
    )
