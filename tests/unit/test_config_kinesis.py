"""The Kinesis change source without emulators: checkpoints, start positions, de-aggregation,
and the failures kinesis-mock cannot produce on demand (expired iterators, throttling, an
unreachable endpoint, resharding while running), against the in-process ``tests.fixtures.kinesis.FakeKinesis``.

The source runs in the test's thread on a fake clock: its ``stop`` event is a
:class:`SteppingStop` whose ``wait`` advances the clock at once, so pacing and backoff are
checked in fake seconds, deterministically.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aws_kinesis_agg.aggregator import AggRecord  # type: ignore[import-untyped]
from botocore.exceptions import ClientError, EndpointConnectionError

from config_server.checkpoints import (
    TRIM_HORIZON,
    CheckpointKind,
    ShardCheckpoint,
    ShardInfo,
    StartAt,
    parse_lease,
    read_checkpoints,
    start_positions,
)
from config_server.kinesis import (
    KinesisChangeSource,
    KinesisMisconfigured,
    KinesisThrottled,
    KinesisUnavailable,
    UndecodableRecord,
    user_records,
)
from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from kernel.retry import Backoff, Jitter
from projections.errors import StoreUnavailable
from projections.model import ConfigChange
from tests.fixtures.change_sink import RecordingSink
from tests.fixtures.kinesis import FakeKinesis

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
STREAM = "tagbus-events"

# -- events ------------------------------------------------------------------------------


def event(tenant: str, key: str, version: int, value: Any = None, *, deleted: bool = False) -> StoredEvent:
    return StoredEvent(
        id=f"{tenant}/{key}/{version}",
        tenant=tenant,
        stream=key,
        version=version,
        type=CONFIG_DELETED if deleted else CONFIG_SET,
        source="/tests",
        recorded_at=T0 + timedelta(seconds=version),
        data={"key": key} if deleted else {"key": key, "value": value},
        position=version * 10,
    )


def as_change(e: StoredEvent) -> ConfigChange:
    change = ConfigChange.from_event(e)
    assert change is not None
    return change


def aggregate(*events: StoredEvent) -> bytes:
    record = AggRecord()
    for e in events:
        record.add_user_record(e.partition_key, e.to_record_data(), None)
    _, _, data = record.get_contents()
    return bytes(data)


# -- fakes -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


class SteppingStop(threading.Event):
    """A stop event whose waits pass at once on the fake clock; it sets itself once ``until()``
    holds, or after ``limit`` fake seconds (the test then fails on its own assertion)."""

    def __init__(
        self,
        clock: FakeClock,
        until: Callable[[], bool],
        *,
        limit: float = 600.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self.clock, self.until, self.on_wait = clock, until, on_wait
        self.deadline = clock.now + limit
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        assert timeout is not None, "the source never waits without a timeout"
        self.waits.append(timeout)
        self.clock.now += timeout
        if self.on_wait is not None:
            self.on_wait(self.clock.now)
        if self.until() or self.clock.now >= self.deadline:
            self.set()
        return self.is_set()


def client_error(code: str, operation: str, status: int = 400) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, operation)


class FakeLeases:
    """The KCL lease table's ``Scan``, two items a page."""

    def __init__(self, journal: list[tuple[Any, ...]], items: list[dict[str, Any]] | None) -> None:
        self.journal, self.items = journal, items

    def scan(self, **request: Any) -> dict[str, Any]:
        self.journal.append(("Scan(leases)", request.get("ExclusiveStartKey")))
        if self.items is None:
            raise client_error("ResourceNotFoundException", "Scan")
        assert request["ConsistentRead"] is True
        start = int(request.get("ExclusiveStartKey", {}).get("n", 0))
        response: dict[str, Any] = {"Items": self.items[start : start + 2]}
        if start + 2 < len(self.items):
            response["LastEvaluatedKey"] = {"n": start + 2}
        return response


class FakeSnapshot:
    def __init__(self, journal: list[tuple[Any, ...]], changes: Iterable[ConfigChange] = ()) -> None:
        self.journal, self.changes = journal, list(changes)

    def scan(self) -> Iterable[ConfigChange]:
        self.journal.append(("snapshot",))
        return list(self.changes)


