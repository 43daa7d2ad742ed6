"""A lost replication slot heals itself: the tailer recreates it and republishes from the events table.

A private PostgreSQL cluster with a tiny ``max_slot_wal_keep_size``, so that a little WAL
written while no tailer reads invalidates the slot for real (``wal_status = 'lost'``), and a
dropped slot (its walsender terminated, then ``pg_drop_replication_slot``). The ledger: every
event committed is delivered at least once, and no version of a stream is delivered
before the one preceding it (duplicates allowed: consumers apply by version).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from devtools.postgres_cluster import ClusterUnavailableError, TemporaryCluster, cloned_database, create_template
from kernel.envelope import StoredEvent
from tailer import LogTailer, SlotLostError, slot_status
from tailer.drain import DrainingTailer
from tailer.recovery import MARKER_INFIX
from tailer.settings import TailerSettings, TailerTuning
from tests.fixtures import waiting

STREAMS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def lossy_server() -> Iterator[str]:
    """A cluster of this module's own that invalidates a slot once it holds back more than 1 MB of WAL."""
    try:
        cluster = TemporaryCluster.start()
    except ClusterUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            conn.execute("ALTER SYSTEM SET wal_keep_size = 0")
            conn.execute("SELECT pg_reload_conf()")
        create_template(cluster.url)
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def lossy_database(lossy_server: str) -> Iterator[str]:
    with cloned_database(lossy_server) as url:
        yield url


@pytest.fixture
def slot() -> str:
    return f"tagbus_lost_{time.monotonic_ns() % 10**9}"


class RecordingSink:
    """Keeps every event it is handed, in order; the relay loop publishes from another thread."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.events: list[StoredEvent] = []
        self.calls = 0
        self._fail_on_call = fail_on_call
        self._lock = threading.Lock()

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        with self._lock:
            self.calls += 1
            if self.calls == self._fail_on_call:
                raise RuntimeError("the sink failed")
            self.events.extend(batch)

    def ids(self) -> set[str]:
        with self._lock:
            return {event.id for event in self.events}


class Ledger:
    """The events committed, each stream's versions in turn, one transaction per event."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.versions: dict[str, int] = defaultdict(int)
        self.ids: list[str] = []

    def commit(self, per_stream: int, conn: psycopg.Connection[Any] | None = None) -> list[str]:
        """``per_stream`` new versions of every stream, interleaved; in ``conn``'s open transaction if given."""
        made: list[str] = []
        borrowed = contextlib.nullcontext(conn) if conn is not None else None
        with borrowed or psycopg.connect(self.url, autocommit=True) as target:
            for _ in range(per_stream):
                for stream in STREAMS:
                    self.versions[stream] += 1
                    event_id = f"{stream}-{self.versions[stream]}"
                    target.execute(
                        """
                        INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, data, digest)
                        VALUES (%s, 'acme', %s, %s, 'thing.happened', '/tests', '{}'::jsonb, 'digest')
                        """,
                        (event_id, stream, self.versions[stream]),
                    )
                    made.append(event_id)
        self.ids += made
        return made


def make_tailer(url: str, slot: str, sink: RecordingSink, registry: CollectorRegistry) -> DrainingTailer:
    settings = TailerSettings(database_url=url, slot_name=slot, stream_name="tagbus-test")
    tuning = TailerTuning(status_interval_seconds=0.0)
    return DrainingTailer(settings, None, sink=sink, registry=registry, tuning=tuning)


class RunningTailer:
    """A tailer's relay loop in a thread, as the tailer process runs it."""

    def __init__(self, tailer: LogTailer) -> None:
        self.tailer = tailer
        self.stop = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-tailer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.tailer.run(self.stop)
        except BaseException as exc:
            self.failure.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the tailer did not stop"


def wait_for(
    condition: Callable[[], bool], what: str, running: RunningTailer | None = None, timeout: float = 60
) -> None:
    """:func:`tests.fixtures.waiting.wait_for` that fails at once if the ``running`` tailer failed."""

    def holds() -> bool:
        if condition():
            return True
        if running is not None and running.failure:
            raise AssertionError(f"the tailer failed while waiting for {what}") from running.failure[0]
        return False

    waiting.wait_for(holds, what, timeout, interval=0.05)


def slot_row(url: str, slot: str) -> tuple[str | None, int | None] | None:
    with psycopg.connect(url) as conn:
        status = slot_status(conn, slot)
    return None if status is None else (status.wal_status, status.confirmed_flush_lsn)


def catalog_xmin(url: str, slot: str) -> int:
    with psycopg.connect(url) as conn:
        status = slot_status(conn, slot)
    assert status is not None and status.catalog_xmin is not None
    return status.catalog_xmin


