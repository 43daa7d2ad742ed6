"""The log tailer against a real PostgreSQL: commit order, at-least-once, heartbeat, one active tailer.

Kinesis is a fake client here (scripted partial failures and throttling), plus one test
against a real Kinesis API (kinesis-mock) when ``AWS_ENDPOINT_URL_KINESIS`` is set.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import botocore.exceptions
import orjson
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from devtools.postgres_cluster import ClusterUnavailableError, TemporaryCluster, apply_migrations
from kernel.envelope import StoredEvent
from tailer import (
    DatabaseUnavailableError,
    KinesisPublisher,
    KinesisRejectedError,
    LockUnavailableError,
    LogTailer,
    OversizeRecordError,
    PublishInterruptedError,
    ReplicationStream,
    TailerMetrics,
    libpq_url,
    mask_database_url,
    slot_status,
)
from tailer.drain import DrainingTailer
from tailer.pgoutput import format_lsn, parse_lsn
from tailer.settings import TailerSettings, TailerTuning
from tests.fixtures.kinesis import FakeKinesis, in_version_order, throttling, versions_on_stream
from tests.fixtures.waiting import wait_for

# ------------------------------------------------------------------ helpers


def insert_event(
    conn: psycopg.Connection[Any],
    event_id: str,
    *,
    tenant: str = "acme",
    stream: str = "s1",
    version: int = 1,
    data: Any = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        """
        INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                            data, metadata, digest)
        VALUES (%s, %s, %s, %s, 'thing.happened', '/tests', %s, now(), %s::jsonb, %s::jsonb, 'digest')
        """,
        (
            event_id,
            tenant,
            stream,
            version,
            stream,
            None if data is None else orjson.dumps(data).decode(),
            orjson.dumps(metadata or {}).decode(),
        ),
    )


def commit_events(url: str, *batches: Sequence[tuple[str, str, int]]) -> None:
    """Each batch of (event_id, stream, version) in its own transaction."""
    with psycopg.connect(url) as conn:
        for batch in batches:
            with conn.transaction():
                for event_id, stream, version in batch:
                    insert_event(conn, event_id, stream=stream, version=version, data={"n": version})


class RecordingSink:
    def __init__(self, fail_on_call: int | None = None, ack_before_failing: int = 0) -> None:
        self.events: list[StoredEvent] = []
        self.calls = 0
        self._fail_on_call = fail_on_call
        self._ack_before_failing = ack_before_failing

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        self.calls += 1
        if self.calls == self._fail_on_call:
            # Part of the batch reached the stream, then the publisher died.
            self.events.extend(batch[: self._ack_before_failing])
            raise RuntimeError("sink failed mid-way")
        self.events.extend(batch)


def settings_for(url: str, slot: str, **overrides: Any) -> TailerSettings:
    return TailerSettings(database_url=url, slot_name=slot, stream_name="tagbus-test", **overrides)


def make_tailer(
    url: str,
    slot: str,
    sink: Any = None,
    kinesis: Any = None,
    *,
    registry: CollectorRegistry | None = None,
    **knobs: Any,
) -> DrainingTailer:
    """A tailer of ``slot``, metrics in ``registry``; ``knobs`` are settings (heartbeat, poll interval) or tuning."""
    overrides = {k: knobs.pop(k) for k in ("heartbeat_seconds", "poll_interval_seconds") if k in knobs}
    settings = settings_for(url, slot, **overrides)
    return DrainingTailer(
        settings, kinesis, sink=sink, registry=registry or CollectorRegistry(), tuning=TailerTuning(**knobs)
    )


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's value as Prometheus would scrape it from ``registry``; a sample never exported fails the test."""
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels or ''} is not exported"
    return value


def confirmed_flush(url: str, slot: str) -> int:
    with psycopg.connect(url) as conn:
        status = slot_status(conn, slot)
    assert status is not None and status.confirmed_flush_lsn is not None
    return status.confirmed_flush_lsn


@pytest.fixture
def tailers() -> Iterator[list[LogTailer]]:
    """Tailers to close after the test, so their sessions let go of slots and locks."""
    made: list[LogTailer] = []
    yield made
    for tailer in made:
        tailer.close()


# ------------------------------------------------------------------ commit order


