"""Load shedding: past ``max_waiting`` requests waiting on the database, the bus answers 503
with ``Retry-After`` at once instead of letting requests hang towards a timeout."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx
import psycopg
import pytest

from devtools.ports import free_port
from event_bus.app import create_app
from event_bus.settings import BusSettings
from event_bus.store import EventStore
from kernel.auth import AuthSettings
from tests.fixtures.bus import SECRET, TAGS, RunningBus, running_bus, serve
from tests.fixtures.waiting import wait_for

PROBLEM = "application/problem+json"


def event(**fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/shed", "type": "t"} | fields


def blocked_on_the_lock(lock: psycopg.Connection[Any]) -> bool:
    """Whether another session waits on a lock: the commit worker, behind the row lock ``lock`` holds."""
    [(waiting,)] = lock.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchall()
    return bool(waiting)


def in_progress(bus: RunningBus) -> int:
    """Requests the bus is working on, as its admission control counts them."""
    assert bus.app is not None
    count: int = bus.app.state.admission.in_flight
    return count


def one_worker(database_url: str, **limits: Any) -> BusSettings:
    """One commit worker taking one request per group, so a held row lock stalls every commit."""
    return BusSettings(
        database_url=database_url,
        auth=AuthSettings(jwt_secret=SECRET),
        pool_size=4,
        commit_workers=1,
        max_commit_group=1,
        **limits,
    )


@pytest.fixture
def small_bus(database_url: str) -> Iterator[RunningBus]:
    """Room for two waiting requests; the wait itself unbounded (this is about the queue's length)."""
    with running_bus(one_worker(database_url, max_waiting=2, max_queue_delay_seconds=60.0)) as running:
        yield running


def test_requests_that_waited_too_long_are_refused_unwritten(database_url: str) -> None:
    settings = one_worker(database_url, max_queue_delay_seconds=0.5)
    with running_bus(settings) as bus, bus.client("acme") as client:
        assert client.post("/v1/events", json=event(subject="hot")).status_code == 201
        with psycopg.connect(database_url) as lock, ThreadPoolExecutor(4) as pool:
            # The one commit worker blocks on the stream's row lock; later requests queue behind it.
            lock.execute("SELECT version FROM streams WHERE tenant_id = 'acme' AND stream_id = 'hot' FOR UPDATE")
            blocked = pool.submit(client.post, "/v1/events", json=event(subject="hot"))
            wait_for(lambda: blocked_on_the_lock(lock), "the commit worker to block on the row lock")
            queued = [pool.submit(client.post, "/v1/events", json=event(subject="hot")) for _ in range(3)]
            wait_for(lambda: in_progress(bus) == 4, "the three requests to queue")
            # The subject is a bound on the time spent queued: that time has to pass.
            time.sleep(1.5)
            lock.rollback()
            answers = [f.result() for f in queued]
        assert blocked.result().status_code == 201
        for response in answers:
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
        # The queue is on time again: the next request is served.
        assert client.post("/v1/events", json=event(subject="hot")).status_code == 201
    with psycopg.connect(database_url) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM events WHERE stream_id = 'hot'").fetchall()
    assert count == 3  # the refused ones were never written


def test_excess_requests_get_503_with_retry_after_instead_of_hanging(small_bus: RunningBus, database_url: str) -> None:
    with small_bus.client("acme") as client:
        assert client.post("/v1/events", json=event(subject="hot")).status_code == 201
    requests = 12
    with (
        psycopg.connect(database_url) as lock,
        small_bus.client("acme") as client,
        ThreadPoolExecutor(requests) as pool,
    ):
        # Hold the stream's row lock: the one commit worker blocks on it, and requests queue.
        lock.execute("SELECT version FROM streams WHERE tenant_id = 'acme' AND stream_id = 'hot' FOR UPDATE")
        futures: list[Future[httpx.Response]] = [
            pool.submit(client.post, "/v1/events", json=event(subject="hot")) for _ in range(requests)
        ]
        done: set[Future[httpx.Response]] = set()
        # Hanging towards a timeout would take the bus's 60 s of queue delay: 10 s tells them apart.
        deadline = time.monotonic() + 10
        # At most one in the worker and two waiting: the other nine are answered while the lock is held.
        while len(done) < requests - 3 and time.monotonic() < deadline:
            finished, _ = wait(set(futures) - done, timeout=deadline - time.monotonic(), return_when=FIRST_COMPLETED)
            done |= finished
        shed = [f.result() for f in done]
        assert len(shed) == requests - 3 and not any(f.done() for f in set(futures) - done)
        lock.rollback()  # let the queued ones through
        served = [f.result() for f in set(futures) - done]
    for response in shed:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM
        assert int(response.headers["retry-after"]) >= 1
    assert [r.status_code for r in served] == [201] * 3
    with psycopg.connect(database_url) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM events WHERE stream_id = 'hot'").fetchall()
        [(version,)] = conn.execute("SELECT version FROM streams WHERE stream_id = 'hot'").fetchall()
    assert count == version == 4  # only the answered 201s were written, without gaps


def test_past_the_in_flight_limit_requests_are_refused_before_any_work(database_url: str) -> None:
    settings = one_worker(database_url, max_in_flight=2, max_queue_delay_seconds=60.0)
    with running_bus(settings) as bus, bus.client("acme") as client:
        assert client.post("/v1/events", json=event(subject="hot")).status_code == 201
        with psycopg.connect(database_url) as lock, ThreadPoolExecutor(2) as pool:
            # Two requests held in progress behind the stream's row lock: the limit is reached.
            lock.execute("SELECT version FROM streams WHERE tenant_id = 'acme' AND stream_id = 'hot' FOR UPDATE")
            held = [pool.submit(client.post, "/v1/events", json=event(subject="hot")) for _ in range(2)]
            wait_for(lambda: blocked_on_the_lock(lock), "the commit worker to block on the row lock")
            wait_for(lambda: in_progress(bus) == 2, "both requests to be in progress")
            refused = client.post("/v1/events", json=event(subject="hot"))
            # Operators still see the bus: health and metrics are exempt.
            health = client.get("/healthz")
            metrics = client.get("/metrics")
            lock.rollback()
            served = [f.result() for f in held]
        after = client.post("/v1/events", json=event(subject="hot"))
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == PROBLEM
    assert int(refused.headers["retry-after"]) >= 1
    assert "in progress" in refused.json()["detail"]  # refused at once: not after the 60 s queue delay
    assert health.status_code == 200 and metrics.status_code == 200
    assert 'tagbus_http_requests_total{route="admission",status="503",tier="none"} 1.0' in metrics.text
    assert [r.status_code for r in served] == [201, 201]
    assert after.status_code == 201  # below the limit again
    with psycopg.connect(database_url) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM events WHERE stream_id = 'hot'").fetchall()
    assert count == 4  # the refused request was never written


def test_an_unreachable_database_is_503_with_retry_after(pg_server_url: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=1"
    settings = BusSettings(database_url=url, auth=AuthSettings(jwt_secret=SECRET), pool_size=2)
    port = free_port()
    stop = serve(create_app(settings, tags=TAGS, store=EventStore(url, pool_size=2, pool_timeout=0.5)), port)
    bus = RunningBus(f"http://127.0.0.1:{port}", settings)
    try:
        with bus.client("acme") as client:
            responses = {
                "single": client.post("/v1/events", json=event()),
                "batch": client.post("/v1/events:batch", json=[event(), event()]),
                "read": client.get("/v1/events/some-id"),
                "stream": client.get("/v1/streams/some-stream"),
                "ready": client.get("/readyz"),
            }
    finally:
        stop()
    for name, response in responses.items():
        assert response.status_code == 503, (name, response.text)
        assert response.headers["content-type"] == PROBLEM, name
        assert int(response.headers["retry-after"]) >= 1, name