def lease(shard_id: str, checkpoint: str, sub: int = 0) -> dict[str, Any]:
    return {
        "leaseKey": {"S": shard_id},
        "checkpoint": {"S": checkpoint},
        "checkpointSubSequenceNumber": {"N": str(sub)},
        "leaseCounter": {"N": "7"},
        "leaseOwner": {"S": "tagbus-consumer@host"},
        "ownerSwitchesSinceCheckpoint": {"N": "0"},
    }


@dataclass
class Harness:
    clock: FakeClock = field(default_factory=FakeClock)
    journal: list[tuple[Any, ...]] = field(default_factory=list)
    sink: RecordingSink = field(default_factory=RecordingSink)
    leases: list[dict[str, Any]] | None = None
    snapshot: list[ConfigChange] = field(default_factory=list)
    kinesis: FakeKinesis = field(init=False)

    def __post_init__(self) -> None:
        self.kinesis = FakeKinesis(now=lambda: self.clock.now, journal=self.journal)

    def source(self, **options: Any) -> KinesisChangeSource:
        options.setdefault("backoff", Backoff(base=0.5, cap=8.0, jitter=Jitter.NONE))
        return KinesisChangeSource(
            cast(Any, self.kinesis),
            cast(Any, FakeLeases(self.journal, self.leases)),
            FakeSnapshot(self.journal, self.snapshot),
            stream_name=STREAM,
            lease_table="tagbus-consumer",
            monotonic=self.clock.monotonic,
            wall=self.clock.wall,
            **options,
        )

    def run(
        self,
        source: KinesisChangeSource,
        until: Callable[[], bool],
        *,
        limit: float = 600.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> SteppingStop:
        stop = SteppingStop(self.clock, until, limit=limit, on_wait=on_wait)
        source.run(self.sink, stop)
        assert until(), f"condition not reached within {limit} fake seconds; calls: {self.sink.calls[-20:]}"
        return stop

    def calls(self, operation: str, shard_id: str | None = None) -> list[tuple[Any, ...]]:
        return [e for e in self.journal if e[0] == operation and (shard_id is None or e[2] == shard_id)]

    def versions(self, tenant: str, key: str) -> list[int]:
        """The versions of one key in the order they were applied."""
        return [c.version for batch in self.sink.applied for c in batch if (c.tenant, str(c.key)) == (tenant, key)]


# -- checkpoints ---------------------------------------------------------------------------


def test_lease_items_parse_into_checkpoints() -> None:
    seq = "49680834925158967931734304540904640738231879481704841218"
    assert parse_lease(lease("shardId-000000000001", seq, 3), stream_name=STREAM) == ShardCheckpoint(
        "shardId-000000000001", CheckpointKind.SEQUENCE, seq, 3
    )
    for sentinel in ("TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "SHARD_END"):
        parsed = parse_lease(lease("shardId-000000000002", sentinel), stream_name=STREAM)
        assert parsed == ShardCheckpoint("shardId-000000000002", CheckpointKind(sentinel))
    multi = lease(f"123456789012:{STREAM}:1700000000:shardId-000000000004", seq)
    assert parse_lease(multi, stream_name=STREAM) == ShardCheckpoint(
        "shardId-000000000004", CheckpointKind.SEQUENCE, seq
    )
    other_stream = lease("123456789012:another-stream:1700000000:shardId-000000000004", seq)
    assert parse_lease(other_stream, stream_name=STREAM) is None
    assert parse_lease(lease("shardId-000000000005", "garbage"), stream_name=STREAM) is None
    assert parse_lease({"leaseKey": {"S": "shardId-000000000006"}}, stream_name=STREAM) is None


def test_checkpoints_are_read_page_by_page_and_a_missing_table_means_none() -> None:
    journal: list[tuple[Any, ...]] = []
    items = [lease(f"shardId-00000000000{n}", f"{n}000") for n in range(5)]
    found = read_checkpoints(cast(Any, FakeLeases(journal, items)), "tagbus-consumer", stream_name=STREAM)
    assert sorted(found) == [f"shardId-00000000000{n}" for n in range(5)]
    assert len(journal) == 3
    assert read_checkpoints(cast(Any, FakeLeases(journal, None)), "tagbus-consumer", stream_name=STREAM) == {}


def test_lease_table_errors_are_translated() -> None:
    class Down:
        def scan(self, **_: Any) -> dict[str, Any]:
            raise client_error("InternalServerError", "Scan", 500)

    with pytest.raises(StoreUnavailable):
        read_checkpoints(cast(Any, Down()), "tagbus-consumer", stream_name=STREAM)


def test_start_positions_follow_the_consumers_checkpoints() -> None:
    seq = "4968083492515896793173430454090464073823187948170484"
    shards = [
        ShardInfo("s-seq"),
        ShardInfo("s-end", closed=True),
        ShardInfo("s-trim"),
        ShardInfo("s-latest"),
        ShardInfo("s-ts"),
        ShardInfo("s-new"),
        # a finished parent whose lease the KCL deleted once its children started
        ShardInfo("p-done", closed=True),
        ShardInfo("c-started", parent_ids=("p-done",)),
        # a closed parent the consumer never finished: its children have not started
        ShardInfo("p-pending", closed=True),
        ShardInfo("c-waiting", parent_ids=("p-pending",)),
        # two generations: the child's lease is gone too, the grandchild started
        ShardInfo("g0", closed=True),
        ShardInfo("g1", parent_ids=("g0",), closed=True),
        ShardInfo("g2", parent_ids=("g1",)),
    ]
    checkpoints = {
        c.shard_id: c
        for c in [
            ShardCheckpoint("s-seq", CheckpointKind.SEQUENCE, seq, 2),
            ShardCheckpoint("s-end", CheckpointKind.SHARD_END),
            ShardCheckpoint("s-trim", CheckpointKind.TRIM_HORIZON),
            ShardCheckpoint("s-latest", CheckpointKind.LATEST),
            ShardCheckpoint("s-ts", CheckpointKind.AT_TIMESTAMP),
            ShardCheckpoint("c-started", CheckpointKind.SEQUENCE, seq),
            ShardCheckpoint("c-waiting", CheckpointKind.TRIM_HORIZON),
            ShardCheckpoint("g2", CheckpointKind.SEQUENCE, seq),
        ]
    }
    assert start_positions(shards, checkpoints) == {
        "s-seq": StartAt("AT_SEQUENCE_NUMBER", seq),
        "s-end": None,
        "s-trim": TRIM_HORIZON,
        # nothing consumed yet, and where the consumer's iterator opened is not recorded
        "s-latest": TRIM_HORIZON,
        "s-ts": TRIM_HORIZON,
        "s-new": TRIM_HORIZON,
        "p-done": None,
        "c-started": StartAt("AT_SEQUENCE_NUMBER", seq),
        "p-pending": TRIM_HORIZON,
        "c-waiting": TRIM_HORIZON,
        "g0": None,
        "g1": None,
        "g2": StartAt("AT_SEQUENCE_NUMBER", seq),
    }


# -- de-aggregation ------------------------------------------------------------------------


def test_user_records_unpack_kpl_aggregates_and_pass_plain_records() -> None:
    first, second = event("acme", "tenantconfig:a", 1, "x"), event("acme", "tenantconfig:b", 1, [1, 2])
    assert user_records(aggregate(first, second)) == [first.to_record_data(), second.to_record_data()]
    assert user_records(first.to_record_data()) == [first.to_record_data()]
    tampered = bytearray(aggregate(first))
    tampered[10] ^= 0xFF  # the digest no longer matches: an ordinary record, as in the KCL
    assert user_records(bytes(tampered)) == [bytes(tampered)]


def test_an_aggregate_with_a_valid_digest_that_does_not_parse_is_undecodable() -> None:
    with pytest.raises(UndecodableRecord):
        user_records(_bad_aggregate())


def _bad_aggregate() -> bytes:
    import hashlib

    from aws_kinesis_agg import MAGIC  # type: ignore[import-untyped]

    body = b"\xff\xff\xff\xff not protobuf"
    return bytes(MAGIC) + body + hashlib.md5(body).digest()


# -- the source --------------------------------------------------------------------------


def test_start_reads_checkpoints_then_the_snapshot_then_the_shards_from_the_checkpoint() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    v1, v2, v3 = (event("acme", "tenantconfig:k", v, f"v{v}") for v in (1, 2, 3))
    h.kinesis.put_event("shard-0", v1)
    checkpointed = h.kinesis.put_event("shard-0", v2)
    h.kinesis.put_event("shard-0", v3)
    h.leases = [lease("shard-0", checkpointed)]
    h.snapshot = [as_change(v2)]
    h.run(h.source(), lambda: bool(h.sink.caught_up_lags))
    order = [e[0] for e in h.journal if e[0] in ("Scan(leases)", "snapshot", "ListShards", "GetShardIterator")]
    assert order[:4] == ["Scan(leases)", "snapshot", "ListShards", "GetShardIterator"]
    assert h.calls("GetShardIterator")[0][3:] == ("AT_SEQUENCE_NUMBER", checkpointed)
    assert h.sink.loads == [[as_change(v2)]]
    assert h.versions("acme", "tenantconfig:k") == [2, 3]
    assert h.sink.state[("acme", "tenantconfig:k")] == as_change(v3)
    assert h.sink.calls.index("load") < h.sink.calls.index("apply") < h.sink.calls.index("caught_up")


def test_records_are_deaggregated_and_what_cannot_be_read_is_counted_not_fatal() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    other = StoredEvent(
        id="o", tenant="acme", stream="orders/1", version=1, type="order.placed", source="/s", recorded_at=T0
    )
    wrong_stream = StoredEvent(
        id="w",
        tenant="acme",
        stream="not-the-key",
        version=1,
        type=CONFIG_SET,
        source="/s",
        recorded_at=T0,
        data={"key": "tenantconfig:w", "value": 1},
    )
    a, b, c, d = (event("acme", f"tenantconfig:{k}", 1, k) for k in "abcd")
    gone = event("globex", "paramconfig:p/q", 2, deleted=True)
    h.kinesis.put("shard-0", aggregate(a, other, b))
    h.kinesis.put_event("shard-0", c)
    h.kinesis.put("shard-0", b"not json at all")
    h.kinesis.put("shard-0", b"[1, 2]")
    h.kinesis.put("shard-0", _bad_aggregate())
    h.kinesis.put_event("shard-0", wrong_stream)
    h.kinesis.put("shard-0", aggregate(d, gone))
    source = h.source()
    h.run(source, lambda: bool(h.sink.caught_up_lags))
    assert [c.key.path for batch in h.sink.applied for c in batch] == ["a", "b", "c", "d", "p/q"]
    assert h.sink.state[("globex", "paramconfig:p/q")].deleted
    stats = source.stats
    assert (stats.records, stats.user_records, stats.changes) == (7, 9, 5)
    assert (stats.ignored, stats.undecodable, stats.invalid) == (1, 3, 1)
    assert h.sink.failures == []


def test_an_expired_iterator_is_opened_again_after_the_last_record_read() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    for v in (1, 2, 3):
        h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", v, v))
    source = h.source()
    late = event("acme", "tenantconfig:k", 4, 4)

    def expire_then_write(now: float) -> None:
        if (
            h.versions("acme", "tenantconfig:k") == [1, 2, 3]
            and not h.kinesis.faults
            and source.stats.expired_iterators == 0
        ):
            h.kinesis.faults.append(("GetRecords", "shard-0", client_error("ExpiredIteratorException", "GetRecords")))
            h.kinesis.put_event("shard-0", late)

    h.run(source, lambda: 4 in h.versions("acme", "tenantconfig:k"), on_wait=expire_then_write)
    assert source.stats.expired_iterators == 1
    reopened = h.calls("GetShardIterator")[-1]
    assert reopened[3:] == ("AFTER_SEQUENCE_NUMBER", h.kinesis.shards["shard-0"].records[2]["SequenceNumber"])
    assert h.versions("acme", "tenantconfig:k") == [1, 2, 3, 4]  # nothing lost, nothing read twice
    assert h.sink.failures == []  # an expired iterator is routine, not a failure


def test_throttling_and_an_unreachable_endpoint_back_off_report_and_keep_going() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", 1, 1))
    h.kinesis.faults += [
        ("GetRecords", "shard-0", client_error("ProvisionedThroughputExceededException", "GetRecords")),
        ("GetRecords", "shard-0", client_error("ProvisionedThroughputExceededException", "GetRecords")),
        ("GetRecords", "shard-0", EndpointConnectionError(endpoint_url="http://127.0.0.1:1")),
        ("GetRecords", "shard-0", client_error("InternalFailure", "GetRecords", 500)),
    ]
    source = h.source()
    h.run(source, lambda: bool(h.sink.caught_up_lags))
    assert [type(e) for e in h.sink.failures] == [
        KinesisThrottled,
        KinesisThrottled,
        KinesisUnavailable,
        KinesisUnavailable,
    ]
    assert source.stats.throttled == 2
    times = [e[1] for e in h.calls("GetRecords", "shard-0")]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Backoff without jitter here: 0.5, 1, 2, 4 fake seconds after the 1st..4th failure.
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert h.versions("acme", "tenantconfig:k") == [1]


def test_a_missing_stream_is_reported_as_misconfigured_and_retried() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.faults += [("ListShards", None, client_error("ResourceNotFoundException", "ListShards"))] * 2
    h.run(h.source(), lambda: bool(h.sink.caught_up_lags))
    assert [type(e) for e in h.sink.failures] == [KinesisMisconfigured, KinesisMisconfigured]
    # Each attempt starts over: checkpoints, then the snapshot, then the listing.
    assert [e[0] for e in h.journal if e[0] in ("Scan(leases)", "snapshot")] == ["Scan(leases)", "snapshot"] * 3


def test_an_idle_shard_is_polled_no_faster_than_the_idle_interval_and_a_behind_one_at_once() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.add_shard("shard-1")
    for v in range(1, 8):
        h.kinesis.put_event("shard-1", event("acme", "tenantconfig:busy", v, v))
    h.clock.now += 5.0  # a backlog five seconds old
    start = h.clock.now
    h.run(h.source(max_records=2), lambda: h.clock.now - start >= 10.0)
    idle = [e[1] for e in h.calls("GetRecords", "shard-0")]
    assert all(later - earlier >= 0.2 - 1e-9 for earlier, later in itertools.pairwise(idle))
    assert 10.0 / 0.2 - 2 <= len(idle) <= 10.0 / 0.2 + 1
    busy = [e[1] for e in h.calls("GetRecords", "shard-1")]
    # 7 records, 2 a call: the shard is behind after the first three calls, which follow at once.
    assert busy[1] == busy[0] and busy[2] == busy[0] and busy[3] == busy[0]
    assert busy[4] - busy[3] >= 0.2 - 1e-9
    assert h.versions("acme", "tenantconfig:busy") == list(range(1, 8))


def test_a_shard_less_than_an_idle_interval_behind_waits_like_an_idle_one() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    for v in range(1, 5):
        h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", v, v))
    h.clock.now += 0.1
    h.run(h.source(max_records=2), lambda: h.versions("acme", "tenantconfig:k") == [1, 2, 3, 4])
    reads = [e[1] for e in h.calls("GetRecords", "shard-0")]
    assert reads[1] - reads[0] >= 0.2 - 1e-9


def test_the_first_caught_up_waits_until_the_backlog_present_at_the_start_is_read() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    for v in range(1, 6):
        h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", v, v))
        h.clock.now += 1.0  # records that arrived over the five seconds before the start
    h.run(h.source(max_records=2), lambda: bool(h.sink.caught_up_lags))
    first = h.sink.calls.index("caught_up")
    assert h.sink.calls[:first].count("apply") == 3
    assert h.sink.caught_up_lags[0] == 0


def test_lag_is_the_largest_millis_behind_latest_of_a_round() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.add_shard("shard-1")
    source = h.source(max_records=1)
    h.run(source, lambda: len(h.sink.caught_up_lags) >= 2)
    for v in range(1, 4):
        h.kinesis.put_event("shard-1", event("acme", "tenantconfig:k", v, v))
    h.clock.now += 3.0
    stop = SteppingStop(h.clock, lambda: h.versions("acme", "tenantconfig:k") == [1, 2, 3])
    h.sink.caught_up_lags.clear()
    source.run(h.sink, stop)
    lags = h.sink.caught_up_lags
    assert lags and max(lags) >= 3000  # shard-1 was three seconds behind while shard-0 was idle


def test_children_are_read_after_their_parent_ends_and_new_shards_are_found_by_listing() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    for v in (1, 2):
        h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", v, v))
    h.kinesis.split("shard-0", ("shard-1", "shard-2"))
    h.kinesis.put_event("shard-1", event("acme", "tenantconfig:k", 3, 3))
    h.kinesis.put_event("shard-2", event("acme", "tenantconfig:other", 1, "o"))
    source = h.source(list_shards_interval=5.0, max_records=1)
    split_later = {"done": False}

    def reshard_while_running(now: float) -> None:
        if not split_later["done"] and h.versions("acme", "tenantconfig:k") == [1, 2, 3]:
            split_later["done"] = True
            h.kinesis.split("shard-2", ("shard-3", "shard-4"))
            h.kinesis.put_event("shard-3", event("acme", "tenantconfig:other", 2, "o2"))

    h.run(
        source,
        lambda: h.versions("acme", "tenantconfig:other") == [1, 2],
        on_wait=reshard_while_running,
    )
    parent_reads = [e[1] for e in h.calls("GetRecords", "shard-0")]
    for child in ("shard-1", "shard-2"):
        assert min(e[1] for e in h.calls("GetRecords", child)) >= max(parent_reads)
        assert h.calls("GetShardIterator", child)[0][3] == "TRIM_HORIZON"
    assert h.versions("acme", "tenantconfig:k") == [1, 2, 3]
    assert h.calls("GetShardIterator", "shard-3")[0][3] == "TRIM_HORIZON"
    assert min(e[1] for e in h.calls("GetRecords", "shard-3")) >= max(e[1] for e in h.calls("GetRecords", "shard-2"))
    assert h.sink.failures == []


def test_a_shard_the_consumer_finished_is_not_read_and_its_children_start_from_their_checkpoints() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", 1, 1))
    h.kinesis.split("shard-0", ("shard-1", "shard-2"))
    done = h.kinesis.put_event("shard-1", event("acme", "tenantconfig:k", 2, 2))
    h.kinesis.put_event("shard-1", event("acme", "tenantconfig:k", 3, 3))
    # The KCL deleted shard-0's lease once both children had started.
    h.leases = [lease("shard-1", done), lease("shard-2", "SHARD_END")]
    h.snapshot = [as_change(event("acme", "tenantconfig:k", 2, 2))]
    h.run(h.source(), lambda: bool(h.sink.caught_up_lags))
    assert h.calls("GetRecords", "shard-0") == [] and h.calls("GetRecords", "shard-2") == []
    assert h.calls("GetShardIterator", "shard-1")[0][3:] == ("AT_SEQUENCE_NUMBER", done)
    assert h.versions("acme", "tenantconfig:k") == [2, 3]


def test_a_source_that_cannot_read_for_restart_after_starts_over_with_a_new_snapshot() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.faults += [("GetRecords", "shard-0", EndpointConnectionError(endpoint_url="http://x"))] * 12
    source = h.source(restart_after=30.0)
    h.run(source, lambda: bool(h.sink.caught_up_lags))
    assert source.stats.starts == 2
    assert len(h.sink.loads) == 2


def test_an_unexpected_error_in_the_sink_restarts_the_source_instead_of_ending_it() -> None:
    h = Harness()
    h.kinesis.add_shard("shard-0")
    h.kinesis.put_event("shard-0", event("acme", "tenantconfig:k", 1, 1))
    failed_once = {"done": False}

    def explode_once(_: Any) -> None:
        if not failed_once["done"]:
            failed_once["done"] = True
            raise RuntimeError("a bug in the state")

    h.sink.on_apply = explode_once
    source = h.source()
    h.run(source, lambda: bool(h.sink.caught_up_lags))
    assert source.stats.starts == 2
    assert [type(e) for e in h.sink.failures] == [RuntimeError]
    assert h.versions("acme", "tenantconfig:k") == [1, 1]  # read again after the restart; a no-op by version


def test_bad_max_records_is_refused() -> None:
    with pytest.raises(ValueError, match="max_records"):
        Harness().source(max_records=0)
