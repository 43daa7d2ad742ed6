"""The relay loop's publish window: batches in flight, and the next batch read ahead.

Up to ``limit`` batches are published at once, each by a worker thread, so the next batch is
read, decoded and sent while Kinesis still answers the one before. Order holds because a batch
that shares a partition key with one in flight waits for it (Kinesis orders records of one
shard only as their requests arrive), and the slot is confirmed in commit order, only past
batches that were acknowledged along with every batch before them: a crash resends at most
the batches in flight.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from tailer.decoder import DecodedTransaction
from tailer.errors import PublishInterruptedError
from tailer.metrics import TailerMetrics
from tailer.sink import RecordSink, prepared_publish
from tailer.stream import ReplicationStream

LOG = logging.getLogger(__name__)

#: Wait this long for an acknowledgement before keeping the replication connection alive.
_QUIET_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ReadyBatch:
    """A batch read and decoded, its records prepared: what the window sends."""

    transactions: list[DecodedTransaction]
    #: The partition keys of its events.
    keys: frozenset[str]
    #: Where the slot may move once it is acknowledged (past heartbeats and keepalives too).
    confirm_to: int
    #: Sends the prepared records; ``None`` when there is nothing to publish.
    send: Callable[[], None] | None

    @classmethod
    def prepare(cls, transactions: list[DecodedTransaction], sink: RecordSink, *, idle_to: int | None) -> ReadyBatch:
        """``transactions`` with their records prepared for ``sink`` (an oversize event is raised here).

        ``idle_to`` is a keepalive position read after them: the slot may move there too.
        """
        events = [event for transaction in transactions for event in transaction.events]
        confirm_to = max(transactions[-1].end_lsn if transactions else 0, idle_to or 0)
        if not events:
            return cls(transactions, frozenset(), confirm_to, None)
        keys = frozenset(event.partition_key for event in events)
        return cls(transactions, keys, confirm_to, prepared_publish(sink, events))


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A batch handed to a publisher thread and not yet confirmed on the slot."""

    transactions: list[DecodedTransaction]
    #: The partition keys of its events: a later batch sharing one waits for this one.
    keys: frozenset[str]
    #: The slot moves here once this batch and every earlier one are acknowledged.
    confirm_to: int
    #: Resolves to the acknowledgement time; ``None`` when there was nothing to publish.
    acked: Future[float] | None

    def merged_with(self, later: _InFlight) -> _InFlight:
        """This marker (nothing to publish) followed by a later one, as one."""
        return _InFlight(
            self.transactions + later.transactions, frozenset(), max(self.confirm_to, later.confirm_to), None
        )


class PublishWindow:
    """The batches the relay loop has published and not yet confirmed on the slot, in commit order.

    A batch with nothing to publish (heartbeats, a keepalive position) becomes a marker: the
    slot moves to it after the batches before it. Markers take no place in the window, and
    markers in a row merge into one, so an idle stream behind a slow batch neither blocks
    reading nor grows the queue. ``read_ahead`` holds the next batch of a backlog, read and
    prepared while the window was full; whoever closes the stream drops it (it is read again).

    Each ``int | None`` a method returns is where it moved the slot, if it did.
    """

    def __init__(
        self,
        stream: ReplicationStream,
        *,
        limit: int,
        metrics: TailerMetrics,
        on_confirmed: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._limit = max(1, limit)
        self._metrics = metrics
        self._on_confirmed = on_confirmed
        self._pending: deque[_InFlight] = deque()
        self._publishers: ThreadPoolExecutor | None = None
        self.read_ahead: ReadyBatch | None = None

    def __bool__(self) -> bool:
        """Whether anything (a batch, or a marker behind one) waits to be confirmed."""
        return bool(self._pending)

    @property
    def full(self) -> bool:
        """Whether every place is taken: markers with nothing to publish take none."""
        return sum(1 for batch in self._pending if batch.acked is not None) >= self._limit

    def make_room(self) -> int | None:
        """Wait until a place is free, confirming what is acknowledged meanwhile."""
        advanced_to = None
        while self.full:
            advanced_to = self.settle(block=True) or advanced_to
        return advanced_to

    def send(self, ready: ReadyBatch) -> int | None:
        """Hand ``ready`` to a publisher thread, once no batch in flight shares a partition key with it.

        A batch with nothing to publish is queued as a marker instead, if it moves the slot.
        The caller makes room first (:meth:`make_room`).
        """
        advanced_to = None
        if ready.send is not None:
            while self._pending and self._shares_a_key(ready.keys):
                advanced_to = self.settle(block=True) or advanced_to
            acked = self._submit(ready.send)
            self._pending.append(_InFlight(ready.transactions, ready.keys, ready.confirm_to, acked))
        elif ready.confirm_to > self._stream.confirmed:
            marker = _InFlight(ready.transactions, frozenset(), ready.confirm_to, None)
            if self._pending and self._pending[-1].acked is None:
                marker = self._pending.pop().merged_with(marker)
            self._pending.append(marker)
        return advanced_to

    def settle(self, *, block: bool = False) -> int | None:
        """Confirm the slot past the acknowledged batches at the head of the queue.

        ``block=True`` waits for the head batch (only that one). A publish failure is raised here.
        """
        advanced_to = None
        while self._pending:
            head = self._pending[0]
            if head.acked is not None:
                if not block and not head.acked.done():
                    break
                self._metrics.acknowledged(head.transactions, self._acknowledgement(head.acked))
            self._pending.popleft()
            if head.confirm_to > self._stream.confirmed:
                self._stream.confirm(head.confirm_to)
                advanced_to = head.confirm_to
                self._on_confirmed()
            if block:
                break
        return advanced_to

    def settle_all(self) -> int | None:
        """Wait for every batch in flight and confirm the slot past them."""
        advanced_to = None
        while self._pending:
            advanced_to = self.settle(block=True) or advanced_to
        return advanced_to

    def abandon(self) -> None:
        """Let the batches in flight finish without confirming them (they are read and sent again)."""
        for batch in self._pending:
            if batch.acked is not None:
                exc = batch.acked.exception()
                if exc is not None and not isinstance(exc, PublishInterruptedError):
                    LOG.warning("a batch in flight failed too: %r", exc)
        self._pending.clear()

    def close(self) -> None:
        """Stop the publisher threads (started again on the next send)."""
        if self._publishers is not None:
            self._publishers.shutdown()
            self._publishers = None

    def _shares_a_key(self, keys: frozenset[str]) -> bool:
        return any(not keys.isdisjoint(batch.keys) for batch in self._pending)

    def _submit(self, send: Callable[[], None]) -> Future[float]:
        if self._publishers is None:
            self._publishers = ThreadPoolExecutor(self._limit, thread_name_prefix="tagbus-tailer-publish")
        return self._publishers.submit(_publish_now, send)

    def _acknowledgement(self, acked: Future[float]) -> float:
        try:
            return acked.result(_QUIET_WAIT_SECONDS)
        except FutureTimeout:
            # A slow or throttled Kinesis: keep the replication connection alive meanwhile.
            with self._stream.kept_alive():
                return acked.result()


def _publish_now(send: Callable[[], None]) -> float:
    send()
    return time.time()
