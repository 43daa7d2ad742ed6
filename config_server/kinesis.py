"""A config server's changes read straight from the Kinesis stream, with its own shard iterators.

No leases and no KCL: every server needs every shard, so each one polls all of them itself
(``GetShardIterator`` / ``GetRecords``) from one thread. How it starts so that nothing
committed before or after its start is missing, and ends with exactly the read models' state:

1. read the KCL consumer's checkpoints (:mod:`config_server.checkpoints`); the consumer
   checkpoints only after applying, so everything before a checkpoint is in the read models;
2. then load a snapshot of the read models (``sink.load(snapshot.scan())``), which therefore
   holds everything before those checkpoints, tombstones included;
3. then read each shard from its checkpoint (``AT_SEQUENCE_NUMBER``), a closed shard's children
   after it, and shards created later from their start. What the snapshot already has comes
   again from the stream and is a no-op by version.

Records may be KPL aggregates (the tailer aggregates); they are unpacked here, decoded with
:meth:`StoredEvent.from_record_data` and turned into changes with
:meth:`ConfigChange.from_event`. Other event types are passed over; a record that cannot be
decoded, or a config event that can never be applied, is logged and counted
(:class:`KinesisSourceStats`) and never stops the source. Each ``GetRecords`` batch goes to
``sink.apply`` in shard order. After every round in which each shard answered, the source
reports ``sink.caught_up(lag_ms=…)`` with the largest ``MillisBehindLatest``; the first report
waits until every shard was read past what it held when the source started.

Polling: Kinesis serves 5 ``GetRecords`` per second per shard, shared by every reader of the
stream. A shard is polled again at once while it is behind by more than ``idle_interval``
(``MillisBehindLatest``; a read may come back empty in a stretch of the shard without records
and still be behind), otherwise after ``idle_interval`` (200 ms, the KCL's minimum): a shard
that is only a few records behind its tip waits like an idle one rather than spending the
shard's reads one call per record. Throttling, an unreachable endpoint and
other transient failures back off per shard with jitter and are reported through
``sink.source_failed``; an expired iterator is opened again after the last record read;
``ListShards`` is read again every ``list_shards_interval`` and whenever a shard ends, so
splits and merges are followed (children after their parents, as in the KCL). A source that
could not read for ``restart_after`` seconds starts over from new checkpoints and a new
snapshot, since records may have left the stream's retention meanwhile.

Production: the 5 reads/s of a shard are shared by every poller, and the KCL consumer's own
200 ms poll already uses them all, so on real Kinesis a polling server makes the shard throttle
(the source backs off, the consumer too). Past a local stack, give the servers enhanced
fan-out (``SubscribeToShard``: a dedicated 2 MB/s pipe per consumer and shard, records pushed
as they arrive, up to 20 consumers per stream) and chain the rest of the fleet behind them
(:class:`config_server.upstream.UpstreamChangeSource`). kinesis-mock has no
``SubscribeToShard``, so polling is what runs locally and what is tested here. One thread
polls every shard in turn; a stream of many shards would want one poller per group of shards.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from config_server.checkpoints import (
    TRIM_HORIZON,
    ShardInfo,
    StartAt,
    read_checkpoints,
    start_positions,
)
from config_server.source import ChangeSink
from kernel.envelope import StoredEvent
from kernel.retry import Backoff, Jitter
from projections.errors import ProjectionError
from projections.model import ConfigChange
from projections.stores.botocore_errors import error_code

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_kinesis import KinesisClient

log = logging.getLogger(__name__)

#: ``GetRecords`` takes at most 10,000 records a call.
MAX_RECORDS = 10_000
#: The KCL's minimum idle time between reads of one shard: 5 calls/s per shard.
IDLE_INTERVAL = 0.2
#: Per-shard backoff after a failed call; equal jitter keeps a minimum pause for a throttled shard.
BACKOFF = Backoff(base=0.2, cap=10.0, jitter=Jitter.EQUAL)

_THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_UNAVAILABLE_CODES = frozenset(
    {"InternalFailure", "InternalFailureException", "ServiceUnavailable", "ServiceUnavailableException"}
)


class KinesisSourceError(Exception):
    """Reading the stream failed; ``code`` is Kinesis' error code (or the botocore error's name)."""

    retryable: bool = True

    def __init__(self, message: str, *, operation: str, code: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code


class KinesisUnavailable(KinesisSourceError):
    """The endpoint could not be reached or answered with a server error."""


class KinesisThrottled(KinesisSourceError):
    """Kinesis refused the call for the shard's or the account's rate."""


class KinesisMisconfigured(KinesisSourceError):
    """The stream is missing or access is denied: an operator must act (the source keeps retrying)."""

    retryable = False


class Snapshot(Protocol):
    """Where the starting state comes from: the read models (``projections.router.TagRouter``)."""

    def scan(self) -> Iterable[ConfigChange]: ...


@dataclass
class KinesisSourceStats:
    """Counters of a running source, for metrics and tests (written by the source's thread only)."""

    starts: int = 0
    get_records: int = 0
    records: int = 0
    user_records: int = 0
    changes: int = 0
    #: Events no config model projects.
    ignored: int = 0
    #: Records or user records that are not a tagbus event (logged).
    undecodable: int = 0
    #: Config events whose data can never be applied (logged).
    invalid: int = 0
    throttled: int = 0
    expired_iterators: int = 0
    failures: int = 0
    shard_listings: int = 0
    #: Shard id → the latest ``MillisBehindLatest`` of an unfinished shard.
    lag_ms: dict[str, int] = field(default_factory=dict)


class UndecodableRecord(ValueError):
    """A KPL aggregate whose digest matched but whose body is not an aggregated record."""


def user_records(data: bytes) -> list[bytes]:
    """The user records of one Kinesis record: a KPL aggregate's, or the record itself.

    Done here rather than with ``aws_kinesis_agg.deaggregator``, which prints and skips an
    aggregate it cannot parse: the source must count every failure. As in the KCL, data
    whose magic or MD5 digest does not match is an ordinary record.
    """
    from aws_kinesis_agg import DIGEST_SIZE, MAGIC  # type: ignore[import-untyped]

    if not data.startswith(MAGIC) or len(data) <= len(MAGIC) + DIGEST_SIZE:
        return [data]
    body = data[len(MAGIC) : -DIGEST_SIZE]
    if hashlib.md5(body).digest() != data[-DIGEST_SIZE:]:
        return [data]
    aggregate = _aggregated_record()
    try:
        aggregate.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError; its module is not typed
        raise UndecodableRecord(f"KPL aggregate with a valid digest does not parse: {e}") from e
    return [bytes(record.data) for record in aggregate.records]


def _aggregated_record() -> Any:
    # The package's modules put their own directory on sys.path so that its generated protobuf
    # modules import each other; importing one of them first makes messages_pb2 importable.
    # Deferred to the first aggregate, so importing this module changes nothing.
    import aws_kinesis_agg.deaggregator  # type: ignore[import-untyped]  # noqa: F401
    from aws_kinesis_agg import messages_pb2

    return messages_pb2.AggregatedRecord()


@dataclass
class _Shard:
    """A shard being read (or known to be done)."""

    shard_id: str
    parents: tuple[str, ...]
    start: StartAt | None
    iterator: str | None = None
    last_sequence: str | None = None
    next_poll: float = 0.0
    failures: int = 0
    failing_since: float | None = None
    finished: bool = False
    lag_ms: int = 0
    answered: bool = False
    #: Read past what the shard held when the source started (or finished).
    reached_start: bool = False


class KinesisChangeSource:
    """Feeds a config server's state from the Kinesis stream (see the module docstring).

    ``kinesis`` and ``dynamodb`` are boto3 clients built by the composition root;
    ``snapshot`` is the tag router (``scan()`` of every read model); ``lease_table`` is the
    KCL consumer's lease table (its application name), or ``None`` to start every shard at
    its trim horizon (no consumer: e.g. a stream read by servers only).
    """

    def __init__(
        self,
        kinesis: KinesisClient,
        dynamodb: DynamoDBClient,
        snapshot: Snapshot,
        *,
        stream_name: str,
        lease_table: str | None,
        idle_interval: float = IDLE_INTERVAL,
        max_records: int = MAX_RECORDS,
        list_shards_interval: float = 10.0,
        backoff: Backoff = BACKOFF,
        restart_after: float = 600.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= max_records <= MAX_RECORDS:
            raise ValueError(f"max_records must be within 1..{MAX_RECORDS}")
        self._kinesis = kinesis
        self._dynamodb = dynamodb
        self._snapshot = snapshot
        self.stream_name = stream_name
        self.lease_table = lease_table
        self._idle = idle_interval
        self._max_records = max_records
        self._list_interval = list_shards_interval
        self._backoff = backoff
        self._restart_after = restart_after
        self._monotonic = monotonic
        self._wall = wall
        self._rand = rand
        self.stats = KinesisSourceStats()
        self._shards: dict[str, _Shard] = {}
        self._started_wall = 0.0
        self._ready = False
        self._next_listing = 0.0

    # -- the ChangeSource port ------------------------------------------------------------

    def run(self, sink: ChangeSink, stop: threading.Event) -> None:
        """Read until ``stop`` is set: start (checkpoints, snapshot, shards), then follow the stream."""
        attempt = 0
        while not stop.is_set():
            try:
                self._start(sink)
                attempt = 0
                self._follow(sink, stop)
            except (KinesisSourceError, ProjectionError) as e:
                attempt += 1
                self._failed(sink, e)
                stop.wait(self._backoff.delay(attempt, rand=self._rand))
            except Exception as e:
                # Nothing is checkpointed here: starting over from the consumer's checkpoints
                # and a new snapshot loses nothing, so an unexpected error costs a restart.
                attempt += 1
                log.exception("kinesis change source failed unexpectedly; starting over")
                self._failed(sink, e)
                stop.wait(self._backoff.delay(attempt, rand=self._rand))

    # -- start ---------------------------------------------------------------------------

    def _start(self, sink: ChangeSink) -> None:
        """Checkpoints, then the snapshot, then the shards: the order is what makes it complete."""
        self.stats.starts += 1
        self._started_wall = self._wall()
        checkpoints = (
            read_checkpoints(self._dynamodb, self.lease_table, stream_name=self.stream_name) if self.lease_table else {}
        )
        sink.load(self._snapshot.scan())
        listing = self._list_shards()
        positions = start_positions(listing, checkpoints)
        self._shards = {}
        for info in listing:
            start = positions[info.shard_id]
            self._shards[info.shard_id] = _Shard(
                info.shard_id, info.parent_ids, start, finished=start is None, reached_start=start is None
            )
        self._next_listing = self._monotonic() + self._list_interval
        log.info(
            "reading %s from %d shard(s) (%d already in the read models), after a snapshot; checkpoints: %s",
            self.stream_name,
            sum(1 for s in self._shards.values() if not s.finished),
            sum(1 for s in self._shards.values() if s.finished),
            {k: (c.kind.value, c.sequence_number) for k, c in checkpoints.items()},
        )

    def _list_shards(self) -> list[ShardInfo]:
        request: dict[str, Any] = {"StreamName": self.stream_name}
        shards: list[ShardInfo] = []
        while True:
            try:
                response = self._kinesis.list_shards(**request)
            except (BotoCoreError, ClientError) as e:
                raise _translate(e, "ListShards") from e
            shards.extend(ShardInfo.from_listing(s) for s in response.get("Shards", []))
            token = response.get("NextToken")
            if not token:
                self.stats.shard_listings += 1
                return shards
            # With a NextToken, ListShards refuses the stream name.
            request = {"NextToken": token}

    # -- follow --------------------------------------------------------------------------

    def _follow(self, sink: ChangeSink, stop: threading.Event) -> None:
        """Poll the shards until ``stop``, or until reading failed for ``restart_after`` (returns)."""
        while not stop.is_set():
            now = self._monotonic()
            if now >= self._next_listing:
                self._refresh_shards(sink)
            for shard in self._eligible():
                if stop.is_set():
                    return
                if shard.next_poll <= self._monotonic():
                    self._poll(shard, sink)
            self._maybe_report(sink)
            if self._stalled():
                log.warning("no records read for %.0f s; starting over from checkpoints", self._restart_after)
                return
            wake = min([s.next_poll for s in self._eligible()] + [self._next_listing])
            delay = wake - self._monotonic()
            if delay > 0:
                stop.wait(delay)

    def _eligible(self) -> list[_Shard]:
        """Unfinished shards whose parents (those known) are read to their end."""
        return [
            s
            for s in self._shards.values()
            if not s.finished and all(p not in self._shards or self._shards[p].finished for p in s.parents)
        ]

    def _refresh_shards(self, sink: ChangeSink) -> None:
        try:
            listing = self._list_shards()
        except KinesisSourceError as e:
            self._failed(sink, e)
            self._next_listing = self._monotonic() + self._backoff.delay(2, rand=self._rand)
            return
        self._next_listing = self._monotonic() + self._list_interval
        listed = {info.shard_id for info in listing}
        for info in listing:
            if info.shard_id not in self._shards:
                # Created after the source started: all of it is new.
                log.info("new shard %s (parents %s)", info.shard_id, ", ".join(info.parent_ids) or "none")
                self._shards[info.shard_id] = _Shard(info.shard_id, info.parent_ids, TRIM_HORIZON)
        for shard in self._shards.values():
            if not shard.finished and shard.shard_id not in listed:
                # Aged out of the stream's retention: there is nothing left to read in it.
                log.warning("shard %s is no longer listed; dropping it", shard.shard_id)
                self._finish(shard)

    def _poll(self, shard: _Shard, sink: ChangeSink) -> None:
        """One ``GetRecords`` of a shard (opening its iterator first when needed)."""
        try:
            if shard.iterator is None:
                shard.iterator = self._open(shard)
            sent_wall = self._wall()
            self.stats.get_records += 1
            response = self._kinesis.get_records(ShardIterator=shard.iterator, Limit=self._max_records)
        except ClientError as e:
            if error_code(e) == "ExpiredIteratorException":
                # Iterators last five minutes; open another after the last record read.
                self.stats.expired_iterators += 1
                log.info("shard %s: iterator expired; opening another", shard.shard_id)
                shard.iterator = None
                shard.next_poll = self._monotonic()
                return
            self._shard_failed(shard, sink, _translate(e, "GetRecords"))
            return
        except BotoCoreError as e:
            self._shard_failed(shard, sink, _translate(e, "GetRecords"))
            return
        except KinesisSourceError as e:  # from GetShardIterator
            self._shard_failed(shard, sink, e)
            return
        records: Sequence[Mapping[str, Any]] = response.get("Records", [])
        lag = int(response.get("MillisBehindLatest", 0) or 0)
        changes = self._changes(shard, records)
        if changes:
            sink.apply(changes)
        if records:
            shard.last_sequence = str(records[-1]["SequenceNumber"])
        shard.failures, shard.failing_since = 0, None
        shard.answered = True
        shard.lag_ms = lag
        self.stats.lag_ms[shard.shard_id] = lag
        # Conservative: the position reached is at least as new as (sent - lag); a full page
        # says more is waiting even where the emulator reports no lag.
        if not shard.reached_start and len(records) < self._max_records:
            shard.reached_start = sent_wall * 1000 - lag >= self._started_wall * 1000
        next_iterator = response.get("NextShardIterator")
        shard.iterator = next_iterator
        now = self._monotonic()
        if next_iterator is None:
            self._finish(shard)
            children = response.get("ChildShards", [])
            for child in children:
                if child["ShardId"] not in self._shards:
                    self._shards[child["ShardId"]] = _Shard(
                        child["ShardId"], tuple(child.get("ParentShards", (shard.shard_id,))), TRIM_HORIZON
                    )
            log.info(
                "shard %s ended; children %s", shard.shard_id, ", ".join(c["ShardId"] for c in children) or "unknown"
            )
            # A merge's other parent or children the response did not name show up in the listing.
            self._next_listing = min(self._next_listing, now)
        elif lag > self._idle * 1000:
            shard.next_poll = now
        else:
            shard.next_poll = now + self._idle

    def _open(self, shard: _Shard) -> str:
        """A shard iterator after the last record read, else at the shard's start position."""
        start = shard.start or TRIM_HORIZON
        request: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard.shard_id}
        if shard.last_sequence is not None:
            request.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=shard.last_sequence)
        elif start.iterator_type == "AT_SEQUENCE_NUMBER":
            request.update(ShardIteratorType="AT_SEQUENCE_NUMBER", StartingSequenceNumber=start.sequence_number)
        else:
            request.update(ShardIteratorType="TRIM_HORIZON")
        try:
            return str(self._kinesis.get_shard_iterator(**request)["ShardIterator"])
        except ClientError as e:
            if error_code(e) == "InvalidArgumentException" and request["ShardIteratorType"] == "AT_SEQUENCE_NUMBER":
                # A checkpoint this shard does not hold (a stream recreated under the same
                # name): reading the whole shard instead misses nothing.
                log.warning(
                    "shard %s: checkpoint %s is not on the shard; reading it from its trim horizon",
                    shard.shard_id,
                    start.sequence_number,
                )
                shard.start = TRIM_HORIZON
                return self._open(shard)
            raise _translate(e, "GetShardIterator") from e
        except BotoCoreError as e:
            raise _translate(e, "GetShardIterator") from e

    def _changes(self, shard: _Shard, records: Sequence[Mapping[str, Any]]) -> list[ConfigChange]:
        """The config changes in a batch, in shard order; what cannot be read is logged and counted."""
        changes: list[ConfigChange] = []
        for record in records:
            self.stats.records += 1
            try:
                payloads = user_records(record["Data"])
            except UndecodableRecord as e:
                self.stats.undecodable += 1
                log.warning("shard %s record %s: %s", shard.shard_id, record.get("SequenceNumber"), e)
                continue
            for data in payloads:
                self.stats.user_records += 1
                try:
                    event = StoredEvent.from_record_data(data)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    self.stats.undecodable += 1
                    log.warning(
                        "shard %s record %s is not a tagbus event: %s: %s",
                        shard.shard_id,
                        record.get("SequenceNumber"),
                        type(e).__name__,
                        e,
                    )
                    continue
                try:
                    change = ConfigChange.from_event(event)
                except ProjectionError as e:
                    self.stats.invalid += 1
                    log.warning(
                        "shard %s: event %s of %s cannot be applied: %s", shard.shard_id, event.id, event.tenant, e
                    )
                    continue
                if change is None:
                    self.stats.ignored += 1
                    continue
                changes.append(change)
        self.stats.changes += len(changes)
        return changes

    def _finish(self, shard: _Shard) -> None:
        shard.finished = True
        shard.reached_start = True
        shard.iterator = None
        self.stats.lag_ms.pop(shard.shard_id, None)

    def _shard_failed(self, shard: _Shard, sink: ChangeSink, error: KinesisSourceError) -> None:
        shard.failures += 1
        now = self._monotonic()
        if shard.failing_since is None:
            shard.failing_since = now
        shard.next_poll = now + self._backoff.delay(shard.failures, rand=self._rand)
        if isinstance(error, KinesisThrottled):
            self.stats.throttled += 1
        self._failed(sink, error)

    def _failed(self, sink: ChangeSink, error: Exception) -> None:
        self.stats.failures += 1
        log.warning("kinesis change source: %s", error)
        sink.source_failed(error)

    def _stalled(self) -> bool:
        now = self._monotonic()
        return any(
            s.failing_since is not None and now - s.failing_since >= self._restart_after for s in self._eligible()
        )

    def _maybe_report(self, sink: ChangeSink) -> None:
        """``caught_up`` once every eligible shard answered since the last report (the first:
        once every shard was read past what it held at the start)."""
        eligible = self._eligible()
        if not all(s.answered for s in eligible):
            return
        if not self._ready:
            if not all(s.reached_start for s in self._shards.values()):
                return
            self._ready = True
            log.info("caught up with %s", self.stream_name)
        for s in eligible:
            s.answered = False
        sink.caught_up(lag_ms=max((s.lag_ms for s in eligible), default=0))


def _translate(error: BotoCoreError | ClientError, operation: str) -> KinesisSourceError:
    """Our error for a botocore one, by error code; callers ``raise _translate(e, …) from e``."""
    if isinstance(error, ClientError):
        code = error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"kinesis {operation} failed: {code}: {error.response.get('Error', {}).get('Message', '')}"
        if code in _THROTTLING_CODES:
            return KinesisThrottled(message, operation=operation, code=code)
        if code in _UNAVAILABLE_CODES or status >= 500:
            return KinesisUnavailable(message, operation=operation, code=code)
        return KinesisMisconfigured(message, operation=operation, code=code)
    # Connection refused or reset, timeouts: botocore's own exceptions, not service codes.
    return KinesisUnavailable(
        f"kinesis {operation} failed: {type(error).__name__}: {error}", operation=operation, code=type(error).__name__
    )
