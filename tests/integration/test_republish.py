"""Republish from the events table to Kinesis, against a real PostgreSQL (and kinesis-mock when set).

Checks the range (per stream, from the first version recorded at or after ``since``),
per-stream version order through partial ``PutRecords`` failures, and that the record
Data equal the tailer's except the commit position.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from kernel.envelope import StoredEvent
from tailer import KinesisPublisher, TailerMetrics
from tailer.drain import DrainingTailer
from tailer.republish import republish
from tailer.settings import TailerSettings
from tests.fixtures.kinesis import FakeKinesis, in_version_order, throttling, versions_on_stream

# Start of the current month: the events table is partitioned by month, and migrations make
# partitions from the current month on (older months exist only where rows were copied).
T0 = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def insert(
    conn: psycopg.Connection[Any],
    event_id: str,
    stream: str,
    version: int,
    recorded_at: datetime,
    *,
    tenant: str = "acme",
) -> None:
    conn.execute(
        """
        INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                            recorded_at, data, metadata, digest)
        VALUES (%s, %s, %s, %s, 'thing.happened', '/tests', %s, %s, %s, %s::jsonb, %s::jsonb, 'digest')
        """,
        (
            event_id,
            tenant,
            stream,
            version,
            stream,
            recorded_at,
            recorded_at,
            orjson.dumps({"n": version}).decode(),
            orjson.dumps({"correlationid": f"c-{event_id}", "datacontenttype": "application/json"}).decode(),
        ),
    )


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[list[StoredEvent]] = []

    @property
    def events(self) -> list[StoredEvent]:
        return [event for batch in self.batches for event in batch]

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        self.batches.append(list(batch))


def test_range_starts_per_stream_at_the_first_version_since(database_url: str) -> None:
    since = T0 + timedelta(hours=1)
    with psycopg.connect(database_url) as conn:
        # s1: v1 before since, v2 and v3 after → v2, v3.
        insert(conn, "s1-1", "s1", 1, T0)
        insert(conn, "s1-2", "s1", 2, since)
        insert(conn, "s1-3", "s1", 3, since + timedelta(minutes=5))
        # s2: v2's transaction started before since, but v1 is after it (recorded_at is the
        # transaction start, not monotonic in version) → v1 and v2, never v2 alone.
        insert(conn, "s2-1", "s2", 1, since + timedelta(minutes=1))
        insert(conn, "s2-2", "s2", 2, since - timedelta(minutes=1))
        # s3: all before since → nothing.
        insert(conn, "s3-1", "s3", 1, T0)
        # Another tenant's events are never republished.
        insert(conn, "o-1", "s1", 1, since + timedelta(hours=1), tenant="other")
    sink = RecordingSink()
    seen: list[int] = []
    summary = republish(database_url, sink, tenant="acme", since=since, progress=seen.append, chunk_size=2)
    assert [(e.stream, e.version) for e in sink.events] == [("s1", 2), ("s1", 3), ("s2", 1), ("s2", 2)]
    assert [len(b) for b in sink.batches] == [2, 2]
    assert seen == [2, 4]
    assert (summary.events, summary.streams, summary.tenant, summary.stream) == (4, 2, "acme", None)

    only = RecordingSink()
    assert republish(database_url, only, tenant="acme", since=T0, stream="s2").events == 2
    assert [(e.stream, e.version) for e in only.events] == [("s2", 1), ("s2", 2)]

    assert republish(database_url, RecordingSink(), tenant="nobody", since=T0).events == 0


def test_naive_since_is_refused(database_url: str) -> None:
    with pytest.raises(ValueError, match="timezone"):
        republish(database_url, RecordingSink(), tenant="acme", since=datetime(2025, 1, 1))


def test_partial_failures_keep_each_stream_in_version_order(database_url: str) -> None:
    rng = random.Random(11)
    streams = [f"s{i}" for i in range(9)]
    versions: dict[str, int] = defaultdict(int)
    with psycopg.connect(database_url) as conn:
        for n in range(1_400):
            stream = rng.choice(streams)
            versions[stream] += 1
            insert(conn, f"e{n}", stream, versions[stream], T0 + timedelta(seconds=rng.randint(0, 100)))
    client = FakeKinesis(throttling(random.Random(3), 0.2))
    publisher = KinesisPublisher(client, "s", metrics=TailerMetrics(CollectorRegistry()), wait=lambda _: False)
    summary = republish(database_url, publisher, tenant="acme", since=T0)
    assert summary.events == 1_400
    assert max(len(call) for call in client.calls) <= 500
    for stream, count in versions.items():
        accepted = client.accepted_versions(f"acme/{stream}")
        assert set(accepted) == set(range(1, count + 1))
        assert in_version_order(accepted)


def test_records_match_the_tailers_except_the_position(database_url: str, slot_name: str) -> None:
    tailer_sink = RecordingSink()
    tailer = DrainingTailer(
        TailerSettings(database_url=database_url, slot_name=slot_name),
        None,
        sink=tailer_sink,
        registry=CollectorRegistry(),
    )
    try:
        assert tailer.try_activate()
        with psycopg.connect(database_url) as conn:
            for n in range(6):
                insert(conn, f"e{n}", f"s{n % 2}", n // 2 + 1, T0 + timedelta(seconds=n))
        assert tailer.drain().events == 6
    finally:
        tailer.close()
    sink = RecordingSink()
    republish(database_url, sink, tenant="acme", since=T0)

    def without_position(event: StoredEvent) -> bytes:
        body = event.to_cloudevent()
        body.pop("position", None)
        return orjson.dumps(body)

    by_id = {e.id: without_position(e) for e in tailer_sink.events}
    assert all(e.position for e in tailer_sink.events)
    assert {e.id: e.to_record_data() for e in sink.events} == by_id
    assert sink.events[0].to_cloudevent()["datacontenttype"] == "application/json"


def test_republishes_to_a_real_kinesis_endpoint(database_url: str, kinesis_client: Any, kinesis_stream: str) -> None:
    with psycopg.connect(database_url) as conn:
        for n in range(12):
            insert(conn, f"k{n}", f"k{n % 3}", n // 3 + 1, T0)
    publisher = KinesisPublisher(kinesis_client, kinesis_stream, metrics=TailerMetrics(CollectorRegistry()))
    assert republish(database_url, publisher, tenant="acme", since=T0).events == 12
    assert versions_on_stream(kinesis_client, kinesis_stream) == {f"k{j}": [1, 2, 3, 4] for j in range(3)}
