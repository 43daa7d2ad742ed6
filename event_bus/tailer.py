"""The log tailer: the outbox relay from PostgreSQL's WAL to a Kinesis data stream.

A logical replication slot (built-in ``pgoutput`` plugin, publication ``tagbus_events``)
yields every committed insert into ``events`` in commit order. The tailer peeks a batch
of whole transactions, publishes their events, and only then advances the slot past
them — so the slot never moves past an event Kinesis has not acknowledged, and a crash
anywhere resends instead of losing (at-least-once; consumers apply by version).

Parts, each small:

- :class:`SlotReader` — the SQL interface of the slot (peek, advance, heartbeat, status);
  driver errors become :class:`DatabaseUnavailableError` / :class:`SlotBusyError`.
- :class:`TailerLock` — ``pg_try_advisory_lock`` on a dedicated session: one active tailer.
- :class:`ChangeDecoder` — pgoutput messages → :class:`DecodedTransaction` of
  :class:`~event_bus.envelope.StoredEvent`.
- :class:`RecordSink` — where events go; :class:`KinesisPublisher` (``PutRecords``) and
  :class:`NullSink` (decode-only benchmarks).
- :class:`LogTailer` — the loop tying them together, with metrics (:class:`TailerMetrics`).

Errors::

    TailerError
    ├── DatabaseUnavailableError     connection lost or refused (retried by run())
    │   └── SlotBusyError            slot in use by another session (retried by run())
    ├── SlotConfigurationError       slot exists with another plugin/database, wal_level wrong
    ├── LockUnavailableError         run_once() while another tailer holds the lock
    ├── EventDecodeError             a WAL row cannot become a StoredEvent (fatal)
    ├── OversizeRecordError          an event's record exceeds Kinesis' 1 MiB (fatal, loud)
    └── PublishError
        ├── KinesisThrottledError    throttled (retried forever, with backoff)
        ├── KinesisUnavailableError  endpoint unreachable / 5xx (retried forever)
        ├── KinesisRejectedError     any other error code (fatal)
        └── PublishInterruptedError  stop requested while backing off
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import botocore.exceptions
import orjson
import psycopg
import psycopg.errors
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from event_bus.envelope import StoredEvent
from event_bus.pgoutput import (
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    Relation,
    TupleValue,
    decode_message,
    format_lsn,
    parse_lsn,
)
from event_bus.settings import TailerSettings

LOG = logging.getLogger(__name__)

#: Advisory lock key of the active tailer ("tagbus" in ASCII); advisory locks are per database.
ADVISORY_LOCK_KEY: Final = 0x746167627573
#: Prefix of the transactional logical message the tailer emits when idle.
HEARTBEAT_PREFIX: Final = "tagbus.heartbeat"

#: Where the tailer process serves its Prometheus registry (``/metrics``); loopback by default.
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_METRICS_HOST: Final = "127.0.0.1"

#: Kinesis limits: a record's Data plus its partition key, and one PutRecords request.
MAX_RECORD_BYTES: Final = 1_048_576
MAX_BATCH_RECORDS: Final = 500
MAX_BATCH_BYTES: Final = 5 * 1_048_576

# Error codes are Kinesis' own (never message text). Whole-request throttling:
_THROTTLE_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "LimitExceededException",
        "KMSThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_UNAVAILABLE_CODES: Final = frozenset(
    {
        "InternalFailure",
        "InternalFailureException",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# Per-entry ErrorCode of PutRecords → retry reason; any other per-entry code is fatal.
_RETRYABLE_ENTRY_CODES: Final = {
    "ProvisionedThroughputExceededException": "throttled",
    "KMSThrottlingException": "throttled",
    "InternalFailure": "internal_failure",
}


class TailerError(Exception):
    """Base of the log tailer's errors."""


class DatabaseUnavailableError(TailerError):
    """The database connection failed or was lost."""


class SlotBusyError(DatabaseUnavailableError):
    """Another session is using the replication slot right now."""


class SlotConfigurationError(TailerError):
    """The slot cannot be used as configured (wrong plugin or database, wal_level too low)."""


class LockUnavailableError(TailerError):
    """Another tailer holds the advisory lock; only the holder may read the slot."""


