"""Events partitioned by month of ``recorded_at``; idempotency keys in ``event_keys``.

The table is young, so it is rebuilt and its rows copied, ids kept. What changes:

- ``events`` is ``PARTITION BY RANGE (recorded_at)`` with one partition per UTC month,
  ``events_YYYY_MM``. Partitions are made ahead of time by ``event_bus.partitions`` (the
  bus at start and daily, ``tagbus migrate``, ``tagbus maintain``); there is no DEFAULT
  partition, so an insert for a month without one fails loudly (the bus answers 503)
  instead of filling a catch-all that would block creating that month later.
- A unique index on a partitioned table must contain the partition key, so
  ``UNIQUE (tenant_id, event_id)`` moves to the small unpartitioned ``event_keys`` table
  (its primary key), which also holds what the 200/409 answer and ``GET /v1/events/{id}``
  need: stream, version, digest, and ``(id, recorded_at)``, the events' primary key, with
  which the row is read from a single partition. A statement-level trigger with a
  transition table fills it from every insert into ``events``, set-based, in the same
  statement: whichever path writes an event (the bus's set-based insert, its per-event
  ``expectedversion`` statements, republish tests, benches), a second row with the same
  key fails with a unique violation exactly as before, and a concurrent repeat blocks on
  the key until the first commits.
- ``(tenant_id, stream_id, version)`` is a plain index: its uniqueness is guaranteed by
  the ``streams`` row lock under which every version is assigned (``event_bus.store``).
- The publication covers the partitions and publishes them as the root
  (``publish_via_partition_root``), so the tailer keeps seeing relation ``events``.
  The copy runs before the new table joins the publication, in the same transaction:
  logical decoding reads the catalogs as of each change, so the copied rows (already
  published once) are not decoded again.
- Row-level security, policies and grants are on the parent. Queries through the parent
  apply its policies; partitions get no grants, so analysts cannot read them directly to
  bypass RLS. Detached (archived) partitions get their own policies (``event_bus.partitions``).

Downgrading refuses while archived partitions exist (their rows would be lost from
``events``); otherwise it rebuilds the unpartitioned table. Either way the rows it copies
are decoded again by the tailer, which consumers absorb (they apply by stream version).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VIEWS = ("events_by_day", "stream_history", "config_changes", "ingest_latency")
ANALYSTS = "tagbus_analyst, tagbus_tenant_analyst"

# Column order is that of 0001: the tailer maps columns by name, people read them in order.
CREATE_EVENTS = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    event_id text NOT NULL,
    tenant_id text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    source text NOT NULL,
    subject text,
    occurred_at timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    data jsonb,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    digest text NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at)
"""

CREATE_EVENT_KEYS = """
CREATE TABLE event_keys (
    tenant_id text NOT NULL,
    event_id text NOT NULL,
    id bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    digest text NOT NULL,
    CONSTRAINT event_keys_pkey PRIMARY KEY (tenant_id, event_id)
)
"""

# UTC months from the oldest copied row's to three months ahead. Same naming and bounds
# as event_bus.partitions, which makes the later ones.
CREATE_PARTITIONS = """
DO $$
DECLARE
    first_month date := date_trunc('month', coalesce(
        (SELECT min(recorded_at) FROM events_unpartitioned), now()) AT TIME ZONE 'UTC')::date;
    last_month date := (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months')::date;
    m date;
BEGIN
    m := first_month;
    WHILE m <= last_month LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
            'events_' || to_char(m, 'YYYY_MM'),
            (m::timestamp AT TIME ZONE 'UTC'),
            ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
        m := (m + interval '1 month')::date;
    END LOOP;
END
$$
"""

COPY_EVENTS = """
INSERT INTO events (id, event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                    recorded_at, data, metadata, digest) OVERRIDING SYSTEM VALUE
SELECT id, event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
       recorded_at, data, metadata, digest
FROM events_unpartitioned ORDER BY id
"""
COPY_BACK = """
INSERT INTO events (id, event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                    recorded_at, data, metadata, digest) OVERRIDING SYSTEM VALUE
SELECT id, event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
       recorded_at, data, metadata, digest
FROM events_partitioned ORDER BY id
"""
COPY_KEYS = (
    "INSERT INTO event_keys (tenant_id, event_id, id, recorded_at, stream_id, version, digest)"
    " SELECT tenant_id, event_id, id, recorded_at, stream_id, version, digest FROM events_unpartitioned"
)
RESTART_IDS = (
    "SELECT setval(pg_get_serial_sequence('events', 'id'), coalesce(max(id), 0) + 1, false) FROM events_unpartitioned"
)

RECORD_KEYS = """
CREATE FUNCTION tagbus_record_event_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_keys (tenant_id, event_id, id, recorded_at, stream_id, version, digest)
    SELECT tenant_id, event_id, id, recorded_at, stream_id, version, digest FROM inserted;
    RETURN NULL;
END
$$
"""
RECORD_KEYS_TRIGGER = (
    "CREATE TRIGGER events_record_keys AFTER INSERT ON events REFERENCING NEW TABLE AS inserted"
    " FOR EACH STATEMENT EXECUTE FUNCTION tagbus_record_event_keys()"
)

# The views of 0002, unchanged; they are bound to the old table, so they are made again.
EVENTS_BY_DAY = """
CREATE VIEW events_by_day WITH (security_invoker = true) AS
SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, tenant_id, type, count(*) AS count
FROM events
GROUP BY 1, 2, 3
"""

STREAM_HISTORY = """
CREATE VIEW stream_history WITH (security_invoker = true) AS
SELECT tenant_id, stream_id, version, type, recorded_at, data, metadata ->> 'sub' AS sub, event_id
FROM events
"""

