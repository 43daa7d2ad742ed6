"""The KCL record processor that projects config events into the tagged read models.

Run by the MultiLangDaemon once per shard as ``python -m tagbus.processor``: the composition
root registers the tags (``tagbus.compose.tag_router``), builds the processor with
:func:`build_processor` and hands it to :func:`run`. It speaks the amazon-kclpy v3 protocol
on stdin/stdout, so nothing here may print to stdout (logs go to stderr).

:class:`BatchRecordProcessor` is the typed base that owns the KCL lifecycle:

* a ``process_records`` batch is decoded and applied at once (``apply``), then checkpointed
  at its last record — after, never before, the read models hold it. With
  ``checkpoint_interval`` set, a batch is checkpointed only when that many seconds passed
  since the last checkpoint: a checkpoint is a DynamoDB round trip that the next batch waits
  for, and the batches skipped are covered by the next checkpoint (or by the one taken at
  shutdown); after a crash they are delivered again, which the stores ignore;
* store errors that waiting can fix (:class:`StoreThrottled`, :class:`StoreUnavailable`)
  are retried with exponential backoff; if they outlast ``max_transient_attempts`` the
  processor halts instead of skipping anything;
* an event that fails for any other reason is retried up to ``max_attempts`` times, then
  written to the dead-letter sink, and only then passed over (undecodable records go there
  at once: decoding them again cannot help);
* :class:`StoreMisconfigured` (missing table, access denied) halts at once, and so does a
  dead letter that cannot be written or an unexpected exception.

Halting means ``SystemExit`` without a checkpoint: kclpy's ``KCLProcess`` swallows other
exceptions and would report the batch done, letting the next checkpoint pass it silently.
When the child exits, the MultiLangDaemon stops; its supervisor restarts it and the shard
resumes from the last checkpoint. Re-applying a batch is harmless: every store ignores
versions it already holds.

``pipelined=True`` (the production processor) moves the writes to one writer thread:
``process_records`` queues the batch and returns, so the KCL polls and delivers the next
batch while this one is written, and batches that arrive meanwhile are applied together
(each key written once). Without it a batch slower to write than the poll interval left the
next ones aging in the KCL's three-deep prefetch queue (with SSM on moto, for several poll
intervals). The guarantees stay: one writer per shard, batches applied in order, a
checkpoint only at the last record of a batch applied with everything before it (taken on a
later ``process_records`` call, the only time the checkpointer may be used, or after
draining the queue at shutdown and shard end), and a failed batch halts the process — at
once, from the writer thread (``halt``), since the KCL's thread may be waiting for a batch
that never comes.
"""

from __future__ import annotations

import abc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from amazon_kclpy.kcl import CheckpointError, KCLProcess
from amazon_kclpy.v3.processor import RecordProcessorBase

from consumers.deadletters import UNKNOWN_TENANT, DeadLetter, DeadLetterSink, DynamoDBDeadLetterSink
from consumers.stages import STAGE_INTERVAL, BatchTimes, StageRecorder
from kernel.envelope import StoredEvent
from kernel.gc_tuning import quiet_collector
from kernel.retry import Backoff, Jitter
from projections.errors import ProjectionError, StoreError, StoreMisconfigured
from projections.router import BatchResult, EventOutcome, TagRouter
from projections.stores.dynamodb import DynamoDBConfigStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

log = logging.getLogger(__name__)

#: Exit status of a halted processor (distinct from Python's 1 for a crash).
EXIT_HALTED = 3
#: Seconds between checkpoints of the production processor. Each checkpoint is a DynamoDB
#: round trip, slow under load, that the next batch waits for; at most this much is
#: delivered again after a crash, and the stores ignore it.
CHECKPOINT_INTERVAL = 1.0


class KinesisRecord(Protocol):
    """What the processor uses of ``amazon_kclpy.messages.Record``."""

    @property
    def binary_data(self) -> bytes: ...
    @property
    def sequence_number(self) -> str: ...
    @property
    def sub_sequence_number(self) -> int | None: ...
    @property
    def partition_key(self) -> str: ...
    @property
    def timestamp_millis(self) -> int:
        """The record's ``ApproximateArrivalTimestamp`` in Kinesis, epoch milliseconds."""
        ...


