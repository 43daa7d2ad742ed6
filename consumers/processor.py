"""The KCL record processor that projects config events into the tagged read models.

Run by the MultiLangDaemon once per shard as ``python -m consumers.processor``; it speaks
the amazon-kclpy v3 protocol on stdin/stdout, so nothing here may print to stdout (logs go
to stderr).

:class:`BatchRecordProcessor` is the typed base that owns the KCL lifecycle:

* a ``process_records`` batch is decoded and applied at once (``apply``), then checkpointed
  at its last record — after, never before, the read models hold it;
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
"""

from __future__ import annotations

import abc
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from amazon_kclpy.kcl import CheckpointError, KCLProcess
from amazon_kclpy.v3.processor import RecordProcessorBase

from consumers.deadletters import UNKNOWN_TENANT, DeadLetter, DeadLetterSink, DynamoDBDeadLetterSink
from event_bus.envelope import StoredEvent
from projections.errors import ProjectionError, StoreError, StoreMisconfigured
from projections.router import BatchResult, EventOutcome, TagRouter
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.ssm import SSMConfigStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

log = logging.getLogger(__name__)

#: Exit status of a halted processor (distinct from Python's 1 for a crash).
EXIT_HALTED = 3


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
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if max_attempts < 1 or max_transient_attempts < 1:
            raise ValueError("attempt limits must be at least 1")
        self.dead_letters = dead_letters
        self.max_attempts = max_attempts
        self.max_transient_attempts = max_transient_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.checkpoint_attempts = checkpoint_attempts
        self._sleep = sleep
        self._clock = clock
        self.shard_id: str | None = None
        self.lease_lost_at: datetime | None = None
        self.stats = ProcessorStats()

    @abc.abstractmethod
    def apply(self, events: Sequence[StoredEvent]) -> BatchResult:
        """Project events; one result per event, failures reported rather than raised."""

    # -- KCL v3 lifecycle --------------------------------------------------------------

    def initialize(self, initialize_input: Any) -> None:
        self.shard_id = initialize_input.shard_id
        log.info("processor for shard %s starting at %s", self.shard_id, initialize_input.sequence_number)

    def process_records(self, process_records_input: Any) -> None:
        records: Sequence[KinesisRecord] = process_records_input.records
        if not records:
            return
        try:
            self._process_batch(records)
        except ProcessingHalted as e:
            log.critical("shard %s: halting without checkpoint: %s", self.shard_id, e)
            raise SystemExit(EXIT_HALTED) from e
        except Exception as e:
            log.critical("shard %s: unexpected error, halting without checkpoint", self.shard_id, exc_info=True)
            raise SystemExit(EXIT_HALTED) from e
        last = records[-1]
        self._checkpoint(process_records_input.checkpointer, last.sequence_number, last.sub_sequence_number)

    def lease_lost(self, lease_lost_input: Any) -> None:
        # Another worker owns the shard now; checkpointing is no longer allowed.
        self.lease_lost_at = self._clock()
        log.info("shard %s: lease lost", self.shard_id)

    def shard_ended(self, shard_ended_input: Any) -> None:
        # The KCL starts the child shards only after the parent is checkpointed at its end.
        log.info("shard %s: ended, checkpointing its end", self.shard_id)
        self._checkpoint(shard_ended_input.checkpointer, None, None)

    def shutdown_requested(self, shutdown_requested_input: Any) -> None:
        # Every delivered batch was applied before process_records returned.
        log.info("shard %s: shutdown requested, checkpointing", self.shard_id)
        self._checkpoint(shutdown_requested_input.checkpointer, None, None)

    # -- batch ----------------------------------------------------------------------

    def _process_batch(self, records: Sequence[KinesisRecord]) -> None:
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
                delay = min(self.max_delay, self.base_delay * 2 ** (round_ - 1))
                log.warning(
                    "shard %s: %d event(s) failed (e.g. %s: %s); retrying in about %.1fs",
                    self.shard_id,
                    len(retry),
                    retry[0].event.id,
                    retry[0].last_error,
                    delay,
                )
                self._sleep(random.uniform(delay / 2, delay))
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

    def _checkpoint(self, checkpointer: Checkpointer, sequence_number: str | None, sub: int | None) -> None:
        if self.lease_lost_at is not None:
            return
        for attempt in range(1, self.checkpoint_attempts + 1):
            try:
                checkpointer.checkpoint(sequence_number, sub)
            except CheckpointError as e:
                if e.value == "ShutdownException":
                    # The lease moved on: whoever holds it now resumes from the last checkpoint.
                    log.info("shard %s: lease lost while checkpointing", self.shard_id)
                    self.lease_lost_at = self._clock()
                    return
                if e.value == "ThrottlingException" and attempt < self.checkpoint_attempts:
                    self._sleep(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                    continue
                # The batch is applied; a later checkpoint covers it, and a redelivery is a no-op.
                log.error("shard %s: checkpoint at %s failed: %s", self.shard_id, sequence_number, e.value)
                return
            self.stats.checkpoints += 1
            return


class ConfigProjectionProcessor(BatchRecordProcessor):
    """Projects ``config.*`` events through the tag router into their read models."""

    def __init__(self, router: TagRouter, *, dead_letters: DeadLetterSink, **options: Any) -> None:
        super().__init__(dead_letters=dead_letters, **options)
        self.router = router

    def apply(self, events: Sequence[StoredEvent]) -> BatchResult:
        return self.router.apply(events)


def build_router(dynamodb: DynamoDBClient, ssm: SSMClient) -> TagRouter:
    """The production tag registry: one line per tag."""
    router = TagRouter()
    router.register("tenantconfig", DynamoDBConfigStore(dynamodb))
    router.register("paramconfig", SSMConfigStore(ssm))
    return router


def build_processor(
    dynamodb: DynamoDBClient, ssm: SSMClient, *, ensure_tables: bool = True
) -> ConfigProjectionProcessor:
    router = build_router(dynamodb, ssm)
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
    return ConfigProjectionProcessor(router, dead_letters=dead_letters)


def main() -> int:
    """Entry point the MultiLangDaemon runs per shard; clients from boto3's own environment."""
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("TAGBUS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    session = boto3.session.Session()
    processor = build_processor(session.client("dynamodb"), session.client("ssm"))
    KCLProcess(processor).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