def markers(url: str, slot: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT slot_name::text FROM pg_replication_slots WHERE starts_with(slot_name::text, %s)",
            (f"{slot}{MARKER_INFIX}",),
        ).fetchall()
    return [row[0] for row in rows]


def invalidate(url: str, slot: str) -> None:
    """Write WAL until the server invalidates ``slot`` (it must not be streaming)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ballast (n int, pad text)")
        deadline = time.monotonic() + 60
        while (row := slot_row(url, slot)) is None or row[0] != "lost":
            if time.monotonic() > deadline:
                raise AssertionError(f"slot {slot} still {row} after a minute of WAL")
            conn.execute("INSERT INTO ballast SELECT g, repeat('x', 1000) FROM generate_series(1, 3000) g")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")


def drop_while_streaming(url: str, slot: str) -> None:
    """Terminate the slot's walsender and drop the slot before the tailer takes it again."""
    with psycopg.connect(url, autocommit=True) as conn:

        def dropped() -> bool:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            except psycopg.errors.ObjectInUse:
                return False  # the tailer took the slot again first
            return True

        waiting.wait_for(dropped, f"slot {slot} dropped between the tailer's reconnections", 30, interval=0.01)


def assert_delivered_in_order(deliveries: Sequence[StoredEvent], ledger: Ledger) -> None:
    """Every committed event at least once, and no version before the one preceding it."""
    seen: dict[str, set[int]] = defaultdict(set)
    for event in deliveries:
        if event.version > 1:
            assert event.version - 1 in seen[event.stream], (
                f"{event.stream} v{event.version} delivered before v{event.version - 1}"
            )
        seen[event.stream].add(event.version)
    missing = sorted(set(ledger.ids) - {event.id for event in deliveries})
    assert not missing, f"never delivered: {missing}"