class EventDecodeError(TailerError):
    """A decoded insert cannot be turned into a StoredEvent."""

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(f"{message} (transaction commit LSN {format_lsn(position)})")
        self.position = position


class OversizeRecordError(TailerError):
    """An event's Kinesis record is larger than Kinesis accepts; it is never skipped."""

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"event {event_id!r} needs a {size}-byte Kinesis record (Data + PartitionKey), over the "
            f"{limit}-byte limit: the tailer cannot publish it and will not skip it"
        )
        self.event_id = event_id
        self.size = size
        self.limit = limit


class PublishError(TailerError):
    """Publishing to the stream failed."""


class KinesisThrottledError(PublishError):
    def __init__(self, code: str) -> None:
        super().__init__(f"Kinesis throttled the request ({code})")
        self.code = code


class KinesisUnavailableError(PublishError):
    """The Kinesis endpoint could not be reached or answered with a server error."""


class KinesisRejectedError(PublishError):
    """Kinesis refused the request or a record for a reason retrying will not fix."""

    def __init__(self, code: str, detail: str = "", *, event_id: str | None = None) -> None:
        about = f" (event {event_id!r})" if event_id else ""
        super().__init__(f"Kinesis rejected the request{about}: {code} {detail}".rstrip())
        self.code = code
        self.event_id = event_id


class PublishInterruptedError(PublishError):
    """A stop was requested while waiting to retry; nothing was acknowledged past this point."""


# --------------------------------------------------------------------------- metrics


