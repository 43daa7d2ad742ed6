"""The slot's changes over the streaming replication protocol: one decoding session, pushed.

Why not only the SQL functions (``pg_logical_slot_peek_binary_changes`` then
``pg_replication_slot_advance``)? Each of those calls is a new decoding session that
starts at the slot's ``restart_lsn``, which only moves when decoding passes an
``xl_running_xacts`` record (the background writer logs one every 15 s, or less often
when idle). Every peek and every advance therefore re-decodes everything between
``restart_lsn`` and ``confirmed_flush_lsn`` again: a 200,000-event backlog written in one
go costs a quadratic amount of server decoding, and at a steady 1,000 events/s each peek
re-reads up to 15 s of WAL. ``START_REPLICATION … LOGICAL`` keeps one decoding session
for the life of the connection, the server pushes each transaction as it commits (no
poll interval), and the slot advances through standby status updates that carry the
LSN Kinesis acknowledged — the same guarantee as ``pg_replication_slot_advance``.

psycopg 3 has no replication API, so this drives libpq's copy-both mode through
``psycopg.pq`` (the CopyData framing below, from "Streaming Replication Protocol" in the
PostgreSQL docs). Driver errors become :class:`DatabaseUnavailableError` here.
"""

from __future__ import annotations

import contextlib
import select
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from tailer.errors import DatabaseUnavailableError, SlotBusyError, SlotConfigurationError, SlotLostError
from tailer.pgoutput import parse_lsn

#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), for status updates.
_PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000
_XLOG_DATA = struct.Struct(">QQq")  # after 'w': WAL start, WAL end, send time
_KEEPALIVE = struct.Struct(">QqB")  # after 'k': WAL end, send time, reply requested
_STATUS_UPDATE = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, client time, reply requested
_XLOG_HEADER: Final = 1 + _XLOG_DATA.size
_OBJECT_IN_USE: Final = "55006"
_UNDEFINED_OBJECT: Final = "42704"
#: START_REPLICATION on an invalidated slot (and on a few misconfigurations, which the
#: tailer tells apart through ``pg_replication_slots``).
_NOT_IN_PREREQUISITE_STATE: Final = "55000"
_DUPLICATE_OBJECT: Final = "42710"


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The server's position: everything it decoded before ``wal_end`` has been sent."""

    wal_end: int


