"""Where a config server's changes come from: the port between a change source and the state.

A source runs in its own thread (boto3 and most upstream clients block) and hands what it
reads to a :class:`ChangeSink`, which the server's state implements; the sink's methods are
safe to call from that thread. Sources:

- :class:`config_server.kinesis.KinesisChangeSource` — the stream itself, with the server's own
  shard iterators (no leases: every server needs every shard), started from the consumers'
  checkpoints after a snapshot of the read models;
- :class:`config_server.upstream.UpstreamChangeSource` — another config server's ``Watch``
  (chaining, so a fleet grows past Kinesis's read limits).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from projections.model import ConfigChange


class ChangeSink(Protocol):
    """What a source feeds; every method may be called from the source's thread."""

    def load(self, entries: Iterable[ConfigChange]) -> None:
        """The state of every key (tombstones included) from a snapshot: merged by version.

        Called before changes flow (and again after the source had to start over); a key's
        entry only ever moves to a higher version, so a snapshot older than what the state
        holds changes nothing.
        """
        ...

    def apply(self, changes: Sequence[ConfigChange]) -> None:
        """Changes read from the source, in the source's order (per key: version order).

        A change whose version is not above the key's current one is a no-op (resends,
        overlaps between a snapshot and the stream).
        """
        ...

    def caught_up(self, *, lag_ms: int) -> None:
        """The source has delivered everything it knows of, ``lag_ms`` behind its own head.

        The first call marks the server ready (until then it answers UNAVAILABLE); later calls
        feed the progress messages.
        """
        ...

    def source_failed(self, error: Exception) -> None:
        """The source cannot read right now (it keeps retrying); the server keeps serving."""
        ...


class ChangeSource(Protocol):
    """A feed of config changes for a server's state."""

    def run(self, sink: ChangeSink, stop: threading.Event) -> None:
        """Read until ``stop`` is set; blocks, so the server runs it in a thread.

        Retries its own transient failures (reporting them through ``sink.source_failed``)
        and never returns early unless ``stop`` is set.
        """
        ...
