"""The tailer as a real process under faults: kill -9 mid-batch, and Kinesis stopped while events keep coming.

Real PostgreSQL (a database of the test's own) and a kinesis-mock process of the test's
own (never the shared stack's), the tailer a subprocess of :func:`tailer.run_tailer`.

The outage lasts ``TAGBUS_FAULT_OUTAGE_SECONDS`` (default 10; the issue's 30 s case:
``TAGBUS_FAULT_OUTAGE_SECONDS=30``), so the file takes well under 90 s by default.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.tailer_bench import KinesisMock, free_port
from kernel.envelope import StoredEvent
from tailer import slot_status
from tests.fixtures.waiting import wait_for

OUTAGE_SECONDS = float(os.environ.get("TAGBUS_FAULT_OUTAGE_SECONDS", "10"))
#: ``pause``: SIGSTOP/SIGCONT the mock (requests hang, then time out); ``restart``: SIGTERM it and
#: start it again on its saved state (connections refused meanwhile).
OUTAGE_MODE = os.environ.get("TAGBUS_FAULT_OUTAGE_MODE", "pause")
REPO_ROOT = Path(__file__).resolve().parents[2]

TAILER_SCRIPT = """
import logging, os, signal, threading
import boto3
from botocore.config import Config
from tailer.settings import TailerSettings, TailerTuning
from tailer import run_tailer

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
env = os.environ
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
client = boto3.client(
    "kinesis", endpoint_url=env["FT_ENDPOINT"], region_name="us-east-1",
    aws_access_key_id="local", aws_secret_access_key="local",
    config=Config(connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 2}),
)
settings = TailerSettings(database_url=env["FT_DATABASE_URL"], slot_name=env["FT_SLOT"], stream_name=env["FT_STREAM"])
tuning = TailerTuning(publish_backoff_cap_seconds=2.0)
run_tailer(settings, client, stop=stop, tuning=tuning, metrics_port=int(env["FT_METRICS_PORT"]))
"""


class TailerProcess:
    """One tailer subprocess; its log goes to a temporary file, shown when a test fails."""

    def __init__(self, database_url: str, slot: str, kinesis: KinesisMock) -> None:
        self.metrics_port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="tailer-", suffix=".log")[1])
        env = {
            **os.environ,
            "FT_ENDPOINT": kinesis.endpoint,
            "FT_DATABASE_URL": database_url,
            "FT_SLOT": slot,
            "FT_STREAM": kinesis.stream,
            "FT_METRICS_PORT": str(self.metrics_port),
            "PYTHONPATH": str(REPO_ROOT),
        }
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", TAILER_SCRIPT], env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def metric(self, name: str) -> float:
        """Sum of a metric's samples from the process's /metrics (0 when absent or not up yet)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def processes() -> Iterator[list[TailerProcess]]:
    started: list[TailerProcess] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        process.log.unlink(missing_ok=True)


def insert_batch(conn: psycopg.Connection[Any], rows: list[tuple[str, str, int]]) -> None:
    """One transaction of (event_id, stream, version) rows."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                                data, metadata, digest)
            VALUES (%s, 'acme', %s, %s, 'thing.happened', '/faults', %s, now(),
                    jsonb_build_object('n', %s::int, 'pad', repeat('x', 200)), '{}'::jsonb, 'digest')
            """,
            [(event_id, stream, version, stream, version) for event_id, stream, version in rows],
        )


class Producer:
    """Commits events to a few streams, ``per_txn`` at a time, recording (stream → last version)."""

    def __init__(self, url: str, streams: int = 12) -> None:
        self._url = url
        self._streams = [f"s{i}" for i in range(streams)]
        self.versions: dict[str, int] = defaultdict(int)
        self.count = 0

    def commit(self, conn: psycopg.Connection[Any], events: int) -> None:
        rows = []
        for _ in range(events):
            stream = self._streams[self.count % len(self._streams)]
            self.versions[stream] += 1
            self.count += 1
            rows.append((f"e{self.count}", stream, self.versions[stream]))
        insert_batch(conn, rows)


def stream_contents(kinesis: KinesisMock) -> list[StoredEvent]:
    """Every event on the stream, shard by shard, in shard order (resends included)."""
    return [StoredEvent.from_record_data(data) for records in kinesis.read_all().values() for _, data in records]


def assert_complete_and_ordered(events: list[StoredEvent], versions: dict[str, int]) -> None:
    """Every (stream, version) is on the stream, and each stream's versions appear 1..n in order."""
    by_stream: dict[str, list[int]] = defaultdict(list)
    for event in events:
        by_stream[event.stream].append(event.version)
    assert set(by_stream) == set(versions)
    for stream, last in versions.items():
        seen = by_stream[stream]
        assert set(seen) == set(range(1, last + 1)), f"{stream}: missing {set(range(1, last + 1)) - set(seen)}"
        wanted = 1
        for version in seen:
            if version == wanted:
                wanted += 1
        assert wanted == last + 1, f"{stream}: versions out of order: {seen[:50]}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str, tailer: TailerProcess) -> None:
    """Wait for ``condition`` while the tailer process lives; its log's tail if it does not come."""

    def holds() -> bool:
        if condition():
            return True
        if tailer.process.poll() is not None:
            raise AssertionError(f"tailer exited with {tailer.process.returncode} waiting for {what}:\n{tailer.tail()}")
        return False

    wait_for(holds, what, timeout, explain=tailer.tail)


