"""The log tailer: the outbox relay from PostgreSQL's WAL to a Kinesis data stream.

A logical replication slot (built-in ``pgoutput`` plugin, publication ``tagbus_events``)
yields every committed insert into ``events`` in commit order. The tailer reads a batch
of whole transactions from the slot's replication stream, publishes their events, and
only then confirms the slot past them — so the slot never moves past an event Kinesis
has not acknowledged, and a crash anywhere resends instead of losing (at-least-once;
consumers apply by version). The relay loop can keep several batches in flight (one by
default); a batch that shares a stream (partition key) with one in flight waits for it, and
the slot is confirmed in commit order.

Modules, one part each (this package re-exports the public names of all but the last three):

- ``errors`` — the error hierarchy below; ``metrics`` — :class:`TailerMetrics` and ``/metrics``;
- ``stream`` — :class:`ReplicationStream` (``START_REPLICATION … LOGICAL``; why, in its docstring);
- ``slot`` — :class:`SlotReader`, :class:`TailerLock`, slot status and URL helpers;
- ``decoder`` — :class:`ChangeDecoder`; ``sink`` — :class:`RecordSink`, :class:`NullSink`;
- ``recovery`` — a lost slot recreated, and the events table republished from where it was;
- ``publisher`` — :class:`KinesisPublisher`; ``runner`` — :class:`LogTailer`, :func:`run_tailer`;
- ``settings`` — :class:`~tailer.settings.TailerSettings` (what to relay, from the composition
  root) and :class:`~tailer.settings.TailerTuning` (batch bounds, batches in flight, backoff);
- ``window`` — :class:`~tailer.window.PublishWindow`, the relay loop's batches in flight;
- ``drain`` — :class:`~tailer.drain.DrainingTailer`, a tailer that relays one batch at a time
  and waits for it: for tests and benchmarks only.

Parts, each small:

- :class:`ReplicationStream` — the slot's changes, pushed by the server over one decoding
  session; confirmations are standby status updates.
- :class:`SlotReader` — the SQL interface of the slot (create, heartbeat, status, and a peek
  for benchmarks and tests); driver errors become :class:`DatabaseUnavailableError` /
  :class:`SlotBusyError`.
- :class:`TailerLock` — ``pg_try_advisory_lock`` on a dedicated session: one active tailer.
- :class:`ChangeDecoder` — pgoutput messages → :class:`DecodedTransaction` of
  :class:`~kernel.envelope.StoredEvent`.
- :class:`RecordSink` — where events go; :class:`KinesisPublisher` (``PutRecords``) and
  :class:`NullSink` (decode-only benchmarks).
- :class:`~tailer.window.PublishWindow` — the batches published and not yet confirmed: it
  holds back a batch that shares a partition key with one in flight, confirms the slot in
  commit order past acknowledged batches only, and keeps the next batch of a backlog read
  ahead while the window is full.
- :class:`LogTailer` — the loop tying them together (lock, slot, reads, the window, recovery
  of a lost slot), with metrics (:class:`TailerMetrics`); :func:`run_tailer` is the process.

Errors::

    TailerError
    ├── DatabaseUnavailableError     connection lost or refused (retried by run())
    │   └── SlotBusyError            slot in use by another session (retried by run())
    ├── SlotConfigurationError       slot exists with another plugin/database, wal_level wrong
    ├── SlotLostError                slot dropped or invalidated (recreated and republished by run())
    ├── LockUnavailableError         a cycle while another tailer holds the lock
    ├── EventDecodeError             a WAL row cannot become a StoredEvent (fatal)
    ├── OversizeRecordError          an event's record exceeds Kinesis' 1 MiB (fatal, loud)
    └── PublishError
        ├── KinesisThrottledError    throttled (retried forever, with backoff)
        ├── KinesisUnavailableError  endpoint unreachable / 5xx (retried forever)
        ├── KinesisRejectedError     any other error code (fatal)
        └── PublishInterruptedError  stop requested while backing off
"""

from __future__ import annotations

from tailer.decoder import HEARTBEAT_PREFIX, ChangeDecoder, DecodedTransaction
from tailer.errors import (
    DatabaseUnavailableError,
    EventDecodeError,
    KinesisRejectedError,
    KinesisThrottledError,
    KinesisUnavailableError,
    LockUnavailableError,
    OversizeRecordError,
    PublishError,
    PublishInterruptedError,
    SlotBusyError,
    SlotConfigurationError,
    SlotLostError,
    TailerError,
)
from tailer.metrics import (
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_PORT,
    MetricsServer,
    TailerMetrics,
    start_metrics_server,
)
from tailer.publisher import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_RECORD_BYTES,
    KinesisClient,
    KinesisPublisher,
)
from tailer.runner import CycleResult, LogTailer, run_tailer
from tailer.sink import NullSink, RecordSink
from tailer.slot import (
    ADVISORY_LOCK_KEY,
    SlotReader,
    SlotStatus,
    TailerLock,
    libpq_url,
    mask_database_url,
    slot_status,
)
from tailer.stream import Keepalive, ReplicationStream

__all__ = [
    "ADVISORY_LOCK_KEY",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_METRICS_PORT",
    "HEARTBEAT_PREFIX",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "MAX_RECORD_BYTES",
    "ChangeDecoder",
    "CycleResult",
    "DatabaseUnavailableError",
    "DecodedTransaction",
    "EventDecodeError",
    "Keepalive",
    "KinesisClient",
    "KinesisPublisher",
    "KinesisRejectedError",
    "KinesisThrottledError",
    "KinesisUnavailableError",
    "LockUnavailableError",
    "LogTailer",
    "MetricsServer",
    "NullSink",
    "OversizeRecordError",
    "PublishError",
    "PublishInterruptedError",
    "RecordSink",
    "ReplicationStream",
    "SlotBusyError",
    "SlotConfigurationError",
    "SlotLostError",
    "SlotReader",
    "SlotStatus",
    "TailerError",
    "TailerLock",
    "TailerMetrics",
    "libpq_url",
    "mask_database_url",
    "run_tailer",
    "slot_status",
    "start_metrics_server",
]