class ReplicationStream:
    """A logical replication connection reading one slot with pgoutput.

    :meth:`read` returns each pgoutput message (``bytes``) and each server keepalive
    (:class:`Keepalive`); :meth:`confirm` reports the LSN up to which the slot may be
    released. Nothing is confirmed implicitly: a connection that dies resumes at the
    last confirmed LSN, so unacknowledged events are sent again.
    """

    def __init__(
        self,
        database_url: str,
        slot_name: str,
        publication: str,
        *,
        connect_timeout: int = 10,
        application_name: str = "tagbus-tailer",
        wal_sender_timeout_ms: int | None = None,
    ) -> None:
        self.slot_name = slot_name
        self._conninfo = make_conninfo(
            database_url,
            replication="database",
            connect_timeout=connect_timeout,
            application_name=application_name,
            # pgoutput renders text values with the walsender's settings: pin them so
            # timestamps parse the same on every server.
            options="-c DateStyle=ISO -c TimeZone=UTC"
            + (f" -c wal_sender_timeout={int(wal_sender_timeout_ms)}" if wal_sender_timeout_ms is not None else ""),
        )
        self._command = (
            sql.SQL("START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')")
            .format(sql.Identifier(slot_name), sql.Literal(_quote_identifier(publication)))
            .as_bytes(None)
        )
        self._pgconn: pq.abc.PGconn | None = None
        self._confirmed = 0

    @property
    def started(self) -> bool:
        return self._pgconn is not None

    def start(self) -> None:
        """Connect and enter copy-both mode at the slot's confirmed position (no-op when started)."""
        if self._pgconn is not None:
            return
        pgconn = pq.PGconn.connect(self._conninfo.encode())
        try:
            if pgconn.status != pq.ConnStatus.OK:
                raise DatabaseUnavailableError(_message(pgconn, "cannot open a replication connection"))
            pgconn.send_query(self._command)
            result = pgconn.get_result()
            if result is None or result.status != pq.ExecStatus.COPY_BOTH:
                state = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
                detail = _message(pgconn, "START_REPLICATION failed")
                if state == _OBJECT_IN_USE.encode():
                    raise SlotBusyError(detail)
                if state in (_UNDEFINED_OBJECT.encode(), _NOT_IN_PREREQUISITE_STATE.encode()):
                    raise SlotLostError(detail)
                raise DatabaseUnavailableError(detail)
        except BaseException:
            pgconn.finish()
            raise
        self._pgconn = pgconn
        self._confirmed = 0

    def close(self) -> None:
        if self._pgconn is not None:
            self._pgconn.finish()
            self._pgconn = None

    def read(self, timeout: float) -> bytes | Keepalive | None:
        """The next message: a pgoutput message (``bytes``) or a :class:`Keepalive`; ``None`` when
        nothing arrived within ``timeout`` seconds (``0`` only takes what is already received)."""
        pgconn = self._connected()
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.OperationalError as exc:
                self.close()
                raise DatabaseUnavailableError(str(exc).strip()) from exc
            if nbytes > 0:
                kind = data[0]
                if kind == 0x77:  # 'w': XLogData wrapping one pgoutput message
                    return bytes(data[_XLOG_HEADER:])
                if kind == 0x6B:  # 'k': primary keepalive
                    wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
                    if reply:
                        self._send_status(self._confirmed, reply=False)
                    return Keepalive(wal_end)
                continue
            if nbytes == 0:
                if not self._wait_readable(pgconn, timeout):
                    return None
                continue
            # -1: the copy ended (the server closed the stream, e.g. it is shutting down).
            self.close()
            raise DatabaseUnavailableError("the replication stream ended")

    @contextlib.contextmanager
    def kept_alive(self, interval: float = 1.0) -> Iterator[None]:
        """Send status updates every ``interval`` seconds from a helper thread while the body runs.

        The server drops a replication connection that stays silent for
        ``wal_sender_timeout`` (60 s by default), and a publish to a throttled or slow
        Kinesis can take longer than that. The body must not use this stream meanwhile
        (libpq connections are not shared between threads).
        """
        if self._pgconn is None:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                self.keep_alive()

        thread = threading.Thread(target=beat, name="tagbus-tailer-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def keep_alive(self) -> None:
        """A status update with the last confirmed LSN, so a long publish does not hit
        ``wal_sender_timeout``; errors are left for the next read or confirmation to raise."""
        if self._pgconn is not None:
            with contextlib.suppress(DatabaseUnavailableError):
                self._send_status(self._confirmed, reply=False)

    def confirm(self, lsn: int, *, request_reply: bool = False) -> None:
        """Tell the server the slot may move to ``lsn``: every change before it is acknowledged."""
        self._confirmed = max(self._confirmed, lsn)
        self._send_status(self._confirmed, reply=request_reply)

    @property
    def confirmed(self) -> int:
        return self._confirmed

    def _send_status(self, lsn: int, *, reply: bool) -> None:
        pgconn = self._connected()
        now_us = int(time.time() * 1_000_000) - _PG_EPOCH_OFFSET_US
        message = _STATUS_UPDATE.pack(b"r", lsn, lsn, lsn, now_us, 1 if reply else 0)
        try:
            pgconn.put_copy_data(message)
            while pgconn.flush() == 1:
                select.select([], [pgconn.socket], [], 1.0)
        except psycopg.OperationalError as exc:
            self.close()
            raise DatabaseUnavailableError(str(exc).strip()) from exc

    def _wait_readable(self, pgconn: pq.abc.PGconn, timeout: float) -> bool:
        try:
            readable, _, _ = select.select([pgconn.socket], [], [], timeout)
            if not readable:
                return False
            pgconn.consume_input()
        except (OSError, psycopg.OperationalError) as exc:
            self.close()
            raise DatabaseUnavailableError(str(exc).strip() or "replication connection lost") from exc
        return True

    def _connected(self) -> pq.abc.PGconn:
        if self._pgconn is None:
            raise DatabaseUnavailableError("the replication stream is not started")
        return self._pgconn


@contextlib.contextmanager
def exported_slot(database_url: str, slot_name: str, *, connect_timeout: int = 10) -> Iterator[tuple[int, str]]:
    """Create logical slot ``slot_name`` (pgoutput) and export the snapshot it starts at.

    Yields the slot's consistent point and the snapshot's name. A transaction that imports
    the snapshot (``SET TRANSACTION SNAPSHOT``) while the body runs sees exactly the
    transactions that committed before the slot's first change: together, the snapshot and
    the slot cover every commit once. ``CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`` exists
    only on a replication connection, and the snapshot lives until that connection runs
    another command or closes — on leaving the body.
    """
    conninfo = make_conninfo(database_url, replication="database", connect_timeout=connect_timeout)
    pgconn = pq.PGconn.connect(conninfo.encode())
    try:
        if pgconn.status != pq.ConnStatus.OK:
            raise DatabaseUnavailableError(_message(pgconn, "cannot open a replication connection"))
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
            sql.Identifier(slot_name)
        )
        pgconn.send_query(command.as_bytes(None))
        result = pgconn.get_result()
        while pgconn.get_result() is not None:
            pass
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            state = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
            detail = _message(pgconn, "CREATE_REPLICATION_SLOT failed")
            if state == _DUPLICATE_OBJECT.encode():
                # Made by someone else since the tailer dropped it: the recovery starts over.
                raise SlotBusyError(detail)
            if state == _NOT_IN_PREREQUISITE_STATE.encode():
                raise SlotConfigurationError(detail)
            raise DatabaseUnavailableError(detail)
        values = [result.get_value(0, column) for column in range(result.nfields)]
        consistent_point, snapshot = values[1], values[2]
        if consistent_point is None or snapshot is None:
            raise DatabaseUnavailableError("CREATE_REPLICATION_SLOT returned no consistent point or snapshot")
        yield parse_lsn(consistent_point.decode()), snapshot.decode()
    finally:
        pgconn.finish()


def _quote_identifier(name: str) -> str:
    # publication_names is parsed as a list of identifiers: quote to keep case and commas.
    return '"' + name.replace('"', '""') + '"'


def _message(pgconn: pq.abc.PGconn, fallback: str) -> str:
    text = pgconn.error_message.decode(errors="replace").strip()
    return text or fallback
