"""Lag-aware back pressure through a real bus: a replication slot that nothing confirms, on a
private PostgreSQL cluster, makes the bus refuse writes tier by tier (basic first, enterprise
last) with ``503`` + ``Retry-After``; once the slot is advanced, every tier is served again.
The last test puts the real tailer and its Kinesis publisher behind the bus, on a fake Kinesis that hangs."""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from devtools.postgres_cluster import ClusterUnavailableError, TemporaryCluster, cloned_database, create_template
from event_bus.settings import BusSettings
from kernel.auth import AuthSettings
from tailer import LogTailer
from tailer.settings import TailerSettings, TailerTuning
from tests.fixtures.bus import SECRET, RunningBus, running_bus
from tests.fixtures.kinesis import FakeKinesis
from tests.fixtures.waiting import wait_for

PROBLEM = "application/problem+json"
MIB = 1_048_576


@pytest.fixture(scope="module")
def private_server() -> Iterator[str]:
    """A cluster of this module's own: the slot lag counts all of a cluster's WAL, so no other
    test's writes may move it."""
    try:
        cluster = TemporaryCluster.start()
    except ClusterUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        create_template(cluster.url)
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def database(private_server: str) -> Iterator[str]:
    with cloned_database(private_server) as url:
        yield url


@pytest.fixture
def slot(database: str) -> Iterator[str]:
    """A logical slot of the database that nothing reads or confirms, as if the tailer had stopped."""
    name = f"tagbus_bp_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    yield name
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def settings(database: str, slot: str, **bounds: Any) -> BusSettings:
    return BusSettings(
        database_url=database,
        auth=AuthSettings(jwt_secret=SECRET),
        pool_size=4,
        backpressure_slot=slot,
        backpressure_interval_seconds=0.1,
        **bounds,
    )


