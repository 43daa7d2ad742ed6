"""The local stack's Kinesis stream, renewed before kinesis-mock wears out, and after it lost records.

kinesis-mock honours no retention: it holds every record it was given, its calls slow down and
its saves grow with them, until it exhausts its heap (``docs/local-stack.md``). The events table
keeps the history, so the stream need not: the stack starts a **fresh stream** (a new
*generation*) in two cases.

*Rotation* (:func:`rotate`), once the current stream holds more than the policy's records or
bytes (counted by the tailer, accumulated here across tailer restarts):

1. stop the tailer: its slot keeps everything after its last acknowledged batch;
2. wait until the consumer's checkpoint on every shard is the shard's last record (nothing
   after it), so every record of the old stream is in the read models;
3. stop the consumer and the config server, delete and create the stream (same name, same
   shard count), drop the consumer's lease tables;
4. start them again: the consumer and the config server begin at the new stream's horizon,
   and the tailer resumes from its slot. Nothing is republished; nothing is lost.

If the consumer does not drain in time, the tailer is started again and the rotation is
left for later: a stalled consumer is the problem to see, and the old stream still works.

*Repair after a crash* (:func:`repair_after_crash`). kinesis-mock saves its state every few
minutes; when it dies without saving, the records acknowledged since are gone, although the
tailer's slot went past them. ``tagbus up`` (or the keeper) finds the part's pid file without
its process and leaves ``stack.KINESIS_CRASH_MARK``; before the apps start, the stream is renewed as
above and every event recorded since the generation began is **republished from the events
table** (:func:`tailer.republish.republish`), every tenant, each stream in version order.
Consumers apply by version, so what they already hold is a no-op.

Where a generation begins. Events reach the new stream after the rotation, from the tailer's
slot: the transactions committed after the last record of the old stream. Their ``recorded_at``
(each transaction's start) can precede that record's own by as long as a transaction stays
open, so a generation's :attr:`Generation.since` is the old stream's last event's
``recorded_at`` less :data:`OPEN_TRANSACTION_MARGIN`. A stack without a generation file (made
before this module, or whose stream was never rotated) republishes everything after a crash.

Real Kinesis trims by its retention and needs none of this; only the local stack renews.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson

from tagbus import aws, stack, stack_lock
from tagbus.settings import Settings

log = logging.getLogger(__name__)

#: In kinesis-mock's data folder, so that removing it (a reset) forgets the generation too.
GENERATION_FILE: Final = "generation.json"
#: How long a transaction may stay open between its first insert and its commit and still have
#: its events counted in the generation its commit falls in. The bus's transactions take
#: milliseconds; a longer one is republished only if it is younger than this.
OPEN_TRANSACTION_MARGIN: Final = timedelta(minutes=5)
#: The parts stopped around a renewal, in start order.
_READERS: Final = ("consumer", "config")


class RenewalError(RuntimeError):
    """A renewal could not be done now; the stack is left running on the old stream."""


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When the stream is due for renewal: past either bound (``0`` turns that bound off)."""

    max_records: int = 50_000
    max_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RotationPolicy:
        """``TAGBUS_KINESIS_ROTATE_RECORDS`` and ``TAGBUS_KINESIS_ROTATE_BYTES`` (``0``: that bound is off)."""
        values: dict[str, int] = {}
        for field_name, var in (
            ("max_records", "TAGBUS_KINESIS_ROTATE_RECORDS"),
            ("max_bytes", "TAGBUS_KINESIS_ROTATE_BYTES"),
        ):
            raw = env.get(var)
            if raw:
                if not (raw.isascii() and raw.isdigit()):  # isdigit alone passes '²', which int() refuses
                    raise ValueError(f"{var} must be a whole number, not {raw!r}")
                values[field_name] = int(raw)
        return cls(**values)

    def due(self, generation: Generation) -> bool:
        return (0 < self.max_records <= generation.records) or (0 < self.max_bytes <= generation.bytes)