class TailerMetrics:
    """The tailer's Prometheus metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_decoded = Counter(
            "tagbus_tailer_events_decoded",
            "Events decoded from the WAL (resends included).",
            registry=registry,
        )
        self.events_published = Counter(
            "tagbus_tailer_events_published", "Events acknowledged by the sink.", registry=registry
        )
        self.batch_size = Histogram(
            "tagbus_tailer_putrecords_batch_size",
            "Records per PutRecords request.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500),
            registry=registry,
        )
        self.publish_retries = Counter(
            "tagbus_tailer_publish_retries", "PutRecords retries, by reason.", ["reason"], registry=registry
        )
        self.slot_lag_bytes = Gauge(
            "tagbus_tailer_slot_lag_bytes",
            "WAL bytes between the server's current LSN and the slot's confirmed_flush_lsn.",
            registry=registry,
        )
        self.last_publish_time = Gauge(
            "tagbus_tailer_last_publish_timestamp_seconds",
            "Unix time of the last acknowledged publish.",
            registry=registry,
        )
        self.last_advance_time = Gauge(
            "tagbus_tailer_last_advance_timestamp_seconds",
            "Unix time the slot last advanced (heartbeats included): progress is moving.",
            registry=registry,
        )
        self.commit_to_ack_seconds = Histogram(
            "tagbus_tailer_commit_to_ack_seconds",
            "Seconds from a transaction's commit to the acknowledgement of its events.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> TailerMetrics:
        """The metrics of ``registry`` (the default registry when ``None``), created on first use."""
        target = REGISTRY if registry is None else registry
        metrics = _METRICS.get(target)
        if metrics is None:
            metrics = _METRICS[target] = cls(target)
        return metrics


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, TailerMetrics] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- sinks


class RecordSink(Protocol):
    """Where decoded events go. ``publish`` returns only once every event is acknowledged."""

    def publish(self, batch: Sequence[StoredEvent]) -> None: ...


class NullSink:
    """A sink that acknowledges everything at once: for decode-only benchmarks and tests."""

    def __init__(self) -> None:
        self.count = 0

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        self.count += len(batch)


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
        self._backoff_base = backoff_base_seconds
        self._backoff_cap = backoff_cap_seconds
        # wait(seconds) -> True when a stop was requested (threading.Event.wait semantics).
        self._wait = wait or _sleep_never_stopped
        self._jitter = jitter

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        # Size every record before sending any, so an oversize event stops the tailer
        # before later events of its stream could overtake it.
        entries = [self._entry(event) for event in batch]
        if self._aggregate:
            entries = self._aggregated(entries)
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
                sent = len(pending)
                pending, maybe_reason = self._still_pending(pending, response)
                if maybe_reason is None:
                    return
                reason = maybe_reason
                if len(pending) < sent:
                    attempt = 0  # some records got through: capacity exists, keep the backoff short
            attempt += 1
            delay = self._jitter() * min(self._backoff_cap, self._backoff_base * 2**attempt)
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
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _THROTTLE_CODES:
                raise KinesisThrottledError(code) from exc
            if code in _UNAVAILABLE_CODES or status >= 500:
                raise KinesisUnavailableError(f"Kinesis answered {code} (HTTP {status})") from exc
            raise KinesisRejectedError(code, str(error.get("Message", ""))) from exc
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
            raise KinesisUnavailableError(f"Kinesis endpoint unreachable: {type(exc).__name__}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise KinesisRejectedError(type(exc).__name__, str(exc)) from exc

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


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class DecodedTransaction:
    """One committed transaction as the slot returned it."""

    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    events: tuple[StoredEvent, ...]
    heartbeat: bool


_EVENT_COLUMNS: Final = (
    "event_id",
    "tenant_id",
    "stream_id",
    "version",
    "type",
    "source",
    "subject",
    "occurred_at",
    "recorded_at",
    "data",
    "metadata",
)


class ChangeDecoder:
    """Assembles pgoutput messages into committed transactions of events.

    Relation messages are remembered by id (each peek is a new decoding session and
    sends them again before first use). Inserts into other tables are ignored.
    """

    def __init__(self, *, table: str = "events", metrics: TailerMetrics | None = None) -> None:
        self._table = table
        self._metrics = metrics
        self._relations: dict[int, tuple[int, ...] | None] = {}
        self._begin: Begin | None = None
        self._events: list[StoredEvent] = []
        self._heartbeat = False

    def feed(self, data: bytes) -> DecodedTransaction | None:
        """Take one message; return the transaction it completes, if any."""
        message = decode_message(data)
        if isinstance(message, Insert):
            self._on_insert(message)
        elif isinstance(message, Begin):
            self._begin, self._events, self._heartbeat = message, [], False
        elif isinstance(message, Commit):
            return self._on_commit(message)
        elif isinstance(message, Relation):
            self._on_relation(message)
        elif isinstance(message, LogicalMessage) and message.transactional:
            self._heartbeat = self._heartbeat or message.prefix == HEARTBEAT_PREFIX
        return None

    def decode(self, rows: Sequence[bytes]) -> list[DecodedTransaction]:
        """All transactions completed by ``rows``; an unfinished tail is dropped (re-read next time)."""
        done = []
        for data in rows:
            transaction = self.feed(data)
            if transaction is not None:
                done.append(transaction)
        self._begin, self._events = None, []
        return done

    def _on_relation(self, relation: Relation) -> None:
        if relation.name != self._table:
            self._relations[relation.relation_id] = None
            return
        positions = {column.name: i for i, column in enumerate(relation.columns)}
        missing = [name for name in _EVENT_COLUMNS if name not in positions]
        if missing:
            raise EventDecodeError(
                f"relation {relation.namespace}.{relation.name} lacks columns {missing}",
                position=self._begin.final_lsn if self._begin else 0,
            )
        self._relations[relation.relation_id] = tuple(positions[name] for name in _EVENT_COLUMNS)

    def _on_insert(self, insert: Insert) -> None:
        if self._begin is None:
            raise EventDecodeError("insert outside a transaction", position=0)
        if insert.relation_id not in self._relations:
            raise EventDecodeError(f"insert into unknown relation {insert.relation_id}", position=self._begin.final_lsn)
        positions = self._relations[insert.relation_id]
        if positions is None:
            return
        self._events.append(_event_from_row(insert.values, positions, self._begin.final_lsn))

    def _on_commit(self, commit: Commit) -> DecodedTransaction | None:
        begin = self._begin
        if begin is None:
            raise EventDecodeError("commit without begin", position=commit.commit_lsn)
        transaction = DecodedTransaction(
            commit_lsn=commit.commit_lsn,
            end_lsn=commit.end_lsn,
            commit_time=commit.commit_time,
            events=tuple(self._events),
            heartbeat=self._heartbeat,
        )
        self._begin, self._events, self._heartbeat = None, [], False
        if self._metrics is not None and transaction.events:
            self._metrics.events_decoded.inc(len(transaction.events))
        return transaction


def _event_from_row(values: tuple[TupleValue, ...], positions: tuple[int, ...], position: int) -> StoredEvent:
    try:
        text = [values[i] for i in positions]
    except IndexError:
        raise EventDecodeError(
            f"insert has {len(values)} columns, fewer than its relation", position=position
        ) from None
    for name, value in zip(_EVENT_COLUMNS, text, strict=True):
        if value is not None and not isinstance(value, str):
            raise EventDecodeError(f"column {name} arrived as {value!r}, expected text", position=position)
    event_id, tenant, stream, version, type_, source, subject, occurred_at, recorded_at, data, metadata = text
    if event_id is None or tenant is None or stream is None or version is None or recorded_at is None:
        raise EventDecodeError("insert lacks a required column value", position=position)
    assert isinstance(event_id, str) and isinstance(tenant, str) and isinstance(stream, str)
    assert isinstance(version, str) and isinstance(recorded_at, str)
    try:
        meta = orjson.loads(metadata) if isinstance(metadata, str) else {}
        if not isinstance(meta, dict):
            raise ValueError(f"metadata is {type(meta).__name__}, expected an object")
        content_type = meta.get("datacontenttype")
        return StoredEvent(
            id=event_id,
            tenant=tenant,
            stream=stream,
            version=int(version),
            type=str(type_),
            source=str(source),
            recorded_at=_timestamp(recorded_at),
            data=orjson.loads(data) if isinstance(data, str) else None,
            subject=subject if isinstance(subject, str) else None,
            time=_timestamp(occurred_at) if isinstance(occurred_at, str) else None,
            datacontenttype=content_type if isinstance(content_type, str) else None,
            metadata=meta,
            position=position,
        )
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise EventDecodeError(f"event {event_id!r}: {exc}", position=position) from exc


def _timestamp(text: str) -> datetime:
    # The reader session pins DateStyle=ISO and TimeZone=UTC, so values look like
    # '2024-05-06 07:08:09.123456+00', which fromisoformat reads on Python ≥ 3.11.
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return moment


# --------------------------------------------------------------------------- database


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A replication slot's health, for metrics and ``tagbus status``."""

    slot_name: str
    active: bool
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    #: WAL bytes the slot holds back: current WAL LSN minus confirmed_flush_lsn.
    lag_bytes: int
    #: ``reserved`` / ``extended`` / ``unreserved`` / ``lost`` (see max_slot_wal_keep_size).
    wal_status: str | None
    safe_wal_size: int | None