class Checkpointer(Protocol):
    """What the processor uses of ``amazon_kclpy.kcl.Checkpointer``."""

    def checkpoint(self, sequence_number: str | None = None, sub_sequence_number: int | None = None) -> None: ...


class ProcessingHalted(Exception):
    """The batch can neither be applied nor dead-lettered; the processor must stop."""


@dataclass
class ProcessorStats:
    """Running counts of what this processor did, for logs and tests."""

    batches: int = 0
    records: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0

    def count(self, outcome: EventOutcome) -> None:
        self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1


@dataclass
class _Pending:
    record: KinesisRecord
    event: StoredEvent
    attempts: int = 0
    last_error: ProjectionError | None = None


class _Applier:
    """A pipelined processor's writer thread: applies the batches handed to it, in order.

    ``process_records`` hands a batch over and returns, so the KCL fetches and delivers the
    next batch while this one is written instead of letting it age in its prefetch queue;
    the batches that queued up meanwhile are applied in one call, where the router writes
    each key once. :meth:`applied_through` is the last record of the last batch applied,
    with everything before it: the only position a checkpoint may take. ``submit`` blocks
    while ``max_pending_records`` records wait or are being applied.
    """

    def __init__(
        self,
        apply: Callable[[Sequence[KinesisRecord], float, float], None],
        *,
        max_pending_records: int,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._apply = apply
        self._max_pending = max_pending_records
        self._on_failure = on_failure
        self._cond = threading.Condition()
        self._queue: list[tuple[Sequence[KinesisRecord], float, float]] = []
        self._pending = 0
        self._busy = False
        self._applied: KinesisRecord | None = None
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, records: Sequence[KinesisRecord], received: float, millis_behind_latest: float) -> None:
        """Queue a batch; raises :class:`ProcessingHalted` once applying an earlier one failed."""
        with self._cond:
            self._raise_failure()
            while self._pending >= self._max_pending:
                self._cond.wait()
                self._raise_failure()
            self._queue.append((records, received, millis_behind_latest))
            self._pending += len(records)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tagbus-applier", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def applied_through(self) -> KinesisRecord | None:
        with self._cond:
            return self._applied

    def drain(self) -> None:
        """Wait until every batch handed over is applied (or raise, as ``submit``)."""
        with self._cond:
            while (self._queue or self._busy) and self._failure is None:
                self._cond.wait()
            self._raise_failure()

    def discard_queued(self) -> None:
        """Drop the batches not started yet (the lease is gone: its new holder applies them)."""
        with self._cond:
            self._pending -= sum(len(records) for records, _, _ in self._queue)
            self._queue.clear()
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise ProcessingHalted(f"applying an earlier batch failed: {self._failure}") from self._failure

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                group, self._queue = self._queue, []
                self._busy = True
            records = [record for batch, _, _ in group for record in batch]
            try:
                self._apply(records, group[0][1], max(mbl for _, _, mbl in group))
            except BaseException as e:
                with self._cond:
                    self._failure = e
                    self._busy = False
                    self._cond.notify_all()
                self._on_failure(e)
                return
            with self._cond:
                self._applied = records[-1]
                self._pending -= len(records)
                self._busy = False
                self._cond.notify_all()


def _exit_halted() -> None:
    """A pipelined processor halts by ending the process, without a checkpoint: the KCL's
    thread may be waiting for a batch that never comes (a quiet stream), and ``SystemExit``
    raised in the writer thread would end only that thread."""
    logging.shutdown()
    os._exit(EXIT_HALTED)


