"""Analyst access against a real PostgreSQL: roles, row-level security, views and ``run_query``.

Every check runs in a real session that has SET ROLE into the group role under test, on a
database migrated to head (migration 0002, on the partitioned table of 0003).
"""

from __future__ import annotations

import contextlib
import csv
import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from event_bus.partitions import ensure_partitions
from tagbus.analyst import QueryError, QueryResult, render_table, run_query, to_csv, to_json
from tagbus.settings import Settings, load

VIEWS = ("events_by_day", "stream_history", "config_changes", "ingest_latency")


def insert_event(
    conn: psycopg.Connection[Any],
    *,
    tenant: str,
    stream: str,
    version: int,
    type: str = "thing.happened",
    data: Any = None,
    sub: str = "svc",
    recorded_at: str = "2026-01-02T10:00:00Z",
    occurred_at: str | None = None,
) -> None:
    conn.execute(
        """
        INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, occurred_at, recorded_at,
                            data, metadata, digest)
        VALUES (%s, %s, %s, %s, %s, '/tests', %s, %s, %s::jsonb, %s::jsonb, 'digest')
        """,
        (
            str(uuid.uuid4()),
            tenant,
            stream,
            version,
            type,
            occurred_at,
            recorded_at,
            orjson.dumps(data).decode(),
            orjson.dumps({"sub": sub}).decode(),
        ),
    )


@pytest.fixture
def seeded(database_url: str) -> str:
    """Two tenants' events, inserted as the owner (the bus's role): RLS must not get in its way."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The rows are of January 2026, a month the fresh database has no partition for.
        ensure_partitions(conn, months_ahead=0, now=datetime(2026, 1, 15, tzinfo=UTC))
        key = "tenantconfig:limits/rate"
        insert_event(
            conn,
            tenant="a",
            stream=key,
            version=1,
            type="config.set",
            data={"key": key, "value": 10},
            sub="alice",
            recorded_at="2026-01-02T10:00:00Z",
        )
        insert_event(
            conn,
            tenant="a",
            stream=key,
            version=2,
            type="config.set",
            data={"key": key, "value": 20},
            sub="bob",
            recorded_at="2026-01-02T11:00:00Z",
        )
        insert_event(
            conn,
            tenant="a",
            stream=key,
            version=3,
            type="config.deleted",
            data={"key": key},
            sub="carol",
            recorded_at="2026-01-03T09:00:00Z",
        )
        insert_event(
            conn,
            tenant="a",
            stream=key,
            version=4,
            type="config.set",
            data={"key": key, "value": 5},
            sub="dave",
            recorded_at="2026-01-03T09:30:00Z",
        )
        insert_event(
            conn,
            tenant="a",
            stream="order-1",
            version=1,
            recorded_at="2026-01-02T12:00:00Z",
            occurred_at="2026-01-02T11:59:59.9Z",
        )
        insert_event(
            conn,
            tenant="a",
            stream="order-1",
            version=2,
            recorded_at="2026-01-02T23:59:59Z",
            occurred_at="2026-01-02T23:59:58.7Z",
        )
        insert_event(
            conn,
            tenant="b",
            stream=key,
            version=1,
            type="config.set",
            data={"key": key, "value": 99},
            sub="mallory",
            recorded_at="2026-01-02T10:00:00Z",
        )
        insert_event(
            conn,
            tenant="b",
            stream="order-9",
            version=1,
            recorded_at="2026-01-02T10:00:00Z",
            occurred_at="2026-01-02T09:59:59Z",
        )
    return database_url


@contextlib.contextmanager
def session_as(url: str, role: str, tenant: str | None = None) -> Iterator[psycopg.Connection[Any]]:
    """A real session that has SET ROLE into ``role`` (optionally with ``tagbus.tenant``)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if tenant is not None:
            conn.execute("SELECT set_config('tagbus.tenant', %s, false)", (tenant,))
        yield conn


def tenants_seen(conn: psycopg.Connection[Any], relation: str) -> set[str]:
    rows = conn.execute(sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(sql.Identifier(relation))).fetchall()
    return {r[0] for r in rows}


# ------------------------------------------------------------------ migration


