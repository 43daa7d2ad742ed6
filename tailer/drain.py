"""Relaying one batch at a time and waiting for it: :class:`DrainingTailer`, for tests and benchmarks.

The tailer process runs the relay loop (:meth:`LogTailer.run`), which keeps batches in flight
and returns from a cycle before its batch is acknowledged. A test or a benchmark wants steps
that are over when they return: everything committed before the step read, published, and the
slot's confirmation applied by the server. Nothing in the tailer process uses this module.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from tailer.decoder import DecodedTransaction
from tailer.pgoutput import format_lsn
from tailer.runner import CycleResult, LogTailer
from tailer.stream import Keepalive

LOG = logging.getLogger(__name__)

#: How long a read waits on a quiet stream before asking the server again how far it has sent.
CAUGHT_UP_WAIT_SECONDS: Final = 0.25


class DrainingTailer(LogTailer):
    """A :class:`LogTailer` that can also relay synchronously (:meth:`run_once`, :meth:`drain`).

    The relay loop (:meth:`run`, :meth:`relay_cycle`) is the one the tailer process runs, and
    the two mix: a test may run relay cycles, then drain what they left.
    """

    def run_once(self) -> CycleResult:
        """Read whole transactions from the slot, publish their events, then confirm the slot past them.

        The cycle reads everything committed before it started (or a batch's worth) and
        returns once the slot's confirmed_flush_lsn shows the confirmation.
        """
        self._activate()
        try:
            # After relay cycles: settle what they left in flight, and read a batch they read
            # ahead again, so the slot never moves past either.
            self._window.settle_all()
            if self._window.read_ahead is not None:
                self._close_stream()
            transactions = self._read_until(self._reader.flushed_lsn())
            events = [event for transaction in transactions for event in transaction.events]
            if events:
                with self._stream.kept_alive():
                    self.sink.publish(events)
            advanced_to = transactions[-1].end_lsn if transactions else None
            if advanced_to is not None:
                self._stream.confirm(advanced_to)
        except BaseException:
            # What was read but not confirmed is read again from the slot: restart the stream.
            self._abandon_in_flight()
            self._close_stream()
            raise
        if events:
            self.metrics.acknowledged(transactions, time.time())
        if advanced_to is not None:
            if not self._reader.wait_confirmed(advanced_to):
                LOG.warning("the server has not applied the slot confirmation to %s yet", format_lsn(advanced_to))
            self._advanced()
        self._refresh_status()
        return CycleResult.of(transactions, advanced_to)

    def drain(self, *, max_cycles: int = 1_000_000) -> CycleResult:
        """Run :meth:`run_once` until the slot has nothing more; the totals."""
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

    def _read_until(self, target: int) -> list[DecodedTransaction]:
        """Transactions until the server has sent everything before ``target`` (or a batch is full)."""
        stream = self._started_stream()
        stream.confirm(stream.confirmed, request_reply=True)  # a keepalive tells how far it has sent
        batch = self._new_batch()
        decoder = self._decoder
        sent_to: int | None = None
        previous: int | None = None
        while True:
            message = stream.read(CAUGHT_UP_WAIT_SECONDS)
            if type(message) is bytes:
                if batch.add(message, decoder.feed(message)):
                    return batch.transactions
            elif isinstance(message, Keepalive):
                sent_to = message.wal_end
                if sent_to >= target and not decoder.in_transaction:
                    return batch.transactions
            elif not decoder.in_transaction and sent_to is not None and sent_to == previous:
                # Quiet, at a transaction boundary, and the server's position did not move:
                # it sent all it has (a flush position inside a WAL record is never reached).
                return batch.transactions
            else:
                previous = sent_to
                stream.confirm(stream.confirmed, request_reply=True)
