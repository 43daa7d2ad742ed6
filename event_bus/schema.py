"""The events table and its companions, as SQLAlchemy Core metadata.

DDL is applied only by Alembic (``migrations/``); the application never creates tables.
This metadata is what the migrations are written against and what tests compare with.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

metadata = MetaData()

#: Name of the publication the log tailer decodes (limited to the events table).
PUBLICATION = "tagbus_events"

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
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
    UniqueConstraint("tenant_id", "event_id", name="events_tenant_event_key"),
    UniqueConstraint("tenant_id", "stream_id", "version", name="events_tenant_stream_version_key"),
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