def test_migrations_0002_and_0003_are_applied(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0003",)
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'events'").fetchone()
        assert kind == ("p",)  # partitioned (0003)
        roles = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'tagbus\\_%analyst' ORDER BY 1"
        ).fetchall()
        assert roles == [("tagbus_analyst", False), ("tagbus_tenant_analyst", False)]
        rls = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = 'events'")
        assert rls.fetchone() == (True, False)
        options = conn.execute(
            "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s) ORDER BY relname", (list(VIEWS),)
        ).fetchall()
        assert {name: opts for name, opts in options} == {v: ["security_invoker=true"] for v in VIEWS}
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'events'")}
        assert {
            "events_tenant_recorded_at_idx",
            "events_type_recorded_at_idx",
            "events_tenant_stream_version_idx",
        } <= indexes


def test_migration_0002_downgrades_and_upgrades_again(database_url: str) -> None:
    """Roles are cluster-wide: re-creating them must be idempotent, and dropping them must not
    fail while other databases (here the test template) still use them."""
    from alembic import command
    from alembic.config import Config

    from devtools.postgres_cluster import REPO_ROOT, sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url))
    command.downgrade(cfg, "0001")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_policies").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('config_changes')").fetchone() == (None,)
    command.upgrade(cfg, "head")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_policies").fetchone() == (4,)


# ------------------------------------------------------------------ no write, no DDL

WRITES = [
    "INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, digest) "
    "VALUES ('x', 'a', 's', 99, 't', '/s', 'd')",
    "UPDATE events SET type = 'changed'",
    "DELETE FROM events",
    "DELETE FROM streams",
    "TRUNCATE events",
    "CREATE TABLE loot (x int)",
    "CREATE VIEW loot AS SELECT 1",
    "DROP TABLE events",
    "DROP VIEW events_by_day",
    "ALTER TABLE events DISABLE ROW LEVEL SECURITY",
    "DROP POLICY events_analyst_read ON events",
    "CREATE SCHEMA loot",
]


@pytest.mark.parametrize("role", ["tagbus_analyst", "tagbus_tenant_analyst"])
@pytest.mark.parametrize("statement", WRITES)
def test_analyst_roles_cannot_write_or_change_schema(seeded: str, role: str, statement: str) -> None:
    with session_as(seeded, role, tenant="a") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement.encode())
    with psycopg.connect(seeded) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE type <> 'changed'").fetchone() == (8,)


def test_analyst_sees_every_tenant(seeded: str) -> None:
    with session_as(seeded, "tagbus_analyst") as conn:
        for relation in ("events", *VIEWS):
            assert tenants_seen(conn, relation) == {"a", "b"}, relation


# ------------------------------------------------------------------ row-level security


@pytest.mark.parametrize("relation", ["events", *VIEWS])
def test_tenant_analyst_sees_only_its_tenant(seeded: str, relation: str) -> None:
    with session_as(seeded, "tagbus_tenant_analyst", tenant="a") as conn:
        assert tenants_seen(conn, relation) == {"a"}
    with session_as(seeded, "tagbus_tenant_analyst", tenant="b") as conn:
        assert tenants_seen(conn, relation) == {"b"}


@pytest.mark.parametrize("relation", ["events", *VIEWS])
def test_tenant_analyst_without_tenant_sees_nothing(seeded: str, relation: str) -> None:
    with session_as(seeded, "tagbus_tenant_analyst") as conn:
        assert tenants_seen(conn, relation) == set()
        conn.execute("SELECT set_config('tagbus.tenant', '', false)")  # set, then emptied: still nothing
        assert tenants_seen(conn, relation) == set()


def test_tenant_filter_cannot_be_bypassed_by_predicates(seeded: str) -> None:
    with session_as(seeded, "tagbus_tenant_analyst", tenant="a") as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = 'b'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = 'b' OR true").fetchone() == (6,)


def test_owner_still_reads_and_writes_every_row(seeded: str) -> None:
    with psycopg.connect(seeded, autocommit=True) as conn:
        insert_event(conn, tenant="c", stream="s", version=1)
        assert conn.execute("SELECT count(DISTINCT tenant_id) FROM events").fetchone() == (3,)


# ------------------------------------------------------------------ views


