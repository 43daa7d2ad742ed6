"""The Kinesis sink: ``PutRecords`` keeping each partition key's order, optionally KPL-aggregated."""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import botocore.exceptions

from kernel.aws_errors import ErrorKind, classify
from kernel.envelope import StoredEvent
from kernel.retry import Backoff, Jitter
from tailer.errors import (
    KinesisRejectedError,
    KinesisThrottledError,
    KinesisUnavailableError,
    OversizeRecordError,
    PublishInterruptedError,
)
from tailer.metrics import TailerMetrics

LOG = logging.getLogger(__name__)

#: Kinesis limits: a record's Data plus its partition key, and one PutRecords request.
MAX_RECORD_BYTES: Final = 1_048_576
MAX_BATCH_RECORDS: Final = 500
MAX_BATCH_BYTES: Final = 5 * 1_048_576

# Per-entry ErrorCode of PutRecords → retry reason; any other per-entry code is fatal.
_RETRYABLE_ENTRY_CODES: Final = {
    "ProvisionedThroughputExceededException": "throttled",
    "KMSThrottlingException": "throttled",
    "InternalFailure": "internal_failure",
}


class KinesisClient(Protocol):
    """The one method of a boto3 Kinesis client the publisher uses: ``put_records(Records=, StreamName=)``."""

    # A callable attribute rather than a method signature, so boto3's typed client
    # (``**kwargs: Unpack[PutRecordsInputTypeDef]``) and simple test doubles both fit.
    @property
    def put_records(self) -> Callable[..., Mapping[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    event_id: str
    data: bytes
    partition_key: str
    size: int
    #: Set on aggregated records: routes the record to the shard its user records hash to.
    explicit_hash_key: str | None = None
    #: What a partial-failure retry keeps in order: the partition key, or the shard id of an aggregate.
    order_key: str = ""

    @property
    def sequence_key(self) -> str:
        return self.order_key or self.partition_key


@dataclass(frozen=True, slots=True)
class _ShardRange:
    start: int
    end: int
    shard_id: str


#: Room left in an aggregated record for its partition key (≤ 256 characters, ≤ 4 bytes each).
_AGGREGATE_KEY_ROOM: Final = 1_024


class KinesisPublisher:
    """Publishes events with ``PutRecords``, keeping each partition key's order.

    Requests hold at most 500 records and 5 MiB. When some entries of a request fail,
    the failed entries *and every later entry of the same partition key* are sent again,
    in order: retrying only the failed ones would put a stream's later version on the
    shard before an earlier one. Entries of other keys that succeeded are not resent.
    Throttling and unreachable endpoints are retried forever with full-jitter backoff.

    ``aggregate=True`` packs the events of each shard into KPL aggregated records
    (``aws-kinesis-agg``), many events per Kinesis record, which lifts the 1,000
    records/s per shard limit for small events. The KCL de-aggregates them natively
    (KCL 2+/3 ``ProcessTask`` → ``AggregatorUtil.deaggregate``) and the MultiLangDaemon
    hands the Python processor one record per event with its own partition key. The KCL
    drops a user record whose hash key lies outside the shard that holds the aggregate
    (a leftover of resharding), so every user record carries an explicit hash key: the
    starting hash key of the shard its partition key hashes to (from ``ListShards``),
    the same key that routes the aggregate. A stale shard map (after a reshard) can
    therefore misroute a stream to a sibling shard for a moment, never lose it; the map is
    refreshed as soon as a response shows a record on an unexpected shard.
    """

    def __init__(
        self,
        client: KinesisClient,
        stream_name: str,
        *,
        metrics: TailerMetrics | None = None,
        max_batch_records: int = MAX_BATCH_RECORDS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_record_bytes: int = MAX_RECORD_BYTES,
        backoff_base_seconds: float = 0.05,
        backoff_cap_seconds: float = 5.0,
        wait: Callable[[float], bool] | None = None,
        jitter: Callable[[], float] = random.random,
        aggregate: bool = False,
    ) -> None:
        self._client = client
        self._aggregate = aggregate
        self._shards: list[_ShardRange] | None = None
        self._stream_name = stream_name
        self._metrics = metrics or TailerMetrics.for_registry()
        self._max_batch_records = max_batch_records
        self._max_batch_bytes = max_batch_bytes
        self._max_record_bytes = max_record_bytes
        self._backoff = Backoff(backoff_base_seconds, backoff_cap_seconds, Jitter.FULL)
        # wait(seconds) -> True when a stop was requested (threading.Event.wait semantics).
        self._wait = wait or _sleep_never_stopped
        self._jitter = jitter

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        self.prepare(batch)()

    def prepare(self, batch: Sequence[StoredEvent]) -> Callable[[], None]:
        """Size, serialize and (with ``aggregate``) pack ``batch`` now; the call returned sends it.

        The relay loop prepares the next batch of a backlog while Kinesis still answers the
        one before, and sends it once that is acknowledged. Every record is sized before any
        is sent, so an oversize event stops the tailer before later events of its stream
        could overtake it.
        """
        entries = [self._entry(event) for event in batch]
        if self._aggregate:
            entries = self._aggregated(entries)
        return functools.partial(self._send, entries)

    def _send(self, entries: list[_Entry]) -> None:
        for request in self._requests(entries):
            self._put_until_acknowledged(request)

    def _entry(self, event: StoredEvent) -> _Entry:
        data = event.to_record_data()
        key = event.partition_key
        size = len(data) + len(key.encode())
        if size > self._max_record_bytes:
            raise OversizeRecordError(event.id, size, self._max_record_bytes)
        return _Entry(event_id=event.id, data=data, partition_key=key, size=size)

    def _aggregated(self, entries: list[_Entry]) -> list[_Entry]:
        """The entries packed into one or more aggregated records per shard, each shard's in order."""
        from aws_kinesis_agg.aggregator import AggRecord  # type: ignore[import-untyped]

        shards = self._shard_map()
        starts = [shard.start for shard in shards]
        open_records: dict[int, Any] = {}
        out: list[_Entry] = []

        def flush(index: int) -> None:
            record = open_records.pop(index, None)
            if record is not None and record.get_num_user_records():
                key, hash_key, data = record.get_contents()
                out.append(
                    _Entry(
                        event_id=first_ids[index],
                        data=data,
                        partition_key=key,
                        size=len(data) + len(key.encode()),
                        explicit_hash_key=hash_key,
                        order_key=shards[index].shard_id,
                    )
                )

        first_ids: dict[int, str] = {}
        max_size = self._max_record_bytes - _AGGREGATE_KEY_ROOM
        for entry in entries:
            hashed = int.from_bytes(hashlib.md5(entry.partition_key.encode()).digest(), "big")
            index = max(0, bisect.bisect_right(starts, hashed) - 1)
            shard = shards[index]
            hash_key = str(shard.start)
            record = open_records.get(index)
            if record is None:
                record = open_records[index] = AggRecord(max_size=max_size)
                first_ids[index] = entry.event_id
            try:
                added = record.add_user_record(entry.partition_key, entry.data, hash_key)
            except ValueError:
                # Too big to share a record: flush what came before it, send it alone.
                flush(index)
                out.append(
                    _Entry(
                        event_id=entry.event_id,
                        data=entry.data,
                        partition_key=entry.partition_key,
                        size=entry.size,
                        explicit_hash_key=hash_key,
                        order_key=shard.shard_id,
                    )
                )
                continue
            if not added:
                flush(index)
                record = open_records[index] = AggRecord(max_size=max_size)
                first_ids[index] = entry.event_id
                record.add_user_record(entry.partition_key, entry.data, hash_key)
        for index in sorted(open_records):
            flush(index)
        return out

    def _shard_map(self) -> list[_ShardRange]:
        """The stream's open shards by starting hash key (``ListShards``), cached until a misroute."""
        if self._shards is not None:
            return self._shards
        list_shards = getattr(self._client, "list_shards", None)
        if list_shards is None:
            raise TypeError("aggregate=True needs a Kinesis client with list_shards")
        shards: list[_ShardRange] = []
        kwargs: dict[str, Any] = {"StreamName": self._stream_name}
        while True:
            page = self._call(list_shards, **kwargs)
            for shard in page.get("Shards", []):
                if "EndingSequenceNumber" in shard.get("SequenceNumberRange", {}):
                    continue  # closed by a reshard: takes no new records
                hash_range = shard["HashKeyRange"]
                shards.append(
                    _ShardRange(int(hash_range["StartingHashKey"]), int(hash_range["EndingHashKey"]), shard["ShardId"])
                )
            token = page.get("NextToken")
            if not token:
                break
            kwargs = {"NextToken": token}
        if not shards:
            raise KinesisRejectedError("NoOpenShards", f"stream {self._stream_name} has no open shard")
        self._shards = sorted(shards, key=lambda shard: shard.start)
        return self._shards

    def _requests(self, entries: list[_Entry]) -> Iterator[list[_Entry]]:
        request: list[_Entry] = []
        size = 0
        for entry in entries:
            if request and (len(request) >= self._max_batch_records or size + entry.size > self._max_batch_bytes):
                yield request
                request, size = [], 0
            request.append(entry)
            size += entry.size
        if request:
            yield request

    def _put_until_acknowledged(self, pending: list[_Entry]) -> None:
        attempt = 0
        while pending:
            self._metrics.batch_size.observe(len(pending))
            try:
                response = self._put(pending)
            except KinesisThrottledError:
                reason = "throttled"
            except KinesisUnavailableError:
                reason = "endpoint_unavailable"
            else:
                sent = pending
                pending, maybe_reason = self._still_pending(pending, response)
                self._count_acknowledged(sent, pending)
                if maybe_reason is None:
                    return
                reason = maybe_reason
                if len(pending) < len(sent):
                    attempt = 0  # some records got through: capacity exists, keep the backoff short
            attempt += 1
            delay = self._backoff.delay(attempt + 1, rand=self._jitter)
            self._metrics.publish_retries.labels(reason).inc()
            LOG.warning(
                "PutRecords to %s %s: retrying %d records in %.3fs (attempt %d)",
                self._stream_name,
                reason,
                len(pending),
                delay,
                attempt,
            )
            if self._wait(delay):
                raise PublishInterruptedError(f"stopped while {len(pending)} records awaited a retry")

    def _count_acknowledged(self, sent: list[_Entry], retry: list[_Entry]) -> None:
        """Count the records of ``sent`` that are not in ``retry`` (what the stream now holds)."""
        records = len(sent) - len(retry)
        if records:
            size = sum(e.size for e in sent) - sum(e.size for e in retry)
            self._metrics.kinesis_records.labels(self._stream_name).inc(records)
            self._metrics.kinesis_bytes.labels(self._stream_name).inc(size)

    def _put(self, entries: list[_Entry]) -> Mapping[str, Any]:
        """One PutRecords call; botocore errors become ours here and nowhere else."""
        records: list[dict[str, Any]] = []
        for e in entries:
            record: dict[str, Any] = {"Data": e.data, "PartitionKey": e.partition_key}
            if e.explicit_hash_key is not None:
                record["ExplicitHashKey"] = e.explicit_hash_key
            records.append(record)
        return self._call(self._client.put_records, Records=records, StreamName=self._stream_name)

    def _call(self, method: Callable[..., Mapping[str, Any]], **kwargs: Any) -> Mapping[str, Any]:
        try:
            return method(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            failure = classify(exc)
            if failure.kind is ErrorKind.THROTTLED:
                raise KinesisThrottledError(failure.code) from exc
            if failure.kind is ErrorKind.UNAVAILABLE:
                where = f"HTTP {failure.status}" if failure.status else "endpoint unreachable"
                raise KinesisUnavailableError(f"Kinesis answered {failure.code} ({where})") from exc
            raise KinesisRejectedError(failure.code, failure.message) from exc

    def _still_pending(self, sent: list[_Entry], response: Mapping[str, Any]) -> tuple[list[_Entry], str | None]:
        """Entries to send again, in order, and the retry reason (``None`` when all are acknowledged)."""
        results = response.get("Records")
        if not isinstance(results, list) or len(results) != len(sent):
            raise KinesisRejectedError("MalformedResponse", f"{len(sent)} records sent, results do not match")
        reasons: set[str] = set()
        failed_keys: set[str] = set()
        retry: list[_Entry] = []
        for entry, result in zip(sent, results, strict=True):
            code = result.get("ErrorCode")
            if code:
                reason = _RETRYABLE_ENTRY_CODES.get(str(code))
                if reason is None:
                    raise KinesisRejectedError(str(code), str(result.get("ErrorMessage", "")), event_id=entry.event_id)
                reasons.add(reason)
                failed_keys.add(entry.sequence_key)
            elif entry.explicit_hash_key is not None and result.get("ShardId") not in (None, entry.order_key):
                LOG.warning(
                    "aggregated record landed on %s, not %s: refreshing the shard map",
                    result.get("ShardId"),
                    entry.order_key,
                )
                self._shards = None
            if entry.sequence_key in failed_keys:
                retry.append(entry)
        if not retry:
            return [], None
        return retry, "throttled" if "throttled" in reasons else min(reasons)


def _sleep_never_stopped(seconds: float) -> bool:
    time.sleep(seconds)
    return False
