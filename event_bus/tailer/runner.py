"""The relay loop (:class:`LogTailer`) and the tailer process entry (:func:`run_tailer`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from event_bus.settings import TailerSettings
from event_bus.tailer.decoder import ChangeDecoder
from event_bus.tailer.errors import DatabaseUnavailableError, LockUnavailableError, PublishInterruptedError
from event_bus.tailer.metrics import DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT, TailerMetrics, start_metrics_server
from event_bus.tailer.publisher import KinesisClient, KinesisPublisher
from event_bus.tailer.sink import RecordSink
from event_bus.tailer.slot import ADVISORY_LOCK_KEY, SlotReader, SlotStatus, TailerLock, libpq_url, mask_database_url

LOG = logging.getLogger(__name__)


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