def test_config_changes_old_to_new_with_who_and_when(seeded: str) -> None:
    with session_as(seeded, "tagbus_analyst") as conn:
        rows = conn.execute(
            "SELECT version, type, old_value, new_value, who, changed_at::text FROM config_changes "
            "WHERE tenant_id = 'a' AND key = 'tenantconfig:limits/rate' ORDER BY version"
        ).fetchall()
    assert [r[:5] for r in rows] == [
        (1, "config.set", None, 10, "alice"),
        (2, "config.set", 10, 20, "bob"),
        (3, "config.deleted", 20, None, "carol"),
        (4, "config.set", None, 5, "dave"),
    ]
    assert rows[0][5].startswith("2026-01-02")


def test_events_by_day_counts_in_utc_days(seeded: str) -> None:
    with session_as(seeded, "tagbus_analyst") as conn:
        conn.execute("SET TimeZone = 'Pacific/Auckland'")  # UTC days, whatever the client's zone
        rows = conn.execute("SELECT day::text, tenant_id, type, count FROM events_by_day ORDER BY 1, 2, 3").fetchall()
    assert rows == [
        ("2026-01-02", "a", "config.set", 2),
        ("2026-01-02", "a", "thing.happened", 2),
        ("2026-01-02", "b", "config.set", 1),
        ("2026-01-02", "b", "thing.happened", 1),
        ("2026-01-03", "a", "config.deleted", 1),
        ("2026-01-03", "a", "config.set", 1),
    ]


def test_stream_history_and_ingest_latency(seeded: str) -> None:
    with session_as(seeded, "tagbus_tenant_analyst", tenant="a") as conn:
        history = conn.execute(
            "SELECT version, type, sub FROM stream_history WHERE stream_id = 'order-1' ORDER BY version"
        ).fetchall()
        latency = conn.execute("SELECT tenant_id, day::text, events, p50_ms, p99_ms FROM ingest_latency").fetchall()
    assert history == [(1, "thing.happened", "svc"), (2, "thing.happened", "svc")]
    assert len(latency) == 1
    tenant, day, count, p50, p99 = latency[0]
    assert (tenant, day, count) == ("a", "2026-01-02", 2)
    assert p50 == pytest.approx(200.0)  # midpoint of 100 ms and 300 ms
    assert p99 == pytest.approx(100 + 0.99 * 200)


# ------------------------------------------------------------------ run_query


def settings_for(url: str, **extra: str) -> Settings:
    return load({"TAGBUS_DATABASE_URL": url, **extra}, home=Path("/nonexistent/tagbus-home"))


def query(url: str, text: str, *, tenant: str | None = None, limit: int = 100) -> QueryResult:
    return run_query(settings_for(url), text, tenant=tenant, limit=limit)


def test_run_query_returns_columns_and_rows(seeded: str) -> None:
    result = query(seeded, "SELECT tenant_id, count(*) AS n FROM events GROUP BY 1 ORDER BY 1")
    assert result == QueryResult(columns=("tenant_id", "n"), rows=(("a", 6), ("b", 2)), truncated=False)


def test_run_query_tenant_scope(seeded: str) -> None:
    assert query(seeded, "SELECT DISTINCT tenant_id FROM events", tenant="b").rows == (("b",),)
    assert query(seeded, "SELECT count(*) FROM config_changes", tenant="a").rows == ((4,),)


def test_run_query_limit_truncates(seeded: str) -> None:
    result = query(seeded, "SELECT g FROM generate_series(1, 1000000) AS g", limit=3)
    assert result.rows == ((1,), (2,), (3,))
    assert result.truncated


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM events",
        "UPDATE events SET type = 'x'",
        "INSERT INTO streams VALUES ('a', 's', 1)",
        "CREATE TABLE loot (x int)",
        "DROP TABLE events",
    ],
)
def test_run_query_refuses_writes(seeded: str, statement: str) -> None:
    with pytest.raises(QueryError) as info:
        query(seeded, statement)
    assert info.value.sqlstate in {"25006", "42501"}
    assert "read-only" in str(info.value)
    assert "\n" not in str(info.value)
    with psycopg.connect(seeded) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (8,)


