"""Settings of the log tailer, built by the composition root (nothing here reads the environment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Batches the relay loop keeps published at once (see :class:`~tailer.window.PublishWindow`).
#: One: kinesis-mock answers concurrent requests one after the other, each slower, and two in
#: flight raised commit → ack p99 in every alternating round against it. An endpoint that
#: answers in parallel (real Kinesis) is where more can pay off; measure before raising it.
DEFAULT_IN_FLIGHT: Final = 1


@dataclass(frozen=True, slots=True)
class TailerSettings:
    """Settings of the log tailer (WAL → Kinesis relay)."""

    database_url: str
    stream_name: str = "tagbus-events"
    slot_name: str = "tagbus_tailer"
    publication: str = "tagbus_events"
    #: How long an idle relay cycle waits for the server to push a change.
    poll_interval_seconds: float = 0.02
    #: Quiet this long, the tailer commits a heartbeat so that the slot moves past WAL it skips.
    heartbeat_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class TailerTuning:
    """How the log tailer batches, publishes and retries: the defaults are the tailer process's."""

    #: A read batch ends at the first commit past this many WAL messages or bytes: memory is
    #: bounded by the batch (and the largest transaction), whatever the backlog.
    max_read_batch: int = 5_000
    max_read_bytes: int = 8 * 1_048_576
    in_flight: int = DEFAULT_IN_FLIGHT
    #: Behind a backlog, read and prepare the next batch while the window is full.
    read_ahead: bool = True
    #: Pack events into KPL aggregated records (see :class:`~tailer.publisher.KinesisPublisher`).
    aggregate: bool = False
    publish_backoff_cap_seconds: float = 5.0
    reconnect_backoff_cap_seconds: float = 10.0
    #: How often a standby tailer tries the lock.
    lock_retry_seconds: float = 1.0
    #: How often the slot's lag is read for ``tagbus_tailer_slot_lag_bytes``.
    status_interval_seconds: float = 5.0