def recreated(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("tagbus_tailer_slot_recreated_total", {"reason": reason}) or 0.0


# ---------------------------------------------------------------------------------------


def test_an_invalidated_slot_is_recreated_and_nothing_is_lost(lossy_database: str, slot: str) -> None:
    url, ledger = lossy_database, Ledger(lossy_database)
    first_sink = RecordingSink()
    with make_tailer(url, slot, first_sink, CollectorRegistry()) as first:
        assert first.try_activate()
        ledger.commit(3)
        first.drain()
        horizon = catalog_xmin(url, slot)
        # A checkpoint logs the running transactions; decoding and confirming past that
        # record moves the slot's horizon up to the oldest of them, as the server's own
        # periodic record does under load.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        ledger.commit(1)
        first.drain()
        wait_for(lambda: catalog_xmin(url, slot) > horizon, "the slot's horizon to move")
    assert first_sink.ids() == set(ledger.ids)

    lost = ledger.commit(3)  # decoded by no slot: the tailer is down, then the WAL is gone
    invalidate(url, slot)
    lost += ledger.commit(2)  # committed while the slot is invalidated

    sink, registry = RecordingSink(), CollectorRegistry()
    running = RunningTailer(make_tailer(url, slot, sink, registry))
    try:
        wait_for(lambda: set(lost) <= sink.ids(), "the lost events to be republished", running)
        after = ledger.commit(2)  # through the new slot
        wait_for(lambda: set(after) <= sink.ids(), "events committed after the recovery", running)
    finally:
        running.close()
    assert not running.failure

    assert_delivered_in_order(first_sink.events + sink.events, ledger)
    row = slot_row(url, slot)
    assert row is not None and row[0] in ("reserved", "extended"), row
    assert recreated(registry, "invalidated") == 1
    republished = registry.get_sample_value("tagbus_tailer_events_republished_total")
    # From the slot's horizon: what was lost and a little before it, not the whole table.
    assert republished is not None and len(lost) <= republished < len(ledger.ids) - len(after)
    assert markers(url, slot) == []
    # After the republish, the new slot delivered only what committed after it: no event twice.
    after_recovery = sink.events[int(republished) :]
    assert sorted(e.id for e in after_recovery) == sorted(after)


def test_a_slot_dropped_under_a_running_tailer_is_recreated_and_nothing_is_lost(lossy_database: str, slot: str) -> None:
    url, ledger = lossy_database, Ledger(lossy_database)
    sink, registry = RecordingSink(), CollectorRegistry()
    running = RunningTailer(make_tailer(url, slot, sink, registry))
    try:
        wait_for(lambda: slot_row(url, slot) is not None, "the tailer to create its slot", running)
        ledger.commit(2)
        wait_for(lambda: set(ledger.ids) <= sink.ids(), "the first events", running)

        # A transaction open across the drop: it commits when no slot decodes it, and the new
        # slot, which waits for it to end, starts after it.
        with psycopg.connect(url) as open_transaction:
            open_ids = ledger.commit(2, open_transaction)
            drop_while_streaming(url, slot)
            ledger.commit(1)  # committed while there is no slot at all
            open_transaction.commit()
        assert set(open_ids) <= set(ledger.ids)
        wait_for(lambda: set(ledger.ids) <= sink.ids(), "the events committed around the drop", running)
        after = ledger.commit(2)
        wait_for(lambda: set(after) <= sink.ids(), "events committed after the recovery", running)
    finally:
        running.close()
    assert not running.failure

    assert_delivered_in_order(sink.events, ledger)
    assert recreated(registry, "dropped") == 1
    row = slot_row(url, slot)
    assert row is not None and row[0] in ("reserved", "extended"), row
    assert markers(url, slot) == []


def test_a_recovery_cut_short_is_finished_by_the_next_tailer(lossy_database: str, slot: str) -> None:
    url, ledger = lossy_database, Ledger(lossy_database)
    first_sink = RecordingSink()
    with make_tailer(url, slot, first_sink, CollectorRegistry()) as first:
        assert first.try_activate()
        ledger.commit(2)
        first.drain()
    lost = ledger.commit(2)
    invalidate(url, slot)

    # The republish fails part-way (a publish error, or think of a kill -9): the marker stays.
    failing = RecordingSink(fail_on_call=1)
    with make_tailer(url, slot, failing, CollectorRegistry()) as second, pytest.raises(RuntimeError):
        second.try_activate()
    assert len(markers(url, slot)) == 1
    row = slot_row(url, slot)
    assert row is not None and row[0] == "reserved"  # recreated, but not all republished
    lost += ledger.commit(1)  # decoded by that new slot, which the next tailer replaces

    sink, registry = RecordingSink(), CollectorRegistry()
    running = RunningTailer(make_tailer(url, slot, sink, registry))
    try:
        wait_for(lambda: set(lost) <= sink.ids(), "the lost events to be republished", running)
        after = ledger.commit(1)
        wait_for(lambda: set(after) <= sink.ids(), "events committed after the recovery", running)
    finally:
        running.close()
    assert not running.failure

    assert_delivered_in_order(first_sink.events + sink.events, ledger)
    assert recreated(registry, "unfinished") == 1
    assert markers(url, slot) == []


class GatedSink(RecordingSink):
    """A sink that holds every publish while its gate is shut, like a Kinesis that is down."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait()
        super().publish(batch)


def test_a_slot_invalidated_while_a_publish_hangs_is_recreated_and_nothing_is_lost(
    lossy_database: str, slot: str
) -> None:
    url, ledger = lossy_database, Ledger(lossy_database)
    sink, registry = GatedSink(), CollectorRegistry()
    running = RunningTailer(make_tailer(url, slot, sink, registry))
    try:
        wait_for(lambda: slot_row(url, slot) is not None, "the tailer to create its slot", running)
        ledger.commit(2)
        wait_for(lambda: set(ledger.ids) <= sink.ids(), "the first events", running)

        sink.gate.clear()
        ledger.commit(2)  # read, and held in the publish while the slot is lost under it
        wait_for(sink.waiting.is_set, "a publish to hang", running)
        invalidate(url, slot)  # the server ends the tailer's walsender to invalidate its slot
        ledger.commit(1)
        sink.gate.set()
        wait_for(lambda: set(ledger.ids) <= sink.ids(), "the events held and lost", running)
        after = ledger.commit(1)
        wait_for(lambda: set(after) <= sink.ids(), "events committed after the recovery", running)
    finally:
        sink.gate.set()
        running.close()
    assert not running.failure

    assert_delivered_in_order(sink.events, ledger)
    assert recreated(registry, "invalidated") == 1
    row = slot_row(url, slot)
    assert row is not None and row[0] in ("reserved", "extended"), row


def test_start_replication_refused_for_a_lost_slot_is_told_apart_and_recovered(lossy_database: str, slot: str) -> None:
    url, ledger = lossy_database, Ledger(lossy_database)
    sink, registry = RecordingSink(), CollectorRegistry()
    with make_tailer(url, slot, sink, registry) as tailer:
        assert tailer.try_activate()  # the slot is made; nothing streams it yet
        ledger.commit(1)
        invalidate(url, slot)
        with pytest.raises(SlotLostError):
            tailer.run_once()  # START_REPLICATION fails: the slot is invalidated
        tailer.drain()  # the next activation recovers it
        assert recreated(registry, "invalidated") == 1
        after = ledger.commit(1)
        tailer.drain()
    assert_delivered_in_order(sink.events, ledger)
    assert sorted(e.id for e in sink.events[-len(after) :]) == sorted(after)
