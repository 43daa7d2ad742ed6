"""The tailer's error hierarchy (drawn in the package docstring)."""

from __future__ import annotations

from tailer.pgoutput import format_lsn


class TailerError(Exception):
    """Base of the log tailer's errors."""


class DatabaseUnavailableError(TailerError):
    """The database connection failed or was lost."""


class SlotBusyError(DatabaseUnavailableError):
    """Another session is using the replication slot right now."""


class SlotConfigurationError(TailerError):
    """The slot cannot be used as configured (wrong plugin or database, wal_level too low)."""


class SlotLostError(TailerError):
    """The server refused to stream the slot: it was dropped, or invalidated (its WAL removed).

    :class:`~tailer.LogTailer` checks which in ``pg_replication_slots``, then recreates the
    slot and republishes from the events table what it may not have delivered.
    """


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