def test_events_are_published_in_commit_order(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    sink = RecordingSink()
    registry = CollectorRegistry()
    tailer = make_tailer(database_url, slot_name, sink, registry=registry)
    tailers.append(tailer)
    assert tailer.try_activate()  # creates the slot before any event is written

    commit_events(database_url, [("a1", "a", 1), ("a2", "a", 2)], [("b1", "b", 1)])
    # Two concurrent transactions: the first takes the lower identity but commits last.
    early = psycopg.connect(database_url)
    late = psycopg.connect(database_url)
    try:
        insert_event(early, "slow", stream="c", version=1)
        insert_event(late, "fast", stream="d", version=1)
        late.commit()
        early.commit()
    finally:
        early.close()
        late.close()
    commit_events(database_url, [("a3", "a", 3)])

    result = tailer.drain()

    assert [e.id for e in sink.events] == ["a1", "a2", "b1", "fast", "slow", "a3"]
    positions = [e.position for e in sink.events]
    assert positions == sorted(positions) and positions[0] == positions[1]
    assert result.events == 6 and result.transactions == 5
    assert confirmed_flush(database_url, slot_name) == result.advanced_to
    first = sink.events[0]
    assert (first.tenant, first.stream, first.version, first.data) == ("acme", "a", 1, {"n": 1})
    assert first.recorded_at.tzinfo is not None and first.time is not None
    assert tailer.drain().events == 0  # nothing is read twice once acknowledged
    assert sample(registry, "tagbus_tailer_events_published_total") == 6


def test_a_live_cycle_takes_every_transaction_already_received(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    """The walsender sends a keepalive whenever it catches up with unconfirmed changes sent,
    so under load one follows nearly every transaction. A cycle that ended at each keepalive
    published one transaction per PutRecords round trip (about 400 events/s against
    kinesis-mock, behind a steady 1,000/s); the cycle must go on with what is already here."""
    sink = RecordingSink()
    tailer = make_tailer(database_url, slot_name, sink, poll_interval_seconds=0.2)
    tailers.append(tailer)
    tailer.try_activate()
    tailer.relay_cycle()  # the stream is started and idle
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(20):
            insert_event(conn, f"t{n}", stream="burst", version=n + 1)
            # The walsender catches up (and sends its keepalive) between commits; after the
            # last one, everything is on the replication connection.
            wait_until_sent(database_url, slot_name)

    result = tailer.relay_cycle()

    wait_for(lambda: len(sink.events) == 20)  # published by a worker thread
    assert (result.transactions, result.events, sink.calls) == (20, 20, 1)
    assert [e.version for e in sink.events] == list(range(1, 21))


def test_metadata_becomes_envelope_fields(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    sink = RecordingSink()
    tailer = make_tailer(database_url, slot_name, sink)
    tailers.append(tailer)
    tailer.try_activate()
    meta = {
        "correlationid": "corr",
        "causationid": "cause",
        "datacontenttype": "application/json",
        "sub": "svc",
    }
    with psycopg.connect(database_url) as conn:
        insert_event(conn, "m1", data=[1, "two", None], metadata=meta)
    tailer.drain()
    [event] = sink.events
    assert event.datacontenttype == "application/json" and event.data == [1, "two", None]
    body = orjson.loads(event.to_record_data())
    assert (body["correlationid"], body["causationid"], body["position"]) == ("corr", "cause", event.position)


def test_a_null_payload_stays_distinct_from_no_payload(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = RecordingSink()
    tailer = make_tailer(database_url, slot_name, sink)
    tailers.append(tailer)
    tailer.try_activate()
    with psycopg.connect(database_url) as conn:
        insert_event(conn, "no-data", stream="s1")
        conn.execute(
            "INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, data, metadata, digest)"
            " VALUES ('null-data', 'acme', 's2', 1, 't', '/tests', 'null'::jsonb, '{}'::jsonb, 'digest')"
        )
    tailer.drain()
    bodies = {e.id: orjson.loads(e.to_record_data()) for e in sink.events}
    assert "data" not in bodies["no-data"]
    assert "data" in bodies["null-data"] and bodies["null-data"]["data"] is None


def test_a_fast_shutdown_is_not_held_up_by_a_connected_tailer(slot_name: str) -> None:
    """A walsender exits on a fast shutdown only once its client confirmed all it sent (the
    shutdown checkpoint included): an idle tailer must confirm the server's keepalive position."""
    cluster = TemporaryCluster.start()
    stop = threading.Event()
    sink = RecordingSink()
    tailer = make_tailer(cluster.url, slot_name, sink, poll_interval_seconds=0.05)
    thread = threading.Thread(target=tailer.run, args=(stop,), daemon=True)
    try:
        apply_migrations(cluster.url)
        thread.start()
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            slot = "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active"
            wait_for(lambda: conn.execute(slot, (slot_name,)).fetchone() is not None)
            insert_event(conn, "before-shutdown")
        wait_for(lambda: len(sink.events) == 1)
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            # WAL the tailer decodes and skips (not in the publication): the server's sent
            # position moves past the last event the tailer confirmed.
            conn.execute("CREATE TABLE skipped (n int)")
            conn.execute("INSERT INTO skipped SELECT generate_series(1, 1000)")
        wait_until_sent(cluster.url, slot_name)
        # Raises (pg_ctl gives up after 20 s) while the walsender waits for a confirmation.
        cluster._run("pg_ctl", "-D", str(cluster.datadir), "-m", "fast", "-w", "-t", "20", "stop")
    finally:
        stop.set()
        thread.join(15)
        tailer.close()
        with contextlib.suppress(ClusterUnavailableError):  # already stopped
            cluster.stop()


# ------------------------------------------------------------------ at-least-once


def test_failed_publish_does_not_advance_and_rerun_resends(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    # max_read_batch=4: each batch stops at the first commit after 4 messages → one transaction per cycle.
    failing = RecordingSink(fail_on_call=3, ack_before_failing=1)
    tailer = make_tailer(database_url, slot_name, failing, max_read_batch=4)
    tailers.append(tailer)
    tailer.try_activate()
    commit_events(database_url, *[[(f"e{i}a", f"s{i}", 1), (f"e{i}b", f"s{i}", 2)] for i in range(5)])

    tailer.run_once()
    tailer.run_once()
    after_two = confirmed_flush(database_url, slot_name)
    with pytest.raises(RuntimeError, match="mid-way"):
        tailer.run_once()
    assert confirmed_flush(database_url, slot_name) == after_two
    assert [e.id for e in failing.events] == ["e0a", "e0b", "e1a", "e1b", "e2a"]
    tailer.close()  # the "crash": a new tailer takes over the slot

    healthy = RecordingSink()
    rerun = make_tailer(database_url, slot_name, healthy)
    tailers.append(rerun)
    rerun.drain()
    assert [e.id for e in healthy.events] == ["e2a", "e2b", "e3a", "e3b", "e4a", "e4b"]


def test_batches_end_at_the_first_commit_past_the_byte_bound(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = RecordingSink()
    tailer = make_tailer(database_url, slot_name, sink, max_read_bytes=1)
    tailers.append(tailer)
    tailer.try_activate()
    commit_events(database_url, [("b1", "b", 1), ("b2", "b", 2)], [("b3", "b", 3)])
    first = tailer.run_once()
    assert (first.transactions, first.events) == (1, 2)  # a transaction is never cut in two
    second = tailer.run_once()
    assert (second.transactions, second.events) == (1, 1)
    assert confirmed_flush(database_url, slot_name) == second.advanced_to
    assert [e.id for e in sink.events] == ["b1", "b2", "b3"]


def test_a_dropped_replication_connection_resumes_at_the_confirmed_position(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = RecordingSink()
    tailer = make_tailer(database_url, slot_name, sink, poll_interval_seconds=0.02, reconnect_backoff_cap_seconds=0.5)
    tailers.append(tailer)
    assert tailer.try_activate()  # the slot exists before the first commit
    stop = threading.Event()
    thread = threading.Thread(target=tailer.run, args=(stop,))
    thread.start()
    try:
        commit_events(database_url, [("d1", "d", 1)])
        wait_for(lambda: [e.id for e in sink.events] == ["d1"])
        with psycopg.connect(database_url, autocommit=True) as conn:
            [(terminated,)] = conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                (slot_name,),
            ).fetchall()
        assert terminated
        commit_events(database_url, [("d2", "d", 2)], [("d3", "d", 3)])
        wait_for(lambda: [e.id for e in sink.events][-2:] == ["d2", "d3"])
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    # At least once, in order: d1 was confirmed before the drop, so it is not sent again.
    assert [e.id for e in sink.events] == ["d1", "d2", "d3"]


def test_oversize_record_is_loud_and_blocks(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    client = FakeKinesis()
    tailer = make_tailer(database_url, slot_name, kinesis=client)
    tailers.append(tailer)
    tailer.try_activate()
    start = confirmed_flush(database_url, slot_name)
    with psycopg.connect(database_url) as conn:
        insert_event(conn, "small-before", stream="x", version=1)
        insert_event(conn, "huge", stream="x", version=2, data={"blob": "x" * 1_100_000})
    with pytest.raises(OversizeRecordError, match="huge") as caught:
        tailer.run_once()
    assert caught.value.event_id == "huge"
    assert client.calls == []  # nothing of the transaction went out ahead of the oversize event
    assert confirmed_flush(database_url, slot_name) == start


# ------------------------------------------------------------------ batches in flight


class GatedSink:
    """A sink whose publishes each return only once the test opens their gate."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: list[threading.Event] = []
        #: Publishes that returned: acknowledged, as far as the tailer can tell.
        self.returned = 0
        self._lock = threading.Lock()
        self._all_open = False

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        gate = threading.Event()
        with self._lock:
            self.calls.append([event.id for event in batch])
            self.gates.append(gate)
            if self._all_open:
                gate.set()
        if not gate.wait(10):
            raise TimeoutError("the test never opened this publish's gate")
        with self._lock:
            self.returned += 1

    def open_all(self) -> None:
        """Open every gate, and those of later publishes too."""
        with self._lock:
            self._all_open = True
            for gate in self.gates:
                gate.set()


def cycle_until(tailer: LogTailer, condition: Callable[[], bool]) -> None:
    wait_for(lambda: tailer.relay_cycle() is not None and condition())


def started_tailer(
    database_url: str,
    slot_name: str,
    sink: GatedSink,
    tailers: list[LogTailer],
    *,
    registry: CollectorRegistry | None = None,
    **knobs: Any,
) -> DrainingTailer:
    """A tailer over ``sink``, closed after the test, active, its stream started and idle."""
    tailer = make_tailer(database_url, slot_name, sink, registry=registry, **knobs)
    tailers.append(tailer)
    tailer.try_activate()
    tailer.relay_cycle()
    return tailer


def test_a_batch_of_other_streams_goes_out_while_one_is_in_flight_and_the_slot_waits_for_both(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = GatedSink()
    registry = CollectorRegistry()
    # Room left in the window: cycles do not wait.
    tailer = started_tailer(database_url, slot_name, sink, tailers, registry=registry, in_flight=3)
    try:
        start = confirmed_flush(database_url, slot_name)
        commit_events(database_url, [("a1", "a", 1)])
        cycle_until(tailer, lambda: len(sink.calls) == 1)
        commit_events(database_url, [("b1", "b", 1)])
        cycle_until(tailer, lambda: len(sink.calls) == 2)  # published while a1 is unacknowledged

        sink.gates[1].set()  # the later batch is acknowledged first
        wait_for(lambda: sink.returned == 1, what="b1's publish to return")
        for _ in range(10):
            tailer.relay_cycle()
        # The server applies a confirmation in its own time, and nothing tells when it did not
        # get one: time is let pass for a wrong one to show.
        time.sleep(0.3)
        assert confirmed_flush(database_url, slot_name) == start  # never past a1, which is still in flight

        sink.gates[0].set()
        cycle_until(tailer, lambda: confirmed_flush(database_url, slot_name) > start)
        assert sink.calls == [["a1"], ["b1"]]
        assert sample(registry, "tagbus_tailer_events_published_total") == 2
        assert tailer.drain().events == 0  # both confirmed: nothing is read again
    finally:
        sink.open_all()


def test_a_batch_sharing_a_stream_with_one_in_flight_waits_for_it(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = GatedSink()
    tailer = started_tailer(database_url, slot_name, sink, tailers, in_flight=3)
    try:
        commit_events(database_url, [("a1", "a", 1), ("x1", "x", 1)])
        cycle_until(tailer, lambda: len(sink.calls) == 1)
        commit_events(database_url, [("y1", "y", 1), ("a2", "a", 2)])
        wait_until_sent(database_url, slot_name)  # so that the cycle reads y1 and a2
        cycle = threading.Thread(target=tailer.relay_cycle)
        cycle.start()
        # A publish that does not happen has no event to wait on: time is let pass for one to show.
        time.sleep(0.5)
        assert sink.calls == [["a1", "x1"]]  # stream a's version 2 must not race version 1
        sink.gates[0].set()
        cycle.join(10)
        assert not cycle.is_alive()
        wait_for(lambda: len(sink.calls) == 2)
        assert sink.calls == [["a1", "x1"], ["y1", "a2"]]
    finally:
        sink.open_all()


def test_a_full_window_waits_for_the_oldest_batch(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    sink = GatedSink()
    tailer = started_tailer(database_url, slot_name, sink, tailers, in_flight=2)
    try:
        for n, stream in enumerate("abc"):
            commit_events(database_url, [(f"{stream}1", stream, 1)])
            if n < 2:
                cycle_until(tailer, lambda n=n: len(sink.calls) == n + 1)
        wait_until_sent(database_url, slot_name)  # so that the cycle reads c1
        cycle = threading.Thread(target=tailer.relay_cycle)
        cycle.start()
        # A publish that does not happen has no event to wait on: time is let pass for one to show.
        time.sleep(0.5)
        assert len(sink.calls) == 2  # two in flight: the third batch waits
        sink.gates[0].set()
        cycle.join(10)
        assert not cycle.is_alive()
        wait_for(lambda: len(sink.calls) == 3)  # handed to a publisher thread, which calls the sink
        assert sink.calls == [["a1"], ["b1"], ["c1"]]
    finally:
        sink.open_all()


def test_heartbeats_behind_a_batch_in_flight_take_no_place_in_the_window(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    # CI once hung here: each idle cycle queued a marker, the markers filled the window,
    # and the next cycle waited for a batch that the test had not acknowledged yet.
    sink = GatedSink()
    registry = CollectorRegistry()
    tailer = started_tailer(database_url, slot_name, sink, tailers, registry=registry, in_flight=2)
    try:
        start = confirmed_flush(database_url, slot_name)
        commit_events(database_url, [("a1", "a", 1)])
        cycle_until(tailer, lambda: len(sink.calls) == 1)
        for _ in range(3):  # each read in a cycle of its own: three markers behind a1
            tailer.emit_heartbeat()
            wait_for(lambda: tailer.relay_cycle().heartbeats == 1)

        commit_events(database_url, [("b1", "b", 1)])
        cycle = threading.Thread(target=cycle_until, args=(tailer, lambda: len(sink.calls) == 2))
        cycle.start()
        cycle.join(5)
        assert not cycle.is_alive() and sink.calls == [["a1"], ["b1"]]  # a place was free for b1
        assert confirmed_flush(database_url, slot_name) == start  # a1 still holds the slot back

        sink.open_all()
        cycle_until(tailer, lambda: sample(registry, "tagbus_tailer_events_published_total") == 2)
        assert tailer.drain().events == 0  # everything confirmed, the heartbeats too
    finally:
        sink.open_all()


class PreparingSink(GatedSink):
    """A GatedSink that prepares batches ahead, as the Kinesis publisher does; can fail the first send."""

    def __init__(self, *, fail_first_send: bool = False) -> None:
        super().__init__()
        self.prepared: list[list[str]] = []
        self._fail_first_send = fail_first_send

    def prepare(self, batch: Sequence[StoredEvent]) -> Callable[[], None]:
        self.prepared.append([event.id for event in batch])
        return lambda: self._send(batch)

    def _send(self, batch: Sequence[StoredEvent]) -> None:
        self.publish(batch)
        if self._fail_first_send:
            self._fail_first_send = False
            raise RuntimeError("rejected")


def backlog_tailer(database_url: str, slot_name: str, sink: PreparingSink, tailers: list[LogTailer]) -> DrainingTailer:
    """A tailer reading two single-event transactions per batch, one batch in flight, over six committed."""
    tailer = started_tailer(database_url, slot_name, sink, tailers, max_read_batch=6, in_flight=1)
    commit_events(database_url, *[[(f"{stream}1", stream, 1)] for stream in "abcdef"])
    wait_until_sent(database_url, slot_name)  # so that the first read finds a full batch
    cycle_until(tailer, lambda: len(sink.calls) == 1)
    return tailer


def wait_until_sent(url: str, slot: str) -> None:
    """Wait until the slot's walsender has sent the tailer everything committed so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        committed = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        query = """
            SELECT r.sent_lsn >= %s FROM pg_stat_replication r
            JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s
        """
        wait_for(
            lambda: bool((conn.execute(query, (committed[0] if committed else None, slot)).fetchone() or [False])[0])
        )


def test_a_backlog_prepares_the_next_batch_while_one_is_in_flight_and_sends_it_after(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = PreparingSink()
    tailer = backlog_tailer(database_url, slot_name, sink, tailers)
    try:
        assert sink.calls == [["a1", "b1"]]  # a full batch: a backlog
        cycle = threading.Thread(target=tailer.relay_cycle)
        cycle.start()
        wait_for(lambda: len(sink.prepared) == 2)
        # A send that does not happen has no event to wait on: time is let pass for one to show.
        time.sleep(0.3)
        assert sink.prepared == [["a1", "b1"], ["c1", "d1"]]  # read and prepared meanwhile ...
        assert sink.calls == [["a1", "b1"]]  # ... but not sent before the batch in flight is acknowledged
        sink.gates[0].set()
        cycle.join(10)
        assert not cycle.is_alive()
        wait_for(lambda: len(sink.calls) == 2)
        assert sink.calls[1] == ["c1", "d1"]
    finally:
        sink.open_all()


def test_a_batch_read_ahead_is_read_again_when_the_batch_before_it_fails(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = PreparingSink(fail_first_send=True)
    tailer = backlog_tailer(database_url, slot_name, sink, tailers)
    failed: list[BaseException] = []

    def cycle_failing() -> None:
        try:
            tailer.relay_cycle()
        except RuntimeError as exc:
            failed.append(exc)

    cycle = threading.Thread(target=cycle_failing)
    cycle.start()
    wait_for(lambda: len(sink.prepared) == 2)  # c1, d1 read ahead
    sink.gates[0].set()  # a1, b1 rejected
    cycle.join(10)
    assert not cycle.is_alive() and len(failed) == 1

    sink.open_all()
    cycle_until(tailer, lambda: sum(map(len, sink.calls[1:])) >= 6)
    sent = [event for call in sink.calls[1:] for event in call]
    assert sent == ["a1", "b1", "c1", "d1", "e1", "f1"]  # from the slot again, in order, nothing skipped
    assert tailer.drain().events == 0


# ------------------------------------------------------------------ Kinesis partial failures


def every_key_in_order(client: FakeKinesis) -> bool:
    """Each partition key's versions 1..n reached its shard in order (resent runs aside)."""
    return all(in_version_order(client.accepted_versions(key)) for key in client.accepted)


def events_for(keys: str) -> list[StoredEvent]:
    counters: dict[str, int] = defaultdict(int)
    out = []
    for key in keys:
        counters[key] += 1
        out.append(
            StoredEvent(
                id=f"{key}{counters[key]}",
                tenant="t",
                stream=key,
                version=counters[key],
                type="x",
                source="/t",
                recorded_at=_NOW,
            )
        )
    return out


_NOW = StoredEvent.from_cloudevent(
    {
        "id": "x",
        "tenantid": "t",
        "streamid": "s",
        "version": 1,
        "type": "x",
        "source": "/",
        "recordedat": "2024-01-01T00:00:00Z",
    }
).recorded_at


def no_wait(_: float) -> bool:
    return False


def test_partial_failure_resends_failed_and_later_entries_of_the_same_key() -> None:
    # Batch: A1 A2 B1 A3 B2 C1; A2 throttled and B2 internal failure on the first call.
    client = FakeKinesis(
        lambda call, _: {1: "ProvisionedThroughputExceededException", 4: "InternalFailure"} if call == 0 else None
    )
    registry = CollectorRegistry()
    publisher = KinesisPublisher(client, "s", metrics=TailerMetrics(registry), wait=no_wait)
    publisher.publish(events_for("AABABC"))
    retried = [StoredEvent.from_record_data(r["Data"]).id for r in client.calls[1]]
    assert retried == ["A2", "A3", "B2"]  # A3 succeeded but would sit before A2: resent, in order
    assert every_key_in_order(client)
    assert sample(registry, "tagbus_tailer_publish_retries_total", {"reason": "throttled"}) == 1


def test_random_partial_failures_keep_every_key_in_version_order() -> None:
    rng = random.Random(7)
    client = FakeKinesis(
        lambda call, records: {
            i: rng.choice(["ProvisionedThroughputExceededException", "InternalFailure"])
            for i in range(len(records))
            if rng.random() < 0.3
        }
    )
    keys = "".join(rng.choice("ABCDEFG") for _ in range(1_200))
    KinesisPublisher(client, "s", metrics=TailerMetrics(CollectorRegistry()), wait=no_wait).publish(events_for(keys))
    assert all(len(call) <= 500 for call in client.calls)
    assert every_key_in_order(client)
    distinct = {key.split("/")[1]: len(set(accepted)) for key, accepted in client.accepted.items()}
    assert distinct == {k: keys.count(k) for k in set(keys)}


def test_requests_respect_the_5_mib_limit() -> None:
    client = FakeKinesis()
    big = [
        StoredEvent(
            id=f"e{i}",
            tenant="t",
            stream=f"s{i}",
            version=1,
            type="x",
            source="/",
            recorded_at=_NOW,
            data="x" * 900_000,
        )
        for i in range(12)
    ]
    KinesisPublisher(client, "s", metrics=TailerMetrics(CollectorRegistry()), wait=no_wait).publish(big)
    assert [len(call) for call in client.calls] == [5, 5, 2]
    assert all(sum(len(r["Data"]) + len(r["PartitionKey"]) for r in call) <= 5 * 1_048_576 for call in client.calls)


def client_error(code: str, status: int = 400) -> botocore.exceptions.ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "PutRecords")


def test_throttling_and_unreachable_endpoints_are_retried_with_backoff() -> None:
    outcomes = iter(
        [
            client_error("ProvisionedThroughputExceededException"),
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            client_error("InternalFailure", 500),
            None,
        ]
    )
    client = FakeKinesis(lambda call, _: next(outcomes))
    waits: list[float] = []

    def record_wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    registry = CollectorRegistry()
    publisher = KinesisPublisher(
        client, "s", metrics=TailerMetrics(registry), wait=record_wait, backoff_cap_seconds=1.0
    )
    publisher.publish(events_for("AB"))
    assert len(client.calls) == 4 and len(waits) == 3 and all(0 <= w <= 1.0 for w in waits)
    retries = "tagbus_tailer_publish_retries_total"
    assert sample(registry, retries, {"reason": "throttled"}) == 1
    assert sample(registry, retries, {"reason": "endpoint_unavailable"}) == 2


def test_non_retryable_errors_are_raised_as_our_own() -> None:
    publisher = KinesisPublisher(
        FakeKinesis(lambda call, _: client_error("ResourceNotFoundException")),
        "s",
        wait=no_wait,
        metrics=TailerMetrics(CollectorRegistry()),
    )
    with pytest.raises(KinesisRejectedError) as caught:
        publisher.publish(events_for("A"))
    assert caught.value.code == "ResourceNotFoundException"
    assert isinstance(caught.value.__cause__, botocore.exceptions.ClientError)

    per_entry = KinesisPublisher(
        FakeKinesis(lambda call, _: {0: "KMSAccessDeniedException"}),
        "s",
        wait=no_wait,
        metrics=TailerMetrics(CollectorRegistry()),
    )
    with pytest.raises(KinesisRejectedError, match="A1"):
        per_entry.publish(events_for("A"))


def test_stop_interrupts_an_endless_throttle() -> None:
    publisher = KinesisPublisher(
        FakeKinesis(lambda call, _: client_error("ThrottlingException")),
        "s",
        wait=lambda s: True,
        metrics=TailerMetrics(CollectorRegistry()),
    )
    with pytest.raises(PublishInterruptedError):
        publisher.publish(events_for("A"))


def test_tailer_with_partial_failures_keeps_per_stream_order(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    rng = random.Random(11)
    client = FakeKinesis(throttling(rng, 0.25))
    tailer = make_tailer(database_url, slot_name, kinesis=client, publish_backoff_cap_seconds=0.001)
    tailers.append(tailer)
    tailer.try_activate()
    versions: dict[str, int] = defaultdict(int)
    batches = []
    for _ in range(40):
        batch = []
        for _ in range(rng.randint(1, 5)):
            stream = rng.choice("pqrs")
            versions[stream] += 1
            batch.append((f"{stream}{versions[stream]}", stream, versions[stream]))
        batches.append(batch)
    commit_events(database_url, *batches)
    tailer.drain()
    assert set(client.accepted) == {f"acme/{s}" for s in versions}
    assert every_key_in_order(client)


def test_the_relay_loop_with_batches_in_flight_keeps_per_stream_order_through_partial_failures(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    # Calls take 20 ms, so that calls from several publisher threads overlap.
    client = FakeKinesis(throttling(random.Random(5), 0.25), latency=0.02)
    registry = CollectorRegistry()
    tailer = make_tailer(
        database_url, slot_name, kinesis=client, registry=registry, publish_backoff_cap_seconds=0.001, in_flight=3
    )
    tailers.append(tailer)
    tailer.try_activate()
    stop = threading.Event()
    relay = threading.Thread(target=tailer.run, args=(stop,), daemon=True)
    relay.start()
    picks = random.Random(9)
    versions: dict[str, int] = defaultdict(int)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for _ in range(4):
                # Each round writes to the 100 streams once, in a new order, paced so that a
                # batch holds a few events: batches in flight seldom share a stream and so
                # overlap, while each stream gets 4 versions to keep in order.
                for stream in picks.sample([f"s{n}" for n in range(100)], 100):
                    versions[stream] += 1
                    insert_event(conn, f"{stream}{versions[stream]}", stream=stream, version=versions[stream])
                    time.sleep(0.002)
        wait_for(lambda: sample(registry, "tagbus_tailer_events_published_total") == 400, timeout=30)
    finally:
        stop.set()
        relay.join(10)
    assert client.most_at_once > 1  # batches really overlapped
    assert set(client.accepted) == {f"acme/{s}" for s in versions}
    assert every_key_in_order(client)
    assert tailer.drain().events == 0  # the slot was confirmed past everything acknowledged


# ------------------------------------------------------------------ heartbeat


def test_heartbeat_advances_the_slot_on_an_idle_table(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    sink = RecordingSink()
    registry = CollectorRegistry()
    tailer = make_tailer(
        database_url, slot_name, sink, registry=registry, heartbeat_seconds=0.2, poll_interval_seconds=0.02
    )
    tailers.append(tailer)
    tailer.try_activate()
    with psycopg.connect(database_url, autocommit=True) as conn:
        # WAL that the publication does not carry: the slot cannot see a commit to move past.
        conn.execute("INSERT INTO streams (tenant_id, stream_id, version) VALUES ('acme', 'idle', 1)")
        [(wal_lsn,)] = conn.execute("SELECT pg_current_wal_lsn()::text").fetchall()
    assert tailer.drain().transactions == 0
    assert confirmed_flush(database_url, slot_name) < parse_lsn(wal_lsn)

    stop = threading.Event()
    thread = threading.Thread(target=tailer.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: confirmed_flush(database_url, slot_name) >= parse_lsn(wal_lsn))
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert sink.events == []
    assert sample(registry, "tagbus_tailer_last_advance_timestamp_seconds") > 0


def test_heartbeat_only_transactions_are_counted(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    tailer = make_tailer(database_url, slot_name, RecordingSink())
    tailers.append(tailer)
    tailer.try_activate()
    tailer.emit_heartbeat()
    result = tailer.run_once()
    assert (result.transactions, result.heartbeats, result.events) == (1, 1, 0)
    assert format_lsn(confirmed_flush(database_url, slot_name)) == format_lsn(result.advanced_to or 0)


# ------------------------------------------------------------------ one active tailer


def test_second_tailer_waits_on_the_lock_and_takes_over(
    database_url: str, slot_name: str, tailers: list[LogTailer]
) -> None:
    first_sink, second_sink = RecordingSink(), RecordingSink()
    first = make_tailer(database_url, slot_name, first_sink, lock_retry_seconds=0.1)
    second = make_tailer(database_url, slot_name, second_sink, lock_retry_seconds=0.1, poll_interval_seconds=0.02)
    tailers.extend([first, second])
    assert first.try_activate()
    assert not second.try_activate()
    with pytest.raises(LockUnavailableError):
        second.run_once()

    stop = threading.Event()
    thread = threading.Thread(target=second.run, args=(stop,))
    thread.start()
    try:
        commit_events(database_url, [("w1", "w", 1)])
        # A takeover that does not happen has no event to wait on: the second tailer retries the
        # lock every 0.1 s, and is given a few tries to show that it cannot take it.
        time.sleep(0.5)
        assert second_sink.events == [] and not second.active
        first.drain()
        assert [e.id for e in first_sink.events] == ["w1"]
        first.close()  # the first tailer dies; its session and lock go with it
        commit_events(database_url, [("w2", "w", 2)])
        wait_for(lambda: [e.id for e in second_sink.events] == ["w2"])
        assert second.active
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_slot_status_and_lag_metric(database_url: str, slot_name: str, tailers: list[LogTailer]) -> None:
    registry = CollectorRegistry()
    tailer = make_tailer(database_url, slot_name, RecordingSink(), registry=registry, status_interval_seconds=0.0)
    tailers.append(tailer)
    with psycopg.connect(database_url) as conn:
        assert slot_status(conn, slot_name) is None
    tailer.try_activate()
    commit_events(database_url, [("l1", "l", 1)])
    with psycopg.connect(database_url) as conn:
        before = slot_status(conn, slot_name)
    assert before is not None and before.lag_bytes > 0 and before.wal_status == "reserved"
    tailer.drain()
    assert sample(registry, "tagbus_tailer_slot_lag_bytes") == 0


def test_masked_database_url_never_shows_the_password() -> None:
    assert mask_database_url("postgresql://bus:s3cret@db:5432/tagbus") == "postgresql://bus:***@db:5432/tagbus"
    assert "s3cret" not in mask_database_url("postgresql+psycopg://db/tagbus?user=u&password=s3cret")
    assert "s3cret" not in mask_database_url("host=db user=bus password=s3cret dbname=tagbus")
    assert mask_database_url("postgresql://db/tagbus") == "postgresql://db/tagbus"


# ------------------------------------------------------------------ real Kinesis API


def test_publishes_to_a_real_kinesis_endpoint(
    database_url: str, slot_name: str, tailers: list[LogTailer], kinesis_client: Any, kinesis_stream: str
) -> None:
    tailer = DrainingTailer(
        TailerSettings(database_url=database_url, slot_name=slot_name, stream_name=kinesis_stream),
        kinesis_client,
        registry=CollectorRegistry(),
    )
    tailers.append(tailer)
    tailer.try_activate()
    commit_events(database_url, *[[(f"k{i}", f"k{i % 3}", i // 3 + 1)] for i in range(12)])
    assert tailer.drain().events == 12
    assert versions_on_stream(kinesis_client, kinesis_stream) == {f"k{j}": [1, 2, 3, 4] for j in range(3)}


# ------------------------------------------------------------------ the replication connection


@pytest.mark.parametrize("kept_alive", [True, False])
def test_status_updates_keep_the_replication_connection_through_a_long_publish(
    database_url: str, slot_name: str, tailers: list[LogTailer], kept_alive: bool
) -> None:
    tailer = make_tailer(database_url, slot_name, RecordingSink())
    tailers.append(tailer)
    tailer.try_activate()  # creates the slot
    stream = ReplicationStream(libpq_url(database_url), slot_name, "tagbus_events", wal_sender_timeout_ms=1_000)
    stream.start()
    try:
        # A publish that takes 2.5 walsender timeouts, during which nothing is read.
        with stream.kept_alive(0.2) if kept_alive else contextlib.nullcontext():
            time.sleep(2.5)
        if kept_alive:
            stream.confirm(0)
            for _ in range(10):  # buffered keepalives, then quiet: the connection is alive
                stream.read(0.1)
            assert stream.started
        else:
            with pytest.raises(DatabaseUnavailableError):
                for _ in range(10):  # the walsender timed out: reading reaches the closed socket
                    stream.read(0.1)
    finally:
        stream.close()
