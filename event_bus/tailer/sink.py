"""Where decoded events go: the :class:`RecordSink` port and the decode-only :class:`NullSink`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from event_bus.envelope import StoredEvent


class RecordSink(Protocol):
    """Where decoded events go. ``publish`` returns only once every event is acknowledged."""

    def publish(self, batch: Sequence[StoredEvent]) -> None: ...


class NullSink:
    """A sink that acknowledges everything at once: for decode-only benchmarks and tests."""

    def __init__(self) -> None:
        self.count = 0

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        self.count += len(batch)
