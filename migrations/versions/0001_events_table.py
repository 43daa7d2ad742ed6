"""Events table (the transactional outbox), stream versions, and the tailer's publication.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("stream_id", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("subject", sa.Text),
        sa.Column("occurred_at", TIMESTAMP(timezone=True)),
        sa.Column("recorded_at", TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("data", JSONB),
        sa.Column("metadata", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("digest", sa.Text, nullable=False),
        sa.UniqueConstraint("tenant_id", "event_id", name="events_tenant_event_key"),
        sa.UniqueConstraint("tenant_id", "stream_id", "version", name="events_tenant_stream_version_key"),
    )
    op.create_table(
        "streams",
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("stream_id", sa.Text, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    # The tailer decodes inserts into events only; updates and deletes never happen.
    op.execute("CREATE PUBLICATION tagbus_events FOR TABLE events WITH (publish = 'insert')")


def downgrade() -> None:
    op.execute("DROP PUBLICATION IF EXISTS tagbus_events")
    op.drop_table("streams")
    op.drop_table("events")