class BatchRecordProcessor(RecordProcessorBase, metaclass=abc.ABCMeta):  # type: ignore[misc]
    """Typed base of tagbus record processors: batching, checkpoints, retries, dead letters.

    A projection subclasses it and implements :meth:`apply` for a batch of events.
    """

    def __init__(
        self,
        *,
        dead_letters: DeadLetterSink,
        max_attempts: int = 3,
        max_transient_attempts: int = 8,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        checkpoint_attempts: int = 5,
        checkpoint_interval: float = 0.0,
        pipelined: bool = False,
        max_pending_records: int = 20_000,
        halt: Callable[[], None] = _exit_halted,
        stages: StageRecorder | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_attempts < 1 or max_transient_attempts < 1:
            raise ValueError("attempt limits must be at least 1")
        self.dead_letters = dead_letters
        self.max_attempts = max_attempts
        self.max_transient_attempts = max_transient_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.checkpoint_attempts = checkpoint_attempts
        self.checkpoint_interval = checkpoint_interval
        self.stages = stages
        self._sleep = sleep
        self._clock = clock
        self._monotonic = monotonic
        self._wall = wall
        self._last_checkpoint = float("-inf")
        self._checkpointed: tuple[str, int | None] | None = None
        #: The last record applied, with everything before it (without the pipelined applier).
        self._last_applied: KinesisRecord | None = None
        self._halt = halt
        self._applier = (
            _Applier(self._apply_records, max_pending_records=max_pending_records, on_failure=self._applier_failed)
            if pipelined
            else None
        )
        self.shard_id: str | None = None
        self.lease_lost_at: datetime | None = None
        self.stats = ProcessorStats()

    @property
    def applied_through(self) -> tuple[str, int | None] | None:
        """Pipelined: the position of the last record applied with everything before it."""
        record = self._applier.applied_through() if self._applier is not None else None
        return None if record is None else (record.sequence_number, record.sub_sequence_number)

    @abc.abstractmethod
    def apply(self, events: Sequence[StoredEvent]) -> BatchResult:
        """Project events; one result per event, failures reported rather than raised."""

    # -- KCL v3 lifecycle --------------------------------------------------------------

    def initialize(self, initialize_input: Any) -> None:
        self.shard_id = initialize_input.shard_id
        log.info("processor for shard %s starting at %s", self.shard_id, initialize_input.sequence_number)

    def process_records(self, process_records_input: Any) -> None:
        records: Sequence[KinesisRecord] = process_records_input.records
        checkpointer: Checkpointer = process_records_input.checkpointer
        if not records:
            # The daemon calls with no records while the shard is idle
            # (callProcessRecordsEvenForEmptyRecordList): the time to take a checkpoint the
            # interval held back, so that an idle shard's checkpoint reaches its last record.
            through = self._applier.applied_through() if self._applier is not None else self._last_applied
            if through is not None:
                self._maybe_checkpoint(checkpointer, through)
            return
        received = self._wall()
        mbl = float(getattr(process_records_input, "millis_behind_latest", 0) or 0)
        applier = self._applier
        if applier is None:
            self._halt_on_error(lambda: self._apply_records(records, received, mbl))
            self._last_applied = records[-1]
            self._maybe_checkpoint(checkpointer, records[-1])
            return
        self._halt_on_error(lambda: applier.submit(records, received, mbl))
        through = applier.applied_through()
        if through is not None:
            self._maybe_checkpoint(checkpointer, through)

    def lease_lost(self, lease_lost_input: Any) -> None:
        # Another worker owns the shard now; checkpointing is no longer allowed, and whoever
        # holds it resumes from the last checkpoint: what is still queued here is dropped.
        self.lease_lost_at = self._clock()
        if self._applier is not None:
            self._applier.discard_queued()
        log.info("shard %s: lease lost", self.shard_id)

    def shard_ended(self, shard_ended_input: Any) -> None:
        # The KCL starts the child shards only after the parent is checkpointed at its end.
        log.info("shard %s: ended, checkpointing its end", self.shard_id)
        self._drain()
        self._checkpoint(shard_ended_input.checkpointer, None, None)

    def shutdown_requested(self, shutdown_requested_input: Any) -> None:
        # Once drained, every delivered batch is applied: the checkpoint may cover them all.
        log.info("shard %s: shutdown requested, checkpointing", self.shard_id)
        self._drain()
        self._checkpoint(shutdown_requested_input.checkpointer, None, None)

    def _drain(self) -> None:
        if self._applier is not None:
            self._halt_on_error(self._applier.drain)

    def _halt_on_error(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as e:
            self._log_halt(e)
            raise SystemExit(EXIT_HALTED) from e

    def _maybe_checkpoint(self, checkpointer: Checkpointer, through: KinesisRecord) -> None:
        """Checkpoint at ``through`` (applied, with everything before it) unless one was taken
        less than ``checkpoint_interval`` seconds ago or it is already checkpointed."""
        position = (through.sequence_number, through.sub_sequence_number)
        if position == self._checkpointed or self._monotonic() - self._last_checkpoint < self.checkpoint_interval:
            return
        started = self._wall()
        if self._checkpoint(checkpointer, *position):
            self._checkpointed = position
        if self.stages is not None:
            self.stages.observe_checkpoint(self._wall() - started)

    def _applier_failed(self, error: BaseException) -> None:
        self._log_halt(error)
        self._halt()

    def _log_halt(self, error: BaseException) -> None:
        if isinstance(error, ProcessingHalted):
            log.critical("shard %s: halting without checkpoint: %s", self.shard_id, error)
        else:
            log.critical("shard %s: unexpected error, halting without checkpoint", self.shard_id, exc_info=error)

    def _apply_records(self, records: Sequence[KinesisRecord], received: float, mbl: float) -> None:
        """Apply records (one batch, or batches queued together) and time the stages."""
        started = self._wall()
        oldest = self._process_batch(records)
        applied = self._wall()
        if self.stages is not None:
            arrival = records[0].timestamp_millis / 1000
            commit = oldest.timestamp() if oldest is not None else arrival
            self.stages.observe(
                BatchTimes(
                    commit_to_arrival=arrival - commit,
                    arrival_to_receive=received - arrival,
                    queued=started - received,
                    apply=applied - started,
                    commit_to_applied=applied - commit,
                    millis_behind_latest=mbl,
                )
            )

    # -- batch ----------------------------------------------------------------------

    def _process_batch(self, records: Sequence[KinesisRecord]) -> datetime | None:
        """Apply a batch (retrying, dead-lettering); the ``recorded_at`` of its first event."""
        self.stats.batches += 1
        self.stats.records += len(records)
        letters: list[DeadLetter] = []
        pending: list[_Pending] = []
        for record in records:
            try:
                event = StoredEvent.from_record_data(record.binary_data)
            except (ValueError, KeyError, TypeError) as e:
                letters.append(self._letter(record, None, e, attempts=1))
                continue
            pending.append(_Pending(record, event))
        oldest = pending[0].event.recorded_at if pending else None

        round_ = 0
        while pending:
            result = self.apply([p.event for p in pending])
            if len(result.results) != len(pending):
                raise ProcessingHalted(f"apply returned {len(result.results)} results for {len(pending)} events")
            retry: list[_Pending] = []
            for item, outcome in zip(pending, result.results, strict=True):
                if outcome.outcome is not EventOutcome.FAILED:
                    self.stats.count(outcome.outcome)
                    continue
                error = outcome.error or ProjectionError("failed without an error")
                item.attempts += 1
                item.last_error = error
                if isinstance(error, StoreMisconfigured):
                    raise ProcessingHalted(f"read model misconfigured: {error}") from error
                if error.retryable:
                    if item.attempts >= self.max_transient_attempts:
                        raise ProcessingHalted(
                            f"event {item.event.id} still failing after {item.attempts} attempts: {error}"
                        ) from error
                    retry.append(item)
                elif item.attempts >= self.max_attempts:
                    letters.append(self._letter(item.record, item.event, error, attempts=item.attempts))
                else:
                    retry.append(item)
            if retry:
                round_ += 1
                self.stats.retries += len(retry)
                delay = Backoff(self.base_delay, self.max_delay, Jitter.EQUAL).ceiling(round_)
                log.warning(
                    "shard %s: %d event(s) failed (e.g. %s: %s); retrying in about %.1fs",
                    self.shard_id,
                    len(retry),
                    retry[0].event.id,
                    retry[0].last_error,
                    delay,
                )
                self._sleep(Backoff(self.base_delay, self.max_delay, Jitter.EQUAL).delay(round_))
            pending = retry

        for letter in letters:
            try:
                self.dead_letters.put(letter)
            except Exception as e:
                raise ProcessingHalted(f"cannot write dead letter for {letter.event_id}: {e}") from e
            self.stats.dead_lettered += 1
            log.error(
                "shard %s: dead-lettered %s/%s after %d attempt(s): %s",
                self.shard_id,
                letter.tenant,
                letter.event_id,
                letter.attempts,
                letter.error,
            )
        return oldest

    def _letter(
        self, record: KinesisRecord, event: StoredEvent | None, error: BaseException, *, attempts: int
    ) -> DeadLetter:
        sub = record.sub_sequence_number
        return DeadLetter(
            tenant=event.tenant if event else UNKNOWN_TENANT,
            event_id=event.id if event else f"record:{self.shard_id}:{record.sequence_number}:{sub or 0}",
            data=record.binary_data,
            error_type=type(error).__name__,
            error=str(error),
            attempts=attempts,
            failed_at=self._clock(),
            shard_id=self.shard_id,
            sequence_number=record.sequence_number,
            sub_sequence_number=sub,
            partition_key=record.partition_key,
            stream=event.stream if event else None,
            version=event.version if event else None,
        )

    # -- checkpoints ------------------------------------------------------------------

    def _checkpoint(self, checkpointer: Checkpointer, sequence_number: str | None, sub: int | None) -> bool:
        """Checkpoint (throttling retried); whether it was taken."""
        if self.lease_lost_at is not None:
            return False
        for attempt in range(1, self.checkpoint_attempts + 1):
            try:
                checkpointer.checkpoint(sequence_number, sub)
            except CheckpointError as e:
                if e.value == "ShutdownException":
                    # The lease moved on: whoever holds it now resumes from the last checkpoint.
                    log.info("shard %s: lease lost while checkpointing", self.shard_id)
                    self.lease_lost_at = self._clock()
                    return False
                if e.value == "ThrottlingException" and attempt < self.checkpoint_attempts:
                    self._sleep(Backoff(self.base_delay, self.max_delay, Jitter.NONE).delay(attempt))
                    continue
                # The batch is applied; a later checkpoint covers it, and a redelivery is a no-op.
                log.error("shard %s: checkpoint at %s failed: %s", self.shard_id, sequence_number, e.value)
                return False
            self.stats.checkpoints += 1
            self._last_checkpoint = self._monotonic()
            return True
        return False


class ConfigProjectionProcessor(BatchRecordProcessor):
    """Projects ``config.*`` events through the tag router into their read models."""

    def __init__(self, router: TagRouter, *, dead_letters: DeadLetterSink, **options: Any) -> None:
        super().__init__(dead_letters=dead_letters, **options)
        self.router = router

    def apply(self, events: Sequence[StoredEvent]) -> BatchResult:
        return self.router.apply(events)


def build_processor(
    router: TagRouter,
    dynamodb: DynamoDBClient,
    *,
    ensure_tables: bool = True,
    checkpoint_interval: float = CHECKPOINT_INTERVAL,
    pipelined: bool = True,
    stage_interval: float = STAGE_INTERVAL,
) -> ConfigProjectionProcessor:
    """The production processor over ``router``; dead letters go to a DynamoDB table on ``dynamodb``."""
    dead_letters = DynamoDBDeadLetterSink(dynamodb)
    if ensure_tables:
        try:
            store = router.store_for("tenantconfig")
            if isinstance(store, DynamoDBConfigStore):
                store.ensure_table()
            dead_letters.ensure_table()
        except StoreError as e:
            # Production tables come from infrastructure code and we may lack the rights;
            # a table that is really missing halts the first batch instead.
            log.warning("could not ensure tables: %s", e)
    return ConfigProjectionProcessor(
        router,
        dead_letters=dead_letters,
        checkpoint_interval=checkpoint_interval,
        pipelined=pipelined,
        stages=StageRecorder(interval=stage_interval) if stage_interval > 0 else None,
    )


def configure_logging(level: str = "INFO") -> None:
    """Logs of a shard's processor go to stderr: stdout carries the KCL protocol."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)


def run(processor: BatchRecordProcessor) -> int:
    """Speak the KCL protocol on stdin/stdout with ``processor`` until the daemon ends the shard."""
    quiet_collector()  # no collector pauses of tens of ms in the middle of a batch
    KCLProcess(processor).run()
    return 0


if __name__ == "__main__":
    # A MultiLangDaemon started before the entry point moved to the composition root still
    # spawns `python -m consumers.processor`; it is handed on rather than failing its shard.
    # Delete once no daemon runs with that command.
    import runpy

    runpy.run_module("tagbus.processor", run_name="__main__")