def slot_status(conn: psycopg.Connection[Any], slot: str) -> SlotStatus | None:
    """Status of ``slot`` on ``conn``'s server, or ``None`` when the slot does not exist."""
    row = conn.execute(
        """
        SELECT active, confirmed_flush_lsn::text, restart_lsn::text,
               COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
               wal_status, safe_wal_size
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    active, confirmed, restart, lag, wal_status, safe_wal_size = row
    return SlotStatus(
        slot_name=slot,
        active=bool(active),
        confirmed_flush_lsn=parse_lsn(confirmed) if confirmed else None,
        restart_lsn=parse_lsn(restart) if restart else None,
        lag_bytes=int(lag),
        wal_status=wal_status,
        safe_wal_size=int(safe_wal_size) if safe_wal_size is not None else None,
    )


def mask_database_url(url: str) -> str:
    """The URL or conninfo string with any password replaced by ``***``, safe to log."""
    if "://" in url:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
        query = "&".join(
            "password=***" if pair.lower().startswith("password=") else pair for pair in parts.query.split("&") if pair
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable conninfo>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style ``postgresql+psycopg://`` URLs as well as libpq ones."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.startswith("postgresql+"):
        return f"postgresql://{rest}"
    return url


class _DriverErrors:
    """Translates psycopg errors at the database boundary."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, psycopg.errors.ObjectInUse):
            raise SlotBusyError(str(exc).strip()) from exc
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            raise DatabaseUnavailableError(str(exc).strip()) from exc


_translate = _DriverErrors()


class SlotReader:
    """The replication slot through SQL functions, on its own autocommit session."""

    def __init__(self, database_url: str, slot_name: str, publication: str, *, connect_timeout: int = 10) -> None:
        self._url = database_url
        self.slot_name = slot_name
        self._publication = publication
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            with _translate:
                conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="tagbus-tailer",
                )
                # pgoutput renders text values with the decoding session's settings:
                # pin them so timestamps parse the same on every server.
                conn.execute("SET DateStyle = 'ISO'")
                conn.execute("SET TimeZone = 'UTC'")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ensure_slot(self) -> bool:
        """Create the slot (pgoutput) if missing; ``True`` when it was created now."""
        conn = self.connection
        with _translate:
            row = conn.execute(
                "SELECT plugin, database = current_database() FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            ).fetchone()
            if row is not None:
                plugin, same_database = row
                if plugin != "pgoutput" or not same_database:
                    raise SlotConfigurationError(
                        f"slot {self.slot_name!r} exists with plugin {plugin!r} or in another database"
                    )
                return False
            try:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot_name,))
            except psycopg.errors.DuplicateObject:
                return False
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                raise SlotConfigurationError(f"cannot create slot {self.slot_name!r}: {exc}".strip()) from exc
            return True

    def peek(self, max_changes: int) -> list[bytes]:
        """Whole transactions after confirmed_flush_lsn, at least ``max_changes`` messages if available.

        Each call is a fresh decoding session from the slot's restart_lsn; the server
        checks the change limit only at commits, so a transaction is never cut in two.
        """
        with _translate:
            cursor = self.connection.execute(
                """
                SELECT data FROM pg_logical_slot_peek_binary_changes(
                    %s::name, NULL, %s::int,
                    'proto_version', '1', 'publication_names', %s::text, 'messages', 'true')
                """,
                (self.slot_name, max_changes, _quote_identifier(self._publication)),
                binary=True,
            )
            return [row[0] for row in cursor.fetchall()]

    def advance(self, lsn: int) -> None:
        """Move confirmed_flush_lsn to ``lsn`` (the end LSN of the last acknowledged commit)."""
        with _translate:
            self.connection.execute(
                "SELECT pg_replication_slot_advance(%s::name, %s::pg_lsn)", (self.slot_name, format_lsn(lsn))
            )

    def emit_heartbeat(self) -> None:
        """Commit a transaction holding only a heartbeat message, which the slot can advance past."""
        with _translate:
            self.connection.execute("SELECT pg_logical_emit_message(true, %s::text, ''::text)", (HEARTBEAT_PREFIX,))

    def status(self) -> SlotStatus | None:
        with _translate:
            return slot_status(self.connection, self.slot_name)


