"""The relay loop (:class:`LogTailer`) and the tailer process entry (:func:`run_tailer`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Self

from prometheus_client import CollectorRegistry

from kernel.gc_tuning import quiet_collector
from kernel.retry import Backoff, Jitter
from tailer.decoder import ChangeDecoder, DecodedTransaction
from tailer.errors import (
    DatabaseUnavailableError,
    LockUnavailableError,
    PublishInterruptedError,
    SlotConfigurationError,
    SlotLostError,
)
from tailer.metrics import DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT, TailerMetrics, start_metrics_server
from tailer.pgoutput import format_lsn
from tailer.publisher import KinesisClient, KinesisPublisher
from tailer.recovery import SlotLoss, find_loss, recover_slot
from tailer.settings import TailerSettings, TailerTuning
from tailer.sink import RecordSink
from tailer.slot import SlotReader, SlotStatus, TailerLock, libpq_url, mask_database_url
from tailer.stream import Keepalive, ReplicationStream
from tailer.window import PublishWindow, ReadyBatch

LOG = logging.getLogger(__name__)

#: How long a relay cycle waits for new changes while a batch is in flight: short, so an
#: acknowledgement is confirmed on the slot soon after it arrives.
_IN_FLIGHT_POLL_SECONDS = 0.005
#: How often an active tailer makes sure its lock session is still there.
_LOCK_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class CycleResult:
    """What one read → publish → confirm cycle did."""

    transactions: int
    events: int
    heartbeats: int
    advanced_to: int | None

    @classmethod
    def of(cls, transactions: list[DecodedTransaction], advanced_to: int | None) -> CycleResult:
        return cls(
            transactions=len(transactions),
            events=_event_count(transactions),
            heartbeats=sum(1 for t in transactions if t.heartbeat),
            advanced_to=advanced_to,
        )


class LogTailer:
    """Relays committed events from the WAL to a sink, in commit order, at least once."""

    def __init__(
        self,
        settings: TailerSettings,
        kinesis: KinesisClient | None,
        *,
        sink: RecordSink | None = None,
        registry: CollectorRegistry | None = None,
        tuning: TailerTuning | None = None,
    ) -> None:
        """Publish to ``kinesis`` (``settings.stream_name``), or hand events to ``sink`` instead."""
        self.settings = settings
        self.tuning = tuning = tuning or TailerTuning()
        self.metrics = TailerMetrics.for_registry(registry)
        self._stop = threading.Event()
        if sink is None:
            if kinesis is None:
                raise ValueError("LogTailer needs a kinesis client or a sink")
            sink = KinesisPublisher(
                kinesis,
                settings.stream_name,
                metrics=self.metrics,
                backoff_cap_seconds=tuning.publish_backoff_cap_seconds,
                wait=self._wait_or_stop,
                aggregate=tuning.aggregate,
            )
        self.sink = sink
        url = libpq_url(settings.database_url)
        self._url = url
        self._reader = SlotReader(url, settings.slot_name, settings.publication)
        self._stream = ReplicationStream(url, settings.slot_name, settings.publication)
        self._lock = TailerLock(url)
        self._decoder = ChangeDecoder(metrics=self.metrics)
        #: The keepalive position the last live read saw, if it saw one (see relay_cycle).
        self._idle_to: int | None = None
        self._last_lock_check = 0.0
        self._last_status = float("-inf")
        self._last_progress = time.monotonic()
        self._slot_ready = False
        #: The slot's catalog_xmin when this tailer last read it: where a republish starts if
        #: the slot is dropped (kept across close(): a reconnect must still know it).
        self._horizon_xid: int | None = None
        #: Why the server last refused to stream the slot, until the next activation looks.
        self._refused: SlotLostError | None = None
        self._window = PublishWindow(
            self._stream, limit=tuning.in_flight, metrics=self.metrics, on_confirmed=self._advanced
        )
        #: Whether the last live read filled a batch: a backlog, so the next one is ready to read.
        self._backlogged = False

    # -- lifecycle

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._window.abandon()
        self._window.close()
        self._close_stream()
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
            self._prepare_slot()
            self._slot_ready = True
            self._last_lock_check = time.monotonic()
        return True

    def _activate(self) -> None:
        """Hold the lock and a ready slot before a cycle: :class:`LockUnavailableError` if another tailer is active."""
        if not self.try_activate():
            raise LockUnavailableError("another tailer holds the lock")
        self._check_lock()

    def _prepare_slot(self) -> None:
        """Make the slot ready to stream: create it on a first start, recreate it when lost."""
        refused, self._refused = self._refused, None
        status = self._reader.status()
        loss = find_loss(self._reader, status, remembered_horizon=self._horizon_xid)
        if loss is not None:
            self._recover(loss)
        elif refused is not None and status is not None:
            # The server refused a slot that is there and keeps its WAL: a misconfiguration.
            raise SlotConfigurationError(str(refused)) from refused
        elif self._reader.ensure_slot():
            LOG.info("created replication slot %s (pgoutput)", self.settings.slot_name)
        self._remember(self._reader.status())

    def _recover(self, loss: SlotLoss) -> None:
        """Recreate the slot and republish from the events table what it may not have delivered."""
        self._close_stream()
        confirmed = format_lsn(loss.confirmed_flush_lsn) if loss.confirmed_flush_lsn is not None else "unknown"
        LOG.error(
            "replication slot %s is lost (%s; confirmed up to %s): recreating it and republishing from the "
            "events table every stream with an event from transaction %d on",
            self.settings.slot_name,
            _LOSS_REASONS.get(loss.reason, loss.reason),
            confirmed,
            loss.horizon_xid,
        )
        recovery = recover_slot(self._url, self._reader, loss, self.sink)
        self.metrics.slot_recreated.labels(reason=loss.reason).inc()
        self.metrics.events_republished.inc(recovery.events)
        self.metrics.events_published.inc(recovery.events)
        self._advanced()
        LOG.error(
            "replication slot %s recreated at %s: republished %d events of %d streams from the events table "
            "in %.1fs; relaying from the new slot",
            self.settings.slot_name,
            format_lsn(recovery.start_lsn),
            recovery.events,
            recovery.streams,
            recovery.seconds,
        )

    def _remember(self, status: SlotStatus | None) -> None:
        if status is not None and status.wal_status != "lost" and status.catalog_xmin is not None:
            self._horizon_xid = status.catalog_xmin

    # -- one cycle

    def relay_cycle(self) -> CycleResult:
        """One cycle of the relay loop: read what has arrived, hand it to the window, confirm what is acknowledged.

        A cycle does not wait for its batch's acknowledgement: the
        :class:`~tailer.window.PublishWindow` keeps up to ``in_flight`` batches published at
        once, holds back a batch that shares a partition key with one in flight, and confirms
        the slot in commit order past acknowledged batches only. ``advanced_to`` is where this
        cycle's confirmations moved the slot.

        When the window is full and the last read filled a batch (a backlog), the cycle reads,
        decodes and prepares the next batch while Kinesis answers, and sends it once a place
        frees: the tailer's own CPU then overlaps the calls instead of adding to them. A cycle
        that is not behind waits for the free place first, so its batch takes everything that
        arrived meanwhile.

        The cycle waits up to the poll interval for the first change and takes what has
        arrived. When it read a keepalive, everything the server sent before the keepalive's
        position is in this batch or an earlier one, so the slot may move there once they are
        acknowledged; a fast shutdown waits for that (a walsender exits only once its client
        confirmed all it sent).
        """
        self._activate()
        window = self._window
        try:
            advanced_to = window.settle()
            if self._backlogged and self.tuning.read_ahead and window.read_ahead is None and window.full:
                window.read_ahead = self._ready(self._read_available(0.0))
            # Otherwise wait for a free place before reading, not after: a batch then takes
            # everything that arrived while the window was full (reading first and waiting
            # with the batch in hand left those to the batch after it, one more round trip).
            advanced_to = window.make_room() or advanced_to
            ready, window.read_ahead = window.read_ahead, None
            if ready is None:
                wait = self.settings.poll_interval_seconds
                ready = self._ready(self._read_available(min(wait, _IN_FLIGHT_POLL_SECONDS) if window else wait))
            advanced_to = window.send(ready) or advanced_to
            advanced_to = window.settle() or advanced_to
        except BaseException as exc:
            # What was read but not confirmed is read again from the slot: restart the stream.
            # A failure that is not retried stops the publishes still in flight too.
            self._abandon_in_flight(stop=not isinstance(exc, DatabaseUnavailableError | SlotLostError))
            self._close_stream()
            raise
        self._refresh_status()
        return CycleResult.of(ready.transactions, advanced_to)

    def _ready(self, transactions: list[DecodedTransaction]) -> ReadyBatch:
        return ReadyBatch.prepare(transactions, self.sink, idle_to=self._idle_to)

    def _abandon_in_flight(self, *, stop: bool = False) -> None:
        """Let the batches in flight finish without confirming them (they are read and sent again).

        ``stop=True`` first asks them to give up their retries: the tailer is stopping.
        """
        if stop and self._window:
            self._stop.set()
        self._window.abandon()

    def _advanced(self) -> None:
        self.metrics.last_advance_time.set(time.time())
        self._last_progress = time.monotonic()

    def _read_available(self, wait: float) -> list[DecodedTransaction]:
        """What has arrived, waiting up to ``wait`` seconds for the first change; whole transactions."""
        stream = self._started_stream()
        batch = self._new_batch()
        decoder = self._decoder
        timeout = wait
        self._idle_to = None
        self._backlogged = False
        while True:
            message = stream.read(timeout)
            if isinstance(message, Keepalive):
                if decoder.in_transaction:
                    continue  # the rest of the transaction follows
                # Everything the server sent before this position is in the batch or was
                # published before it: once the batch is published, the slot may move there
                # (a fast shutdown waits for that confirmation, and the server sends no more
                # keepalives until it gets a reply). Take what is already received after it
                # too: under load the walsender sends a keepalive after nearly every
                # transaction, and ending the cycle there meant one PutRecords round trip
                # per transaction, far behind a steady load.
                self._idle_to = message.wal_end
                timeout = 0.0
                continue
            if message is None:
                if decoder.in_transaction:
                    continue  # the server is still sending this transaction
                return batch.transactions
            if type(message) is bytes:
                if batch.add(message, decoder.feed(message)):
                    self._backlogged = True
                    return batch.transactions
                # Once changes arrive, take only what is already here, or the rest of an
                # open transaction (the server is still sending it).
                timeout = wait if decoder.in_transaction else 0.0

    def _new_batch(self) -> _Batch:
        return _Batch(self.tuning.max_read_batch, self.tuning.max_read_bytes)

    def _started_stream(self) -> ReplicationStream:
        if not self._stream.started:
            self._decoder.reset()
            try:
                self._stream.start()
            except SlotLostError as exc:
                # The next activation looks at the slot again, and recovers it if it is lost.
                self._slot_ready = False
                self._refused = exc
                raise
        return self._stream

    def _close_stream(self) -> None:
        self._stream.close()
        self._decoder.reset()
        self._window.read_ahead = None  # read again from the slot with the rest
        self._backlogged = False

    def emit_heartbeat(self) -> None:
        self._reader.emit_heartbeat()
        self._last_progress = time.monotonic()

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
                    if not self.active or not self._slot_ready:
                        if not self.try_activate():
                            if not waiting_logged:
                                LOG.info("another tailer is active; waiting for the lock")
                                waiting_logged = True
                            stop.wait(self.tuning.lock_retry_seconds)
                            continue
                        # One startup line unless this tailer waited and is now taking over.
                        level = logging.INFO if waiting_logged else logging.DEBUG
                        LOG.log(level, "tailer active on slot %s", self.settings.slot_name)
                        waiting_logged = False
                    # The cycle itself waits (up to the poll interval) for the server to push
                    # a change, so an idle loop needs no sleep and a commit is read at once;
                    # it returns without waiting for its batch's acknowledgement.
                    result = self.relay_cycle()
                    failures = 0
                    if result.transactions:
                        continue
                    if time.monotonic() - self._last_progress >= self.settings.heartbeat_seconds:
                        self.emit_heartbeat()
                except PublishInterruptedError:
                    break
                except SlotLostError:
                    continue  # the next activation recovers the slot
                except DatabaseUnavailableError as exc:
                    failures += 1
                    delay = Backoff(0.2, self.tuning.reconnect_backoff_cap_seconds, Jitter.FULL).delay(failures + 1)
                    LOG.warning("database unavailable (%s); retrying in %.2fs", exc, delay)
                    self.close()
                    stop.wait(delay)
            self._finish_in_flight()
        finally:
            self.close()
            LOG.info("tailer stopped")

    def stop(self) -> None:
        self._stop.set()

    def _finish_in_flight(self) -> None:
        """On a clean stop: confirm the batches in flight once acknowledged (fewer resent on restart)."""
        # Stopped mid-retry, or the server is gone: what is unconfirmed is sent again.
        with contextlib.suppress(PublishInterruptedError, DatabaseUnavailableError):
            self._window.settle_all()

    def _wait_or_stop(self, seconds: float) -> bool:
        # Looks the event up at call time: run(stop) may swap in the caller's event.
        return self._stop.wait(seconds)

    def _check_lock(self) -> None:
        now = time.monotonic()
        if now - self._last_lock_check >= _LOCK_CHECK_SECONDS:
            self._lock.check()
            self._last_lock_check = now

    def _refresh_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status < self.tuning.status_interval_seconds:
            return
        self._last_status = now
        status = self._reader.status()
        if status is not None:
            self.metrics.slot_lag_bytes.set(status.lag_bytes)
        self._remember(status)


class _Batch:
    """Transactions read in one cycle, and whether the batch is full."""

    __slots__ = ("_max_bytes", "_max_changes", "bytes", "changes", "transactions")

    def __init__(self, max_changes: int, max_bytes: int) -> None:
        self._max_changes = max_changes
        self._max_bytes = max_bytes
        self.changes = 0
        self.bytes = 0
        self.transactions: list[DecodedTransaction] = []

    def add(self, message: bytes, completed: DecodedTransaction | None) -> bool:
        """Count ``message``; keep the transaction it completed; ``True`` when the batch is full."""
        self.changes += 1
        self.bytes += len(message)
        if completed is None:
            return False
        self.transactions.append(completed)
        return self.changes >= self._max_changes or self.bytes >= self._max_bytes


_LOSS_REASONS = {
    "invalidated": "invalidated: its WAL passed max_slot_wal_keep_size",
    "dropped": "dropped",
    "unfinished": "an earlier recovery did not finish",
}


def _event_count(transactions: list[DecodedTransaction]) -> int:
    return sum(len(t.events) for t in transactions)


def run_tailer(
    settings: TailerSettings,
    kinesis: KinesisClient,
    *,
    stop: threading.Event,
    tuning: TailerTuning | None = None,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    metrics_host: str = DEFAULT_METRICS_HOST,
    registry: CollectorRegistry | None = None,
) -> None:
    """The tailer process: serve ``/metrics`` (unless ``metrics_port`` is ``None``) and relay until ``stop``."""
    quiet_collector()  # no collector pauses of tens of ms between a commit and its publish
    metrics_server = None
    if metrics_port is not None:
        metrics_server = start_metrics_server(metrics_port, host=metrics_host, registry=registry)
        LOG.info("tailer metrics at %s", metrics_server.url)
    try:
        with LogTailer(settings, kinesis, registry=registry, tuning=tuning) as relay:
            relay.run(stop)
    finally:
        if metrics_server is not None:
            metrics_server.close()
