"""Analyst access: read-only group roles, tenant row-level security, views, query indexes.

Two NOLOGIN group roles; people log in with their own roles granted into one of them:

- ``tagbus_analyst`` reads every row of ``events`` and ``streams`` and the views; it has
  no write privilege and cannot create objects.
- ``tagbus_tenant_analyst`` reads the same relations through row-level security: only
  rows whose ``tenant_id`` equals the session's ``tagbus.tenant`` setting (none when it
  is unset). The setting is a scoping aid for trusted callers such as ``tagbus query``;
  a person who can type SQL can change it, so it is not an isolation boundary on its own.

RLS is ENABLEd but not FORCEd: the table owner (the role the bus writes and reads as, and
the one that runs these migrations) and superusers bypass it, so the bus is unaffected.
The tailer decodes the WAL through its publication, which RLS never filters.

The views are ``security_invoker`` so the caller's RLS applies through them (a default
view would run as its owner, who bypasses RLS, and leak every tenant).

Roles are cluster-wide while this migration runs per database, so they are created only
if missing, and the downgrade drops them only when no other database still uses them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = ("events_by_day", "stream_history", "config_changes", "ingest_latency")

# Role and relation names are written out in full: DDL here is plain text, never formatted.
CREATE_ROLES = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tagbus_analyst') THEN
        CREATE ROLE tagbus_analyst NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tagbus_tenant_analyst') THEN
        CREATE ROLE tagbus_tenant_analyst NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
    END IF;
END
$$
"""

# A migrating role that is not a superuser (RDS, Aurora) needs the groups WITH ADMIN OPTION
# to hand them out, and for `tagbus query` to put its throwaway logins into them.
GRANT_GROUPS_TO_MIGRATOR = """
DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT tagbus_analyst, tagbus_tenant_analyst TO %I WITH ADMIN OPTION', current_user);
    END IF;
END
$$
"""

DROP_ROLES = """
DO $$
BEGIN
    DROP ROLE IF EXISTS tagbus_tenant_analyst;
    DROP ROLE IF EXISTS tagbus_analyst;
EXCEPTION WHEN dependent_objects_still_exist THEN
    RAISE NOTICE 'analyst roles are still used by another database: kept';
END
$$
"""

# Days are UTC days whatever the session's TimeZone, so counts do not move between clients.
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

# A config event's stream is its key, so `key` is stream_id: a filter on it is pushed below
# the window (partitioned by the same columns) and uses the (tenant_id, stream_id, version)
# index. old_value is the previous event's new value, so a set after a delete reads null → v.
# The time column is changed_at, not "when" (a reserved word that would need quoting).
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

RELATIONS = "events, streams, events_by_day, stream_history, config_changes, ingest_latency"


def upgrade() -> None:
    op.execute(CREATE_ROLES)
    # PostgreSQL 15 already creates schema public without CREATE for PUBLIC; clusters made by
    # older versions (and upgraded from them) still grant it, which would let analysts create.
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")

    # Common analyst filters: one tenant over a time range, one type over a time range.
    # (tenant_id, stream_id, version) is already covered by its unique constraint.
    op.create_index("events_tenant_recorded_at_idx", "events", ["tenant_id", "recorded_at"])
    op.create_index("events_type_recorded_at_idx", "events", ["type", "recorded_at"])

    op.execute("ALTER TABLE events ENABLE ROW LEVEL SECURITY")
    op.execute("CREATE POLICY events_analyst_read ON events FOR SELECT TO tagbus_analyst USING (true)")
    op.execute(
        "CREATE POLICY events_tenant_analyst_read ON events FOR SELECT TO tagbus_tenant_analyst "
        "USING (tenant_id = current_setting('tagbus.tenant', true))"
    )
    op.execute("ALTER TABLE streams ENABLE ROW LEVEL SECURITY")
    op.execute("CREATE POLICY streams_analyst_read ON streams FOR SELECT TO tagbus_analyst USING (true)")
    op.execute(
        "CREATE POLICY streams_tenant_analyst_read ON streams FOR SELECT TO tagbus_tenant_analyst "
        "USING (tenant_id = current_setting('tagbus.tenant', true))"
    )

    for view in (EVENTS_BY_DAY, STREAM_HISTORY, CONFIG_CHANGES, INGEST_LATENCY):
        op.execute(view)

    op.execute("GRANT USAGE ON SCHEMA public TO tagbus_analyst, tagbus_tenant_analyst")
    op.execute("GRANT SELECT ON " + RELATIONS + " TO tagbus_analyst, tagbus_tenant_analyst")
    op.execute(GRANT_GROUPS_TO_MIGRATOR)


def downgrade() -> None:
    op.execute("REVOKE ALL ON " + RELATIONS + " FROM tagbus_analyst, tagbus_tenant_analyst")
    op.execute("REVOKE ALL ON SCHEMA public FROM tagbus_analyst, tagbus_tenant_analyst")
    for view in reversed(VIEWS):
        op.execute("DROP VIEW IF EXISTS " + view)
    op.execute("DROP POLICY IF EXISTS streams_tenant_analyst_read ON streams")
    op.execute("DROP POLICY IF EXISTS streams_analyst_read ON streams")
    op.execute("ALTER TABLE streams DISABLE ROW LEVEL SECURITY")
    op.execute("DROP POLICY IF EXISTS events_tenant_analyst_read ON events")
    op.execute("DROP POLICY IF EXISTS events_analyst_read ON events")
    op.execute("ALTER TABLE events DISABLE ROW LEVEL SECURITY")
    op.drop_index("events_type_recorded_at_idx", table_name="events")
    op.drop_index("events_tenant_recorded_at_idx", table_name="events")
    # CREATE on public stays revoked: that is PostgreSQL 15's own default.
    op.execute(DROP_ROLES)