def _quote_identifier(name: str) -> str:
    # publication_names is parsed as a list of identifiers: quote to keep case and commas.
    return '"' + name.replace('"', '""') + '"'


class TailerLock:
    """The single-active-tailer lock: a session-level advisory lock on a dedicated session."""

    def __init__(self, database_url: str, *, key: int = ADVISORY_LOCK_KEY, connect_timeout: int = 10) -> None:
        self._url = database_url
        self._key = key
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False

    def try_acquire(self) -> bool:
        if self.held:
            return True
        with _translate:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="tagbus-tailer-lock",
                )
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        self.held = bool(row and row[0])
        return self.held

    def check(self) -> None:
        """Raise :class:`DatabaseUnavailableError` if the lock's session is gone (the lock with it)."""
        if not self.held or self._conn is None:
            raise LockUnavailableError("the tailer lock is not held")
        try:
            with _translate:
                self._conn.execute("SELECT 1")
        except DatabaseUnavailableError:
            self.release()
            raise

    def release(self) -> None:
        """Drop the session, which frees the lock."""
        self.held = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------- the tailer


@dataclass(frozen=True, slots=True)
class CycleResult:
    """What one peek → publish → advance cycle did."""

    transactions: int
    events: int
    heartbeats: int
    advanced_to: int | None


