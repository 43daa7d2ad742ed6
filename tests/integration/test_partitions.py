"""The partitioned events table against a real PostgreSQL: migration 0003, maintenance, and
what the bus and the tailer rely on (idempotency, decoding through the publication).

Tailer checks peek the slot with the tailer's own :class:`SlotReader` and
:class:`ChangeDecoder`, so they see exactly what the tailer would publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from psycopg import sql

from devtools.postgres_cluster import REPO_ROOT, sqlalchemy_url, with_database
from event_bus.partitions import Month, PartitionError, PartitionKeeper, detach_before, ensure_partitions
from kernel.envelope import StoredEvent
from kernel.schema import PUBLICATION
from tailer import ChangeDecoder, SlotReader
from tests.fixtures.bus import RunningBus
from tests.fixtures.waiting import wait_for_async
from tests.integration.test_analyst import session_as

INSERT = (
    "INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, recorded_at, digest)"
    " VALUES (%s, %s, %s, %s, 'thing.happened', '/tests', %s, 'digest')"
)


def event(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/test", "type": "thing.happened"}
    body.update(fields)
    return body


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url))
    return cfg


@pytest.fixture
def fresh_database(pg_server_url: str) -> Iterator[str]:
    """An empty database (no migration applied), dropped with its slots afterwards."""
    name = f"tagbus_part_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (name,)
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def slot(url: str, name: str) -> Iterator[SlotReader]:
    reader = SlotReader(url, name, PUBLICATION)
    reader.ensure_slot()
    try:
        yield reader
    finally:
        reader.close()


def decoded(reader: SlotReader) -> list[StoredEvent]:
    """Every event the tailer would publish from the slot now (peeked, not consumed)."""
    transactions = ChangeDecoder().decode(reader.peek(100_000))
    return [e for t in transactions for e in t.events]


# ------------------------------------------------------------------ migration 0003


def test_upgrade_keeps_rows_and_ids_and_does_not_republish_them(fresh_database: str, slot_name: str) -> None:
    cfg = alembic_config(fresh_database)
    command.upgrade(cfg, "0002")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        for i in range(1, 7):  # spread over several months, as a young table would be
            conn.execute(INSERT, (f"old-{i}", "a", "s", i, f"2026-0{i}-10T12:00:00Z"))
    with slot(fresh_database, slot_name) as reader:
        command.upgrade(cfg, "head")
        assert decoded(reader) == []  # the copy was already published once: not again
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'events'").fetchone() == ("p",)
            rows = conn.execute("SELECT id, event_id, tableoid::regclass::text FROM events ORDER BY id").fetchall()
            assert [(r[0], r[1]) for r in rows] == [(i, f"old-{i}") for i in range(1, 7)]
            assert {r[2] for r in rows} == {f"events_2026_0{i}" for i in range(1, 7)}
            assert conn.execute("SELECT count(*) FROM event_keys").fetchone() == (6,)
            # A copied id is still taken, and new ids continue after the copied ones.
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(INSERT, ("old-3", "a", "s", 99, "2026-11-10T12:00:00Z"))
            conn.execute(INSERT, ("new-1", "a", "s", 7, datetime.now(UTC)))
            [(new_id,)] = conn.execute("SELECT id FROM events WHERE event_id = 'new-1'").fetchall()
            assert new_id > 6
        # The tailer's decoder sees the new insert as relation events, through the root.
        [new] = decoded(reader)
        assert (new.id, new.tenant, new.stream, new.version) == ("new-1", "a", "s", 7)


def test_downgrade_rebuilds_the_plain_table_and_refuses_with_an_archive(fresh_database: str) -> None:
    cfg = alembic_config(fresh_database)
    command.upgrade(cfg, "head")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(INSERT, ("e-1", "a", "s", 1, datetime.now(UTC)))
    command.downgrade(cfg, "0002")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE event_id = 'e-1'").fetchone() == (1,)
        assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'events'").fetchone() == ("r",)
    command.upgrade(cfg, "head")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        ensure_partitions(conn, 0, now=datetime(2025, 1, 5, tzinfo=UTC))
        conn.execute(INSERT, ("e-old", "a", "s", 2, "2025-01-10T00:00:00Z"))
        assert detach_before(conn, Month(2025, 2)) == ["events_2025_01"]
    with pytest.raises(Exception, match="archived event partitions exist"):
        command.downgrade(cfg, "0002")


# ------------------------------------------------------------------ partitions ahead


def test_partitions_are_made_ahead_idempotently_with_monthly_bounds(database_url: str) -> None:
    now = datetime(2030, 12, 31, 23, 0, tzinfo=UTC)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert ensure_partitions(conn, 2, now=now) == ["events_2030_12", "events_2031_01", "events_2031_02"]
        assert ensure_partitions(conn, 2, now=now) == []
        conn.execute(INSERT, ("last", "a", "s", 1, "2031-02-28T23:59:59.999999Z"))
        where = conn.execute("SELECT tableoid::regclass::text FROM events WHERE event_id = 'last'").fetchone()
        assert where == ("events_2031_02",)
        with pytest.raises(psycopg.errors.CheckViolation):  # no DEFAULT partition: loud
            conn.execute(INSERT, ("after", "a", "s", 2, "2031-03-01T00:00:00Z"))


def test_concurrent_makers_do_not_collide(database_url: str) -> None:
    now = datetime(2032, 5, 1, tzinfo=UTC)
    barrier = threading.Barrier(4)

    def make(_: int) -> list[str]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            barrier.wait()
            return ensure_partitions(conn, 3, now=now)

    with ThreadPoolExecutor(4) as pool:
        created = [name for names in pool.map(make, range(4)) for name in names]
    assert sorted(created) == ["events_2032_05", "events_2032_06", "events_2032_07", "events_2032_08"]


def test_bus_start_made_the_current_month_and_ahead(bus: RunningBus, database_url: str) -> None:
    current = Month.of(datetime.now(UTC))
    with psycopg.connect(database_url) as conn:
        names = {r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'events\\_2%'")}
    assert {current.plus(i).table for i in range(4)} <= names


def test_an_insert_without_partition_is_a_loud_503_until_maintenance(bus: RunningBus, database_url: str) -> None:
    current = Month.of(datetime.now(UTC))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE events DETACH PARTITION {}").format(sql.Identifier(current.table)))
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO hidden_month").format(sql.Identifier(current.table)))
    with bus.client("acme") as client:
        single = client.post("/v1/events", json=event(subject="a/1"))
        batch = client.post("/v1/events:batch", json=[event(subject="a/1"), event(subject="a/2")])
        for response in (single, batch):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert "retry-after" in response.headers
        with psycopg.connect(database_url, autocommit=True) as conn:
            assert ensure_partitions(conn, 0) == [current.table]
        assert client.post("/v1/events", json=event(subject="a/1")).status_code == 201


# ------------------------------------------------------------------ RLS through the parent


def test_rls_holds_on_the_partitioned_table_and_partitions_are_closed(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_partitions(conn, 1, now=datetime(2026, 1, 1, tzinfo=UTC))
        for i, (tenant, month) in enumerate([("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 2)]):
            conn.execute(INSERT, (f"e-{i}", tenant, "s", i + 1, f"2026-0{month}-05T00:00:00Z"))
    with session_as(database_url, "tagbus_tenant_analyst", tenant="a") as conn:
        assert conn.execute("SELECT tenant_id, count(*) FROM events GROUP BY 1").fetchall() == [("a", 2)]
        # The planner prunes to one partition; RLS still applies.
        assert conn.execute(
            "SELECT count(*) FROM events WHERE recorded_at >= '2026-02-01' AND recorded_at < '2026-03-01'"
        ).fetchone() == (1,)
    with session_as(database_url, "tagbus_tenant_analyst") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    with session_as(database_url, "tagbus_analyst") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (5,)
    for role in ("tagbus_analyst", "tagbus_tenant_analyst"):
        for relation in ("events_2026_02", "event_keys"):
            with (
                session_as(database_url, role, tenant="a") as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(relation)))


# ------------------------------------------------------------------ archive


def test_detach_keeps_bus_and_tailer_working_and_the_archive_readable(
    bus: RunningBus, database_url: str, slot_name: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_partitions(conn, 0, now=datetime(2025, 3, 1, tzinfo=UTC))
        conn.execute(INSERT, ("old-a", "a", "s", 1, "2025-03-10T00:00:00Z"))
        conn.execute(INSERT, ("old-b", "b", "s", 1, "2025-03-11T00:00:00Z"))
    with slot(database_url, slot_name) as reader, bus.client("a") as client:
        before = client.post("/v1/events", json=event(subject="s"))
        assert before.status_code == 201
        with psycopg.connect(database_url, autocommit=True) as conn:
            # autocommit: DETACH … CONCURRENTLY, while the bus keeps running
            assert detach_before(conn, Month.of(datetime.now(UTC))) == ["events_2025_03"]
            assert detach_before(conn, Month.of(datetime.now(UTC))) == []
        after = client.post("/v1/events", json=event(subject="s"))
        assert after.status_code == 201 and after.json()["version"] == before.json()["version"] + 1
        assert client.get(after.headers["location"]).status_code == 200
        published = [e.id for e in decoded(reader)]
        assert published == [before.json()["id"], after.json()["id"]]
        # The archived id stays taken: a repeat is no new event (its key row outlives the detach).
        with pytest.raises(psycopg.errors.UniqueViolation), psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(INSERT, ("old-a", "a", "s", 9, datetime.now(UTC)))
    with session_as(database_url, "tagbus_analyst") as conn:
        assert conn.execute("SELECT count(*) FROM archive.events_2025_03").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM events WHERE recorded_at < '2025-04-01'").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM archive.events_2025_03")
    with session_as(database_url, "tagbus_tenant_analyst", tenant="b") as conn:
        assert conn.execute("SELECT event_id FROM archive.events_2025_03").fetchall() == [("old-b",)]


def test_current_month_cannot_be_archived_past(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, pytest.raises(PartitionError, match="current month"):
        detach_before(conn, Month.of(datetime.now(UTC)).plus(1))


# ------------------------------------------------------------------ idempotency through event_keys


def test_concurrent_batch_repeats_store_each_event_once(bus: RunningBus, database_url: str) -> None:
    batch = [event(subject=f"order/{i % 3}") for i in range(20)]
    with bus.client("acme") as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/events:batch", json=batch), range(8)))
        assert {r.status_code for r in responses} == {201}
        statuses = sorted(tuple(x["status"] for x in r.json()["results"]) for r in responses)
        assert statuses == [(200,) * 20] * 7 + [(201,) * 20]
        changed = client.post("/v1/events:batch", json=[batch[0] | {"data": {"other": 1}}])
        assert changed.status_code == 409
        again = client.post("/v1/events", json=batch[5])
        created = next(r for r in responses if r.json()["results"][0]["status"] == 201)
        assert again.status_code == 200
        assert again.json() == {k: v for k, v in created.json()["results"][5].items() if k != "status"}
    with psycopg.connect(database_url) as conn:
        ids = [e["id"] for e in batch]
        assert conn.execute("SELECT count(*) FROM events WHERE event_id = ANY(%s)", (ids,)).fetchone() == (20,)
        assert conn.execute("SELECT count(*) FROM event_keys WHERE event_id = ANY(%s)", (ids,)).fetchone() == (20,)
        mismatched = conn.execute(
            "SELECT count(*) FROM events e JOIN event_keys k USING (tenant_id, event_id)"
            " WHERE (k.id, k.recorded_at, k.stream_id, k.version, k.digest)"
            " IS DISTINCT FROM (e.id, e.recorded_at, e.stream_id, e.version, e.digest)"
        ).fetchone()
        assert mismatched == (0,)


def test_expected_version_events_are_idempotent_too(bus: RunningBus) -> None:
    """Written by the per-event statement (not the set-based insert): the trigger keys them as well."""
    first = event(subject="acct/1", expectedversion=0)
    with bus.client("acme") as client:
        created = client.post("/v1/events", json=first)
        repeat = client.post("/v1/events", json=first)
        changed = client.post("/v1/events", json=first | {"data": 1})
    assert (created.status_code, repeat.status_code, changed.status_code) == (201, 200, 409)
    assert repeat.json() == created.json()
    # The changed repeat reuses an id: that conflict, not a stale version (both are 409s).
    assert changed.json()["type"].endswith("id-conflict")


def test_the_keeper_makes_a_missing_month_again_on_its_next_round(database_url: str) -> None:
    ahead = Month.of(datetime.now(UTC)).plus(2)
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_partitions(conn, 3)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(ahead.table)))  # empty, months ahead

    def made_again() -> bool:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT to_regclass(%s)", (ahead.table,)).fetchone() != (None,)

    async def rounds() -> None:
        keeper = PartitionKeeper(database_url, interval=0.05)
        await keeper.start()
        try:
            await wait_for_async(made_again, f"the keeper to make {ahead.table} again", 10, interval=0.05)
        finally:
            await keeper.stop()

    asyncio.run(rounds())


def test_tagbus_maintain_prints_what_it_did_and_one_line_errors(database_url: str, tmp_path: Path) -> None:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(database_url)
    url = f"postgresql://{params['user']}@{params['host']}:{params['port']}/{params['dbname']}"
    env = {**os.environ, "TAGBUS_DATABASE_URL": url, "TAGBUS_HOME": str(tmp_path)}
    tagbus = [sys.executable, "-m", "tagbus"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_partitions(conn, 0, now=datetime(2024, 6, 1, tzinfo=UTC))

    made = subprocess.run(
        [*tagbus, "maintain", "--months-ahead", "5"], check=False, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    assert Month.of(datetime.now(UTC)).plus(5).table in made.stdout

    archived = subprocess.run(
        [*tagbus, "maintain", "--archive-before", "2024-07"], check=False, env=env, capture_output=True, text=True
    )
    assert archived.returncode == 0, archived.stderr
    assert "archived to schema archive: events_2024_06" in archived.stdout

    for bad in (["--archive-before", "July"], ["--archive-before", "2999-01"]):
        failed = subprocess.run([*tagbus, "maintain", *bad], check=False, env=env, capture_output=True, text=True)
        assert failed.returncode != 0
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