def event(**fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/bp", "type": "t", "subject": "s"} | fields


def write_wal(database: str, size: int) -> None:
    """About ``size`` bytes of WAL that hold no event (a non-transactional logical message)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'tagbus-test', repeat('x', %s))", (size,))


def slot_lag(database: str, slot: str) -> int:
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def advance(database: str, slot: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (slot,))


def metric(bus: RunningBus, sample: str) -> float | None:
    text = httpx.get(f"{bus.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


#: A wait on the bus's back pressure, which samples the slot's lag on its own schedule.
wait_until = functools.partial(wait_for, timeout=20.0, interval=0.05)


def shedding(bus: RunningBus, tier: str) -> bool:
    return metric(bus, f'tagbus_backpressure_shedding{{tier="{tier}"}}') == 1.0


def post(bus: RunningBus, tier: str) -> httpx.Response:
    with bus.client(f"acme-{tier}", tier=tier) as client:
        return client.post("/v1/events", json=event())


def assert_refused(response: httpx.Response, tier: str) -> int:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"].endswith("/pipeline-behind") and body["status"] == 503 and body["tier"] == tier
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def stored(database: str, tenant: str) -> int:
    with psycopg.connect(database) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)).fetchall()
    return int(count)


def test_slot_lag_past_the_bound_sheds_basic_first_and_enterprise_last(database: str, slot: str) -> None:
    bound = 4 * MIB  # basic is shed from 2 MiB, premium from 3 MiB, enterprise from 4 MiB
    with running_bus(settings(database, slot, backpressure_lag_bytes=bound)) as bus:
        assert post(bus, "basic").status_code == 201
        assert metric(bus, "tagbus_backpressure_lag_bound_bytes") == bound

        write_wal(database, int(2.3 * MIB))
        wait_until(lambda: shedding(bus, "basic"), "basic to be shed")
        basic_retry = assert_refused(post(bus, "basic"), "basic")
        with bus.client("acme-basic", tier="basic") as client:
            assert_refused(client.post("/v1/events:batch", json=[event(), event()]), "basic")
        assert post(bus, "premium").status_code == 201
        assert post(bus, "enterprise").status_code == 201

        write_wal(database, 1 * MIB)
        wait_until(lambda: shedding(bus, "premium"), "premium to be shed")
        assert bound * 0.75 <= slot_lag(database, slot) < bound
        assert_refused(post(bus, "premium"), "premium")
        assert post(bus, "enterprise").status_code == 201, "enterprise is shed only at the bound"
        assert not shedding(bus, "enterprise")
        # Deeper past its threshold, basic is told to wait at least as long as before.
        assert assert_refused(post(bus, "basic"), "basic") >= basic_retry

        lag = metric(bus, "tagbus_pipeline_slot_lag_bytes")
        assert lag is not None and lag >= bound * 0.75
        refused = metric(bus, 'tagbus_http_requests_total{route="post_event",status="503",tier="basic"}')
        assert refused is not None and refused >= 2

        advance(database, slot)  # the tailer caught up
        wait_until(lambda: not shedding(bus, "basic"), "basic to be served again")
        assert post(bus, "basic").status_code == 201
        assert post(bus, "premium").status_code == 201
    # What was refused was never written.
    assert stored(database, "acme-basic") == 2
    assert stored(database, "acme-premium") == 2


def test_stale_wal_past_the_freshness_bound_sheds_every_tier_until_the_slot_moves(database: str, slot: str) -> None:
    # Nothing confirms the slot here, not even WAL the server writes on its own after the
    # advance below: a bound of 3 s leaves basic 1.5 s of headroom for the last posts.
    with running_bus(settings(database, slot, backpressure_freshness_seconds=3.0)) as bus:
        write_wal(database, 1_000)  # unconfirmed WAL, tiny: only its age can matter
        wait_until(lambda: shedding(bus, "enterprise"), "enterprise to be shed")
        freshness = metric(bus, "tagbus_pipeline_freshness_seconds")
        assert freshness is not None and freshness >= 3.0
        assert_refused(post(bus, "enterprise"), "enterprise")
        assert_refused(post(bus, "basic"), "basic")

        advance(database, slot)
        wait_until(lambda: not shedding(bus, "basic"), "every tier to be served again")
        assert post(bus, "enterprise").status_code == 201
        assert post(bus, "basic").status_code == 201


def test_a_missing_slot_sheds_nothing(database: str) -> None:
    with running_bus(settings(database, "tagbus_no_such_slot", backpressure_lag_bytes=1)) as bus:
        lag = metric(bus, "tagbus_pipeline_slot_lag_bytes")
        assert lag is not None and lag != lag  # NaN: unknown
        assert post(bus, "basic").status_code == 201


def test_a_stalled_tailer_sheds_tier_by_tier_and_its_recovery_serves_every_tier(database: str) -> None:
    slot = f"tagbus_bp_{uuid.uuid4().hex[:10]}"
    kinesis = FakeKinesis()  # answers at once while available, hangs while not, as a stalled stream does
    tailer = LogTailer(
        TailerSettings(database_url=database, slot_name=slot, stream_name="tagbus-test"),
        kinesis,
        tuning=TailerTuning(status_interval_seconds=0.0),
    )
    stop = threading.Event()
    failures: list[BaseException] = []

    def relay() -> None:
        try:
            tailer.run(stop)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=relay, name="test-tailer", daemon=True)
    thread.start()
    accepted: set[str] = set()
    refused: set[str] = set()

    def published() -> set[str]:
        return {e.id for e in kinesis.events()}

    def send(bus: RunningBus, tier: str) -> httpx.Response:
        body = event()
        with bus.client(f"acme-{tier}", tier=tier) as client:
            response = client.post("/v1/events", json=body)
        (accepted if response.status_code == 201 else refused).add(body["id"])
        return response

    try:
        wait_until(lambda: slot_exists(database, slot), "the tailer to create its slot")
        # Enterprise shed once unpublished WAL is 10 s old, basic from 5 s.
        with running_bus(settings(database, slot, backpressure_freshness_seconds=10.0)) as bus:
            assert send(bus, "basic").status_code == 201
            wait_until(lambda: accepted <= published(), "the tailer to publish")

            kinesis.available.clear()  # Kinesis hangs: the slot stops moving
            assert send(bus, "enterprise").status_code == 201
            wait_until(lambda: shedding(bus, "basic"), "basic to be shed")
            assert_refused(send(bus, "basic"), "basic")
            assert send(bus, "enterprise").status_code == 201
            wait_until(lambda: shedding(bus, "enterprise"), "enterprise to be shed")
            assert_refused(send(bus, "enterprise"), "enterprise")

            kinesis.available.set()  # Kinesis is back: the tailer publishes and confirms the backlog
            wait_until(lambda: not shedding(bus, "basic"), "every tier to be served again")
            assert send(bus, "basic").status_code == 201
            assert send(bus, "enterprise").status_code == 201
            wait_until(lambda: accepted <= published(), "the tailer to publish what was accepted")
        assert not failures, failures
    finally:
        kinesis.available.set()
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the tailer did not stop"
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            )
    assert not refused & published()  # a refused event was never written, so never published
    assert len(accepted) == 5 and len(refused) == 2


def slot_exists(database: str, slot: str) -> bool:
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return row is not None and row[0] is not None