@dataclass(frozen=True, slots=True)
class Generation:
    """What the current stream holds, as far as the stack counted."""

    #: Events recorded from this time on may be in this stream only (``None``: from the start).
    since: datetime | None = None
    #: Records and bytes the tailer had acknowledged on this stream when last counted.
    records: int = 0
    bytes: int = 0
    #: The tailer's own counters at the last count, to add only what is new since.
    seen_records: float = 0.0
    seen_bytes: float = 0.0

    def counted(self, records_total: float, bytes_total: float) -> Generation:
        """Add what the tailer's counters gained since the last count (a restarted tailer starts from zero)."""
        # A restart zeroes both counters, and either one going back shows it: the other may
        # already be past its old reading (fewer records since, but larger ones).
        restarted = records_total < self.seen_records or bytes_total < self.seen_bytes
        new_records = records_total if restarted else records_total - self.seen_records
        new_bytes = bytes_total if restarted else bytes_total - self.seen_bytes
        return replace(
            self,
            records=self.records + int(new_records),
            bytes=self.bytes + int(new_bytes),
            seen_records=records_total,
            seen_bytes=bytes_total,
        )

    @classmethod
    def load(cls, path: Path) -> Generation | None:
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"a JSON object was expected, not {type(raw).__name__}")
            since = raw.get("since")
            return cls(
                since=datetime.fromisoformat(since) if since else None,
                records=int(raw.get("records", 0)),
                bytes=int(raw.get("bytes", 0)),
                seen_records=float(raw.get("seen_records", 0.0)),
                seen_bytes=float(raw.get("seen_bytes", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("unreadable %s (%s): counting this stream from zero", path, e)
            return None

    def save(self, path: Path) -> None:
        fields = asdict(self)
        fields["since"] = self.since.isoformat() if self.since else None
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(fields))
        os.replace(temporary, path)


def generation_file(cfg: stack.StackConfig) -> Path:
    return cfg.state / "kinesis-data" / GENERATION_FILE


def crash_mark(cfg: stack.StackConfig) -> Path:
    return cfg.state / "kinesis-data" / stack.KINESIS_CRASH_MARK


# -- rotation -------------------------------------------------------------------------------


def rotate(
    cfg: stack.StackConfig,
    settings: Settings,
    *,
    drain_timeout: float = 300.0,
    progress: Callable[[str], None] = log.info,
) -> Generation:
    """Renew the stream once every reader is past its end; raises :class:`RenewalError` if they do not get there."""
    from tagbus import lifecycle

    with stack_lock.held(cfg.run_dir):
        running = _running(cfg)
        if "tailer" in running:
            progress("stopping the tailer (its slot keeps what it has not published)")
            stack.down(cfg, ["tailer"])
        try:
            progress("waiting for the consumer to reach the end of every shard")
            last = wait_drained(settings, timeout=drain_timeout)
        except RenewalError:
            if "tailer" in running:
                lifecycle.up(cfg, ["tailer"])
            raise
        generation = Generation(since=last - OPEN_TRANSACTION_MARGIN if last else _previous_since(cfg))
        _renew(cfg, settings, running, generation, progress)
        lifecycle.up(cfg, [p for p in stack.APP_PARTS if p in running])
        progress("fresh stream in use")
        return generation


def wait_drained(settings: Settings, *, timeout: float, poll: float = 1.0) -> datetime | None:
    """Wait until no shard has a record after the consumer's checkpoint; the last record's ``recordedat``.

    ``None`` when the stream holds no record at all.
    """
    deadline = time.monotonic() + timeout
    while True:
        behind, last = _drain_state(settings)
        if not behind:
            return last
        if time.monotonic() >= deadline:
            raise RenewalError(
                f"the consumer did not reach the end of {', '.join(sorted(behind))} in {timeout:.0f}s "
                "(is it running? `tagbus status`); the stream was left as it is"
            )
        time.sleep(poll)


def _drain_state(settings: Settings) -> tuple[set[str], datetime | None]:
    """The shards with records after their checkpoint, and the newest ``recordedat`` at the checkpoints."""
    from config_server.checkpoints import CheckpointKind, read_checkpoints
    from consumers.daemon import application_name

    kinesis = aws.client(settings, "kinesis")
    dynamodb = aws.client(settings, "dynamodb")
    try:
        checkpoints = read_checkpoints(dynamodb, application_name(settings.environ), stream_name=settings.stream_name)
        behind: set[str] = set()
        newest: datetime | None = None
        for shard in kinesis.list_shards(StreamName=settings.stream_name)["Shards"]:
            shard_id = shard["ShardId"]
            checkpoint = checkpoints.get(shard_id)
            if checkpoint is not None and checkpoint.kind is CheckpointKind.SHARD_END:
                continue
            if checkpoint is None or checkpoint.sequence_number is None:
                if _records(kinesis, settings.stream_name, shard_id, "TRIM_HORIZON"):
                    behind.add(shard_id)
                continue
            if _records(kinesis, settings.stream_name, shard_id, "AFTER_SEQUENCE_NUMBER", checkpoint.sequence_number):
                behind.add(shard_id)
                continue
            at = _records(kinesis, settings.stream_name, shard_id, "AT_SEQUENCE_NUMBER", checkpoint.sequence_number)
            recorded = _newest_recorded_at(at)
            if recorded is not None and (newest is None or recorded > newest):
                newest = recorded
        return behind, newest
    finally:
        kinesis.close()
        dynamodb.close()


def _records(
    kinesis: Any, stream: str, shard_id: str, kind: str, sequence: str | None = None
) -> list[Mapping[str, Any]]:
    """The first record of ``shard_id`` from the given position (an empty list when there is none)."""
    request: dict[str, Any] = {"StreamName": stream, "ShardId": shard_id, "ShardIteratorType": kind}
    if sequence is not None:
        request["StartingSequenceNumber"] = sequence
    iterator = kinesis.get_shard_iterator(**request)["ShardIterator"]
    records: list[Mapping[str, Any]] = kinesis.get_records(ShardIterator=iterator, Limit=1)["Records"]
    return records


def _newest_recorded_at(records: list[Mapping[str, Any]]) -> datetime | None:
    from config_server.kinesis import UndecodableRecord, user_records

    newest: datetime | None = None
    for record in records:
        try:
            events = user_records(record["Data"])
        except UndecodableRecord:
            continue
        for data in events:
            try:
                recorded = datetime.fromisoformat(orjson.loads(data)["recordedat"])
            except (ValueError, KeyError, TypeError):
                continue
            if newest is None or recorded > newest:
                newest = recorded
    return newest


def _previous_since(cfg: stack.StackConfig) -> datetime | None:
    generation = Generation.load(generation_file(cfg))
    return generation.since if generation else None


# -- repair after a crash -----------------------------------------------------------------


def repair_after_crash(
    cfg: stack.StackConfig, settings: Settings, *, progress: Callable[[str], None] = log.warning
) -> int:
    """Renew the stream and republish the generation's events; the number republished.

    Called by ``tagbus up`` before it starts the apps, when the crash mark is there; the
    readers and the tailer it stops are started again. The mark is removed only once everything
    is republished, so an interrupted repair runs again.
    """
    from prometheus_client import CollectorRegistry

    from tagbus import lifecycle
    from tailer import KinesisPublisher, TailerMetrics
    from tailer.republish import republish

    with stack_lock.held(cfg.run_dir):
        previous = Generation.load(generation_file(cfg)) or Generation()
        running = _running(cfg)
        if "tailer" in running:
            stack.down(cfg, ["tailer"])
        _renew(cfg, settings, running, previous, progress)
        since = previous.since or datetime(1970, 1, 1, tzinfo=UTC)
        progress(
            "kinesis-mock died without saving: republishing every event recorded since "
            f"{since.isoformat() if previous.since else 'the beginning'} into the fresh stream"
        )
        registry = CollectorRegistry()
        metrics = TailerMetrics.for_registry(registry)
        publisher = KinesisPublisher(
            aws.client(settings, "kinesis"), settings.stream_name, metrics=metrics, aggregate=True
        )
        summary = republish(settings.database_url, publisher, tenant=None, since=since)
        labels = {"stream": settings.stream_name}
        records = registry.get_sample_value("tagbus_tailer_kinesis_records_total", labels) or 0.0
        size = registry.get_sample_value("tagbus_tailer_kinesis_bytes_total", labels) or 0.0
        Generation(since=previous.since, records=int(records), bytes=int(size)).save(generation_file(cfg))
        crash_mark(cfg).unlink(missing_ok=True)
        progress(f"republished {summary.events:,} events of {summary.streams:,} streams in {summary.seconds:.1f}s")
        lifecycle.up(cfg, [p for p in stack.APP_PARTS if p in running])
        return summary.events


# -- the renewal both share -----------------------------------------------------------------


def _running(cfg: stack.StackConfig) -> set[str]:
    return {name for name, part in stack.status(cfg).items() if part.running}


def _renew(
    cfg: stack.StackConfig,
    settings: Settings,
    running: set[str],
    generation: Generation,
    progress: Callable[[str], None],
) -> None:
    """Stop the readers, replace the stream by an empty one of the same shard count, forget their checkpoints."""
    readers = [p for p in _READERS if p in running]
    if readers:
        progress(f"stopping {' and '.join(readers)}")
        stack.down(cfg, readers)
    kinesis = aws.client(settings, "kinesis")
    try:
        shards = _open_shards(kinesis, settings.stream_name, default=cfg.stream_shards)
        progress(f"replacing stream {settings.stream_name} by an empty one of {shards} shard(s)")
        try:
            kinesis.delete_stream(StreamName=settings.stream_name, EnforceConsumerDeletion=True)
            kinesis.get_waiter("stream_not_exists").wait(StreamName=settings.stream_name, WaiterConfig={"Delay": 1})
        except kinesis.exceptions.ResourceNotFoundException:
            pass
        kinesis.create_stream(StreamName=settings.stream_name, ShardCount=shards)
        kinesis.get_waiter("stream_exists").wait(StreamName=settings.stream_name, WaiterConfig={"Delay": 1})
    finally:
        kinesis.close()
    forget_checkpoints(settings)
    generation.save(generation_file(cfg))


def _open_shards(kinesis: Any, stream: str, *, default: int) -> int:
    try:
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    except kinesis.exceptions.ResourceNotFoundException:
        return default
    return int(summary.get("OpenShardCount") or default)


def forget_checkpoints(settings: Settings) -> None:
    """Drop the consumer's lease tables: their checkpoints name records of a stream that is gone."""
    from consumers.daemon import application_name

    application = application_name(settings.environ)
    dynamodb = aws.client(settings, "dynamodb")
    try:
        for table in dynamodb.list_tables()["TableNames"]:
            if table == application or table.startswith(f"{application}-"):
                dynamodb.delete_table(TableName=table)
                dynamodb.get_waiter("table_not_exists").wait(TableName=table, WaiterConfig={"Delay": 1})
    finally:
        dynamodb.close()
