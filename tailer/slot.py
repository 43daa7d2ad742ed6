"""The replication slot through SQL functions, the single-tailer advisory lock, and database URL helpers."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tailer.decoder import HEARTBEAT_PREFIX
from tailer.errors import (
    DatabaseUnavailableError,
    LockUnavailableError,
    SlotBusyError,
    SlotConfigurationError,
)
from tailer.pgoutput import format_lsn, parse_lsn

#: Advisory lock key of the active tailer ("tagbus" in ASCII); advisory locks are per database.
ADVISORY_LOCK_KEY: Final = 0x746167627573


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A replication slot's health, for metrics and ``tagbus status``."""

    slot_name: str
    active: bool
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    #: WAL bytes the slot holds back: current WAL LSN minus confirmed_flush_lsn.
    lag_bytes: int
    #: ``reserved`` / ``extended`` / ``unreserved`` / ``lost`` (see max_slot_wal_keep_size).
    wal_status: str | None
    safe_wal_size: int | None
    #: The oldest transaction id whose changes the slot may still decode: every transaction
    #: that commits after ``confirmed_flush_lsn`` has an id at or after it (kept when the slot
    #: is invalidated; the recovery of a lost slot republishes from it).
    catalog_xmin: int | None = None


def slot_status(conn: psycopg.Connection[Any], slot: str) -> SlotStatus | None:
    """Status of ``slot`` on ``conn``'s server, or ``None`` when the slot does not exist."""
    row = conn.execute(
        """
        SELECT active, confirmed_flush_lsn::text, restart_lsn::text,
               COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
               wal_status, safe_wal_size, catalog_xmin::text
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    active, confirmed, restart, lag, wal_status, safe_wal_size, catalog_xmin = row
    return SlotStatus(
        slot_name=slot,
        active=bool(active),
        confirmed_flush_lsn=parse_lsn(confirmed) if confirmed else None,
        restart_lsn=parse_lsn(restart) if restart else None,
        lag_bytes=int(lag),
        wal_status=wal_status,
        safe_wal_size=int(safe_wal_size) if safe_wal_size is not None else None,
        catalog_xmin=int(catalog_xmin) if catalog_xmin is not None else None,
    )


def mask_database_url(url: str) -> str:
    """The URL or conninfo string with any password replaced by ``***``, safe to log."""
    if "://" in url:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
        query = "&".join(
            "password=***" if pair.lower().startswith("password=") else pair for pair in parts.query.split("&") if pair
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable conninfo>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style ``postgresql+psycopg://`` URLs as well as libpq ones."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.startswith("postgresql+"):
        return f"postgresql://{rest}"
    return url


class _DriverErrors:
    """Translates psycopg errors at the database boundary."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, psycopg.errors.ObjectInUse):
            raise SlotBusyError(str(exc).strip()) from exc
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            raise DatabaseUnavailableError(str(exc).strip()) from exc


_translate = _DriverErrors()


class SlotReader:
    """The replication slot through SQL functions, on its own autocommit session."""

    def __init__(self, database_url: str, slot_name: str, publication: str, *, connect_timeout: int = 10) -> None:
        self._url = database_url
        self.slot_name = slot_name
        self._publication = publication
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            with _translate:
                conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="tagbus-tailer",
                )
                # pgoutput renders text values with the decoding session's settings:
                # pin them so timestamps parse the same on every server.
                conn.execute("SET DateStyle = 'ISO'")
                conn.execute("SET TimeZone = 'UTC'")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ensure_slot(self) -> bool:
        """Create the slot (pgoutput) if missing; ``True`` when it was created now."""
        conn = self.connection
        with _translate:
            row = conn.execute(
                "SELECT plugin, database = current_database() FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            ).fetchone()
            if row is not None:
                plugin, same_database = row
                if plugin != "pgoutput" or not same_database:
                    raise SlotConfigurationError(
                        f"slot {self.slot_name!r} exists with plugin {plugin!r} or in another database"
                    )
                return False
            try:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot_name,))
            except psycopg.errors.DuplicateObject:
                return False
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                raise SlotConfigurationError(f"cannot create slot {self.slot_name!r}: {exc}".strip()) from exc
            return True

    def drop_slot(self, name: str) -> None:
        """Drop replication slot ``name`` if it exists (:class:`SlotBusyError` while a session uses it)."""
        with _translate, contextlib.suppress(psycopg.errors.UndefinedObject):
            self.connection.execute("SELECT pg_drop_replication_slot(%s)", (name,))

    def create_marker(self, name: str) -> None:
        """Create physical slot ``name`` reserving no WAL: a durable name and nothing else."""
        with _translate, contextlib.suppress(psycopg.errors.DuplicateObject):
            self.connection.execute("SELECT pg_create_physical_replication_slot(%s, false, false)", (name,))

    def markers(self, prefix: str) -> list[str]:
        """Names of the marker slots (physical, holding no WAL) whose names start with ``prefix``."""
        with _translate:
            rows = self.connection.execute(
                """
                SELECT slot_name::text FROM pg_replication_slots
                WHERE slot_type = 'physical' AND restart_lsn IS NULL AND starts_with(slot_name::text, %s)
                """,
                (prefix,),
            ).fetchall()
        return [row[0] for row in rows]

    def peek(self, max_changes: int) -> list[bytes]:
        """Whole transactions after confirmed_flush_lsn, at least ``max_changes`` messages if available.

        For benchmarks and tests (the slot does not move); the tailer streams the slot instead
        (:mod:`tailer.stream` says why). Each call is a fresh decoding session from the slot's
        restart_lsn; the server checks the change limit only at commits, so a transaction is
        never cut in two.
        """
        with _translate:
            cursor = self.connection.execute(
                """
                SELECT data FROM pg_logical_slot_peek_binary_changes(
                    %s::name, NULL, %s::int,
                    'proto_version', '1', 'publication_names', %s::text, 'messages', 'true')
                """,
                (self.slot_name, max_changes, _quote_identifier(self._publication)),
                binary=True,
            )
            return [row[0] for row in cursor.fetchall()]

    def emit_heartbeat(self) -> None:
        """Commit a transaction holding only a heartbeat message, which the slot can advance past."""
        with _translate:
            self.connection.execute("SELECT pg_logical_emit_message(true, %s::text, ''::text)", (HEARTBEAT_PREFIX,))

    def flushed_lsn(self) -> int:
        """The server's WAL flush position: every transaction committed so far ends at or before it."""
        with _translate:
            row = self.connection.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(row[0])

    def wait_confirmed(self, lsn: int, *, timeout: float = 5.0) -> bool:
        """Wait until the slot's confirmed_flush_lsn reached ``lsn`` (a replication stream's
        status update is applied by its walsender asynchronously); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            with _translate:
                row = self.connection.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (format_lsn(lsn), self.slot_name),
                ).fetchone()
            if row is not None and row[0]:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def status(self) -> SlotStatus | None:
        with _translate:
            return slot_status(self.connection, self.slot_name)


def _quote_identifier(name: str) -> str:
    # publication_names is parsed as a list of identifiers: quote to keep case and commas.
    return '"' + name.replace('"', '""') + '"'


class TailerLock:
    """The single-active-tailer lock: a session-level advisory lock on a dedicated session."""

    def __init__(self, database_url: str, *, key: int = ADVISORY_LOCK_KEY, connect_timeout: int = 10) -> None:
        self._url = database_url
        self._key = key
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False

    def try_acquire(self) -> bool:
        if self.held:
            return True
        with _translate:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="tagbus-tailer-lock",
                )
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        self.held = bool(row and row[0])
        return self.held

    def check(self) -> None:
        """Raise :class:`DatabaseUnavailableError` if the lock's session is gone (the lock with it)."""
        if not self.held or self._conn is None:
            raise LockUnavailableError("the tailer lock is not held")
        try:
            with _translate:
                self._conn.execute("SELECT 1")
        except DatabaseUnavailableError:
            self.release()
            raise

    def release(self) -> None:
        """Drop the session, which frees the lock."""
        self.held = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