CONFIG_CHANGES = """
CREATE VIEW config_changes WITH (security_invoker = true) AS
SELECT tenant_id, key, version, type,
       lag(new_value) OVER (PARTITION BY tenant_id, key ORDER BY version) AS old_value,
       new_value, who, changed_at
FROM (
    SELECT tenant_id, stream_id AS key, version, type,
           CASE WHEN type = 'config.set' THEN data -> 'value' END AS new_value,
           metadata ->> 'sub' AS who, recorded_at AS changed_at
    FROM events
    WHERE type IN ('config.set', 'config.deleted')
) AS changes
"""

INGEST_LATENCY = """
CREATE VIEW ingest_latency WITH (security_invoker = true) AS
SELECT tenant_id, (recorded_at AT TIME ZONE 'UTC')::date AS day, count(*) AS events,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lat_ms) AS p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lat_ms) AS p99_ms
FROM (
    SELECT tenant_id, recorded_at,
           (extract(epoch FROM recorded_at - occurred_at) * 1000)::double precision AS lat_ms
    FROM events
    WHERE occurred_at IS NOT NULL
) AS timed
GROUP BY 1, 2
"""

POLICIES = (
    "ALTER TABLE events ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY events_analyst_read ON events FOR SELECT TO tagbus_analyst USING (true)",
    "CREATE POLICY events_tenant_analyst_read ON events FOR SELECT TO tagbus_tenant_analyst"
    " USING (tenant_id = current_setting('tagbus.tenant', true))",
)

REFUSE_DOWNGRADE_WITH_ARCHIVE = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_tables WHERE schemaname = 'archive' AND tablename LIKE 'events\\_%') THEN
        RAISE EXCEPTION 'cannot downgrade 0003: archived event partitions exist in schema archive; '
            'attach them back to events (or drop them knowingly) first';
    END IF;
END
$$
"""

CREATE_FLAT_EVENTS = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    tenant_id text NOT NULL,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    source text NOT NULL,
    subject text,
    occurred_at timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    data jsonb,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    digest text NOT NULL,
    CONSTRAINT events_tenant_event_key UNIQUE (tenant_id, event_id),
    CONSTRAINT events_tenant_stream_version_key UNIQUE (tenant_id, stream_id, version)
)
"""


def _drop_views() -> None:
    for view in reversed(VIEWS):
        op.execute("DROP VIEW IF EXISTS " + view)


def _create_views_and_grants() -> None:
    for view in (EVENTS_BY_DAY, STREAM_HISTORY, CONFIG_CHANGES, INGEST_LATENCY):
        op.execute(view)
    for statement in POLICIES:
        op.execute(statement)
    op.execute("GRANT SELECT ON events, " + ", ".join(VIEWS) + " TO " + ANALYSTS)


def upgrade() -> None:
    _drop_views()
    op.execute("ALTER PUBLICATION tagbus_events DROP TABLE events")
    op.execute("ALTER TABLE events RENAME TO events_unpartitioned")
    # Free the constraint and index names for the new table; the old one is dropped below.
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT events_pkey")
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT events_tenant_event_key")
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT events_tenant_stream_version_key")
    op.execute("DROP INDEX events_tenant_recorded_at_idx")
    op.execute("DROP INDEX events_type_recorded_at_idx")

    op.execute(CREATE_EVENTS)
    op.execute(CREATE_EVENT_KEYS)
    op.execute(CREATE_PARTITIONS)
    # Copied before the indexes and the trigger exist: cheaper, and the keys come in one go.
    op.execute(COPY_EVENTS)
    op.execute(COPY_KEYS)
    op.execute(RESTART_IDS)
    op.execute("DROP TABLE events_unpartitioned")

    op.execute("CREATE INDEX events_tenant_recorded_at_idx ON events (tenant_id, recorded_at)")
    op.execute("CREATE INDEX events_tenant_stream_version_idx ON events (tenant_id, stream_id, version)")
    op.execute("CREATE INDEX events_type_recorded_at_idx ON events (type, recorded_at)")
    op.execute(RECORD_KEYS)
    op.execute(RECORD_KEYS_TRIGGER)
    _create_views_and_grants()
    # Only now, after the copy: see the module docstring.
    op.execute("ALTER PUBLICATION tagbus_events ADD TABLE events")
    op.execute("ALTER PUBLICATION tagbus_events SET (publish_via_partition_root = true)")


def downgrade() -> None:
    op.execute(REFUSE_DOWNGRADE_WITH_ARCHIVE)
    _drop_views()
    op.execute("ALTER PUBLICATION tagbus_events DROP TABLE events")
    op.execute("ALTER PUBLICATION tagbus_events SET (publish_via_partition_root = false)")
    op.execute("ALTER TABLE events RENAME TO events_partitioned")
    op.execute("ALTER TABLE events_partitioned DROP CONSTRAINT events_pkey")
    op.execute("DROP INDEX events_tenant_recorded_at_idx")
    op.execute("DROP INDEX events_type_recorded_at_idx")
    op.execute(CREATE_FLAT_EVENTS)
    op.execute(COPY_BACK)
    op.execute(
        "SELECT setval(pg_get_serial_sequence('events', 'id'), coalesce(max(id), 0) + 1, false) FROM events_partitioned"
    )
    op.execute("DROP TABLE events_partitioned")
    op.execute("DROP TABLE event_keys")
    op.execute("DROP FUNCTION tagbus_record_event_keys()")
    op.execute("CREATE INDEX events_tenant_recorded_at_idx ON events (tenant_id, recorded_at)")
    op.execute("CREATE INDEX events_type_recorded_at_idx ON events (type, recorded_at)")
    _create_views_and_grants()
    op.execute("ALTER PUBLICATION tagbus_events ADD TABLE events")