@pytest.mark.parametrize(
    "statement",
    [
        # The database URL is a superuser: SET ROLE alone could be undone from inside the query.
        "RESET ROLE",
        "SET ROLE postgres",
        "SELECT set_config('role', 'postgres', false), pg_read_file('PG_VERSION')",
        "SELECT set_config('role', 'postgres', false), "
        "query_to_xml('SELECT pg_read_file(''PG_VERSION'')', true, false, '')",
        "SELECT pg_read_file('PG_VERSION')",
        "SELECT 1; DELETE FROM events",
        "COPY (SELECT 1) TO PROGRAM 'true'",
    ],
)
def test_run_query_sandbox_cannot_be_escaped(seeded: str, statement: str) -> None:
    with pytest.raises(QueryError):
        query(seeded, statement)


def test_run_query_tenant_cannot_widen_role(seeded: str) -> None:
    # The throwaway login of a --tenant run is only in the tenant group.
    with pytest.raises(QueryError) as info:
        query(seeded, "SELECT set_config('role', 'tagbus_analyst', false)", tenant="a")
    assert info.value.sqlstate == "42501"


def test_run_query_leaves_no_login_roles_behind(seeded: str) -> None:
    query(seeded, "SELECT 1")
    with pytest.raises(QueryError):
        query(seeded, "SELECT * FROM nowhere")
    with psycopg.connect(seeded) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tagbus\\_query\\_%'").fetchone() == (0,)


def test_run_query_errors_are_one_line_with_sqlstate(seeded: str) -> None:
    with pytest.raises(QueryError) as info:
        query(seeded, "SELECT * FROM nowhere")
    assert str(info.value) == 'relation "nowhere" does not exist (SQLSTATE 42P01)'
    with pytest.raises(QueryError) as timeout:
        run_query(settings_for(seeded), "SELECT pg_sleep(5)", tenant=None, limit=1, statement_timeout=0.2)
    assert timeout.value.sqlstate == "57014"


def test_run_query_with_a_personal_login(seeded: str) -> None:
    """TAGBUS_ANALYST_DATABASE_URL: a login granted into the tenant group is used as is."""
    name = f"analyst_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(seeded, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE tagbus_tenant_analyst").format(sql.Identifier(name)))
    try:
        personal = psycopg.conninfo.make_conninfo(seeded, user=name)
        settings = settings_for(seeded, TAGBUS_ANALYST_DATABASE_URL=personal)
        assert run_query(settings, "SELECT DISTINCT tenant_id FROM events", tenant="a", limit=10).rows == (("a",),)
        with pytest.raises(QueryError) as info:  # not in tagbus_analyst: no all-tenant reads
            run_query(settings, "SELECT count(*) FROM events", tenant=None, limit=10)
        assert info.value.sqlstate == "42501"
    finally:
        with psycopg.connect(seeded, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


# ------------------------------------------------------------------ output


def test_csv_and_json_output(seeded: str) -> None:
    result = query(
        seeded,
        "SELECT key, version, old_value, new_value, who, changed_at, 1.50::numeric AS price FROM config_changes "
        "WHERE tenant_id = 'a' ORDER BY version LIMIT 2",
    )
    parsed = list(csv.reader(io.StringIO(to_csv(result))))
    assert parsed[0] == ["key", "version", "old_value", "new_value", "who", "changed_at", "price"]
    assert parsed[1][:5] == ["tenantconfig:limits/rate", "1", "", "10", "alice"]
    assert parsed[1][5].startswith("2026-01-02T10:00:00")
    assert parsed[2][2:4] == ["10", "20"]
    assert parsed[1][6] == "1.50"

    objects = orjson.loads(to_json(result))
    assert objects[1]["old_value"] == 10
    assert objects[1]["new_value"] == 20
    assert objects[0]["old_value"] is None
    assert objects[0]["price"] == 1.5
    assert objects[0]["changed_at"].startswith("2026-01-02T10:00:00")


def test_json_values_stay_json_and_table_renders(seeded: str) -> None:
    result = query(
        seeded,
        "SELECT data, interval '1.5 seconds' AS d FROM events WHERE version = 1 "
        "AND stream_id = 'tenantconfig:limits/rate' AND tenant_id = 'a'",
    )
    assert orjson.loads(to_json(result)) == [{"data": {"key": "tenantconfig:limits/rate", "value": 10}, "d": 1.5}]
    assert "tenantconfig:limits/rate" in to_csv(result)
    table = render_table(result)
    assert table.row_count == 1
