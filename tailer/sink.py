"""Where decoded events go: the :class:`RecordSink` port and the decode-only :class:`NullSink`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from kernel.envelope import StoredEvent


class RecordSink(Protocol):
    """Where decoded events go. ``publish`` returns only once every event is acknowledged."""

    def publish(self, batch: Sequence[StoredEvent]) -> None: ...


def prepared_publish(sink: RecordSink, batch: Sequence[StoredEvent]) -> Callable[[], None]:
    """The publish of ``batch``, with what the sink can do ahead of sending done now.

    A sink with ``prepare(batch)`` (the Kinesis publisher: serialize, size, aggregate)
    does that work at once and returns the call that sends; any other sink's whole
    ``publish`` runs when the call is made.
    """
    prepare: Callable[[Sequence[StoredEvent]], Callable[[], None]] | None = getattr(sink, "prepare", None)
    if prepare is None:
        return functools.partial(sink.publish, batch)
    return prepare(batch)


class NullSink:
    """A sink that acknowledges everything at once: for decode-only benchmarks and tests."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()  # the relay loop may publish from several threads

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        with self._lock:
            self.count += len(batch)
