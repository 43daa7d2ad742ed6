"""Settings of the log tailer, built by the composition root (nothing here reads the environment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TailerSettings:
    """Settings of the log tailer (WAL → Kinesis relay)."""

    database_url: str
    stream_name: str = "tagbus-events"
    slot_name: str = "tagbus_tailer"
    publication: str = "tagbus_events"
    #: Largest number of WAL changes read per slot peek.
    read_batch: int = 2_000
    #: Idle wait between peeks when the slot had nothing new.
    poll_interval_seconds: float = 0.02
    heartbeat_seconds: float = 10.0