def all_on_stream(kinesis: KinesisMock, producer: Producer) -> Callable[[], bool]:
    last = [0.0]

    def check() -> bool:
        if time.monotonic() - last[0] < 0.5:
            return False
        last[0] = time.monotonic()
        return len({event.id for event in stream_contents(kinesis)}) >= producer.count

    return check


def test_kill_9_mid_batch_then_restart_loses_nothing(
    database_url: str, slot_name: str, processes: list[TailerProcess]
) -> None:
    stream = f"faults-{uuid.uuid4().hex[:6]}"
    with KinesisMock(stream, shards=2) as kinesis:
        # The slot must exist before the backlog, as in production (created by `tagbus migrate`).
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_name,))
        producer = Producer(database_url)
        with psycopg.connect(database_url) as conn:
            for _ in range(120):
                producer.commit(conn, 50)  # 6,000 events: several peeks of several PutRecords each
        first = TailerProcess(database_url, slot_name, kinesis)
        processes.append(first)
        # Kill once some PutRecords were acknowledged but the batch they belong to is not done.
        wait_until(
            lambda: first.metric("tagbus_tailer_putrecords_batch_size_count") >= 3,
            60,
            "the first PutRecords calls",
            first,
        )
        first.kill()
        with psycopg.connect(database_url, autocommit=True) as conn:
            status = slot_status(conn, slot_name)
        assert status is not None and status.confirmed_flush_lsn is not None
        acknowledged_lsn = status.confirmed_flush_lsn
        before_restart = stream_contents(kinesis)
        assert 0 < len(before_restart) < producer.count, "the kill did not land mid-backlog"

        second = TailerProcess(database_url, slot_name, kinesis)
        processes.append(second)
        wait_until(all_on_stream(kinesis, producer), 120, "the restarted tailer to drain the slot", second)
        events = stream_contents(kinesis)
        assert_complete_and_ordered(events, producer.versions)

        # Duplicates are exactly resends of what the slot had not been advanced past.
        counts: dict[str, int] = defaultdict(int)
        for event in events:
            counts[event.id] += 1
        duplicated = [e for e in events if counts[e.id] > 1]
        assert duplicated, "a mid-batch kill should leave a resent tail"
        assert all(event.position >= acknowledged_lsn for event in duplicated)
        assert max(counts.values()) == 2
        # Nothing the slot had been advanced past was resent.
        assert not [e for e in events if e.position < acknowledged_lsn and counts[e.id] > 1]


def test_kinesis_outage_loses_nothing_and_the_tailer_resumes_by_itself(
    database_url: str, slot_name: str, processes: list[TailerProcess], tmp_path: Path
) -> None:
    stream = f"faults-{uuid.uuid4().hex[:6]}"
    kinesis = KinesisMock(stream, shards=1, persist_dir=tmp_path / "kinesis")
    try:
        kinesis.start()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_name,))
        tailer = TailerProcess(database_url, slot_name, kinesis)
        processes.append(tailer)

        producer = Producer(database_url)
        stop = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with psycopg.connect(database_url) as conn:
                    while not stop.is_set():
                        producer.commit(conn, 5)
                        stop.wait(0.05)  # ≈ 100 events/s, committed throughout the outage
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        wait_until(lambda: tailer.metric("tagbus_tailer_events_published_total") >= 100, 60, "first publishes", tailer)

        if OUTAGE_MODE == "restart":
            kinesis.stop()  # SIGTERM: the mock saves what it acknowledged, then exits
        else:
            kinesis.pause()
        committed_at_stop = producer.count
        time.sleep(OUTAGE_SECONDS)  # the outage's length is the fault itself
        assert producer.count > committed_at_stop + 10 * OUTAGE_SECONDS, "commits stalled during the outage"
        assert tailer.process.poll() is None, f"the tailer died during the outage:\n{tailer.tail()}"
        if OUTAGE_MODE == "restart":
            # Refused connections fail fast and are retried; a paused endpoint hangs each request
            # until read_timeout × attempts (20 s here) instead.
            assert tailer.metric("tagbus_tailer_publish_retries_total") > 0

        if OUTAGE_MODE == "restart":
            kinesis.start()
        else:
            kinesis.resume()
        published_at_return = tailer.metric("tagbus_tailer_events_published_total")
        wait_until(
            lambda: tailer.metric("tagbus_tailer_events_published_total") > published_at_return,
            30,
            "the tailer to publish again by itself",
            tailer,
        )
        committed_at_return = producer.count
        # Commits go on for a while after the tailer is back, behind the backlog it drains.
        wait_until(lambda: producer.count >= committed_at_return + 100, 30, "commits after the return", tailer)
        stop.set()
        thread.join(timeout=10)
        assert not errors, errors
        try:
            wait_until(all_on_stream(kinesis, producer), 60, "the tailer to drain the outage backlog", tailer)
        except AssertionError:
            have = {event.id for event in stream_contents(kinesis)}
            missing = sorted(int(f"e{n}"[1:]) for n in range(1, producer.count + 1) if f"e{n}" not in have)
            raise AssertionError(f"missing {len(missing)} of {producer.count}: {missing[:20]}…{missing[-5:]}") from None
        assert_complete_and_ordered(stream_contents(kinesis), producer.versions)
        assert tailer.process.poll() is None  # the same process all along: it resumed by itself
    finally:
        with contextlib.suppress(Exception):
            for process in processes:
                process.terminate()
        kinesis.close()