class LogTailer:
    """Relays committed events from the WAL to a sink, in commit order, at least once."""

    def __init__(
        self,
        settings: TailerSettings,
        kinesis: KinesisClient | None,
        *,
        sink: RecordSink | None = None,
        registry: CollectorRegistry | None = None,
        table: str = "events",
        max_read_batch: int = 32_000,
        lock_key: int = ADVISORY_LOCK_KEY,
        lock_retry_seconds: float = 1.0,
        lock_check_seconds: float = 1.0,
        status_interval_seconds: float = 5.0,
        reconnect_backoff_cap_seconds: float = 10.0,
        publish_backoff_cap_seconds: float = 5.0,
        aggregate: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = TailerMetrics.for_registry(registry)
        self._stop = threading.Event()
        if sink is None:
            if kinesis is None:
                raise ValueError("LogTailer needs a kinesis client or a sink")
            sink = KinesisPublisher(
                kinesis,
                settings.stream_name,
                metrics=self.metrics,
                backoff_cap_seconds=publish_backoff_cap_seconds,
                wait=self._wait_or_stop,
                aggregate=aggregate,
            )
        self.sink = sink
        url = libpq_url(settings.database_url)
        self._reader = SlotReader(url, settings.slot_name, settings.publication)
        self._lock = TailerLock(url, key=lock_key)
        self._decoder = ChangeDecoder(table=table, metrics=self.metrics)
        self._max_read_batch = max(max_read_batch, settings.read_batch)
        self._read_batch = settings.read_batch
        self._lock_retry_seconds = lock_retry_seconds
        self._lock_check_seconds = lock_check_seconds
        self._status_interval = status_interval_seconds
        self._reconnect_cap = reconnect_backoff_cap_seconds
        self._clock = clock
        self._last_lock_check = 0.0
        self._last_status = float("-inf")
        self._last_progress = time.monotonic()
        self._slot_ready = False

    # -- lifecycle

    def __enter__(self) -> LogTailer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._lock.release()
        self._slot_ready = False

    @property
    def active(self) -> bool:
        """Whether this tailer holds the lock (and so may read the slot)."""
        return self._lock.held

    def try_activate(self) -> bool:
        """Take the lock if free and make sure the slot exists; ``False`` if another tailer is active."""
        if not self._lock.try_acquire():
            return False
        if not self._slot_ready:
            if self._reader.ensure_slot():
                LOG.info("created replication slot %s (pgoutput)", self.settings.slot_name)
            self._slot_ready = True
            self._last_lock_check = time.monotonic()
        return True

    # -- one cycle

    def run_once(self) -> CycleResult:
        """Peek whole transactions, publish their events, then advance the slot past them."""
        if not self.try_activate():
            raise LockUnavailableError("another tailer holds the lock")
        self._check_lock()
        rows = self._reader.peek(self._read_batch)
        # Whole transactions only come back, so a full batch means a backlog: read more per
        # peek, since every peek re-decodes from the slot's restart_lsn.
        if len(rows) >= self._read_batch:
            self._read_batch = min(self._read_batch * 2, self._max_read_batch)
        else:
            self._read_batch = self.settings.read_batch
        transactions = self._decoder.decode(rows)
        events = [event for transaction in transactions for event in transaction.events]
        if events:
            self.sink.publish(events)
            acked_at = self._clock()
            self.metrics.events_published.inc(len(events))
            self.metrics.last_publish_time.set(acked_at)
            for transaction in transactions:
                if transaction.events:
                    self.metrics.commit_to_ack_seconds.observe(max(0.0, acked_at - transaction.commit_time.timestamp()))
        advanced_to = None
        if transactions:
            advanced_to = transactions[-1].end_lsn
            self._reader.advance(advanced_to)
            self.metrics.last_advance_time.set(self._clock())
            self._last_progress = time.monotonic()
        self._refresh_status()
        return CycleResult(
            transactions=len(transactions),
            events=len(events),
            heartbeats=sum(1 for t in transactions if t.heartbeat),
            advanced_to=advanced_to,
        )

    def drain(self, *, max_cycles: int = 1_000_000) -> CycleResult:
        """Run cycles until the slot has nothing more; the totals."""
        total = CycleResult(0, 0, 0, None)
        for _ in range(max_cycles):
            result = self.run_once()
            if not result.transactions:
                break
            total = CycleResult(
                transactions=total.transactions + result.transactions,
                events=total.events + result.events,
                heartbeats=total.heartbeats + result.heartbeats,
                advanced_to=result.advanced_to,
            )
        return total

    def emit_heartbeat(self) -> None:
        self._reader.emit_heartbeat()
        self._last_progress = time.monotonic()

    def slot_status(self) -> SlotStatus | None:
        return self._reader.status()

    # -- the loop

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set; waits for the lock while another tailer is active.

        Database outages are retried with backoff. Oversize records, records Kinesis
        rejects and undecodable rows propagate: they need a person, not a retry.
        """
        if stop is not None:
            self._stop = stop
        stop = self._stop
        LOG.info(
            "tailer starting: slot=%s publication=%s stream=%s database=%s",
            self.settings.slot_name,
            self.settings.publication,
            self.settings.stream_name,
            mask_database_url(self.settings.database_url),
        )
        failures = 0
        waiting_logged = False
        try:
            while not stop.is_set():
                try:
                    if not self.active:
                        if not self.try_activate():
                            if not waiting_logged:
                                LOG.info("another tailer is active; waiting for the lock")
                                waiting_logged = True
                            stop.wait(self._lock_retry_seconds)
                            continue
                        # One startup line unless this tailer waited and is now taking over.
                        level = logging.INFO if waiting_logged else logging.DEBUG
                        LOG.log(level, "tailer active on slot %s", self.settings.slot_name)
                        waiting_logged = False
                    result = self.run_once()
                    failures = 0
                    if result.transactions:
                        continue
                    if time.monotonic() - self._last_progress >= self.settings.heartbeat_seconds:
                        self.emit_heartbeat()
                        continue
                    stop.wait(self.settings.poll_interval_seconds)
                except PublishInterruptedError:
                    break
                except DatabaseUnavailableError as exc:
                    failures += 1
                    delay = random.random() * min(self._reconnect_cap, 0.2 * 2**failures)
                    LOG.warning("database unavailable (%s); retrying in %.2fs", exc, delay)
                    self.close()
                    stop.wait(delay)
        finally:
            self.close()
            LOG.info("tailer stopped")

    def stop(self) -> None:
        self._stop.set()

    def _wait_or_stop(self, seconds: float) -> bool:
        # Looks the event up at call time: run(stop) may swap in the caller's event.
        return self._stop.wait(seconds)

    def _check_lock(self) -> None:
        now = time.monotonic()
        if now - self._last_lock_check >= self._lock_check_seconds:
            self._lock.check()
            self._last_lock_check = now

    def _refresh_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status < self._status_interval:
            return
        self._last_status = now
        status = self._reader.status()
        if status is not None:
            self.metrics.slot_lag_bytes.set(status.lag_bytes)


# --------------------------------------------------------------------------- process entry


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The tailer's ``/metrics`` HTTP endpoint, served from a daemon thread."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int = DEFAULT_METRICS_PORT, *, host: str = DEFAULT_METRICS_HOST, registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (the default one when ``None``) at ``http://host:port/metrics``; port 0 picks one."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY if registry is None else registry)
    return MetricsServer(host=host, port=int(server.server_port), _server=server, _thread=thread)


def run_tailer(
    settings: TailerSettings,
    kinesis: KinesisClient | None,
    *,
    stop: threading.Event,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    metrics_host: str = DEFAULT_METRICS_HOST,
    registry: CollectorRegistry | None = None,
    **tailer_options: Any,
) -> None:
    """The tailer process: serve ``/metrics`` (unless ``metrics_port`` is ``None``) and relay until ``stop``.

    ``tailer_options`` go to :class:`LogTailer` (``sink=``, ``aggregate=``, backoff knobs …).
    """
    metrics_server = None
    if metrics_port is not None:
        metrics_server = start_metrics_server(metrics_port, host=metrics_host, registry=registry)
        LOG.info("tailer metrics at %s", metrics_server.url)
    try:
        with LogTailer(settings, kinesis, registry=registry, **tailer_options) as relay:
            relay.run(stop)
    finally:
        if metrics_server is not None:
            metrics_server.close()
