"""Monthly partitions of ``events``: made ahead of time, and archived without deleting.

``events`` is partitioned by RANGE (``recorded_at``) with one partition per UTC month,
``events_YYYY_MM`` (migration 0003). There is deliberately no DEFAULT partition: rows in
it would make creating their month's partition fail, and it hides a stopped maintenance.
So partitions are made ahead instead — by the bus at start and once a day
(:class:`PartitionKeeper`), by ``tagbus migrate`` and by ``tagbus maintain`` — and an
insert for a month without one fails loudly (the bus answers 503).

This is the one place outside the migrations that runs DDL: partitions come with time,
not with releases. It only ever creates partitions of the existing parent (which inherit
its indexes, and whose rows are published and RLS-filtered through it), detaches them and
moves them to the archive schema. Nothing here deletes a row.

Archived partitions are plain tables in schema ``archive``; they keep their rows and get
the analysts' read policies of the parent (RLS enabled, the tenant analyst sees only its
tenant), since a detached table no longer inherits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from kernel.schema import PARTITION_PREFIX

log = logging.getLogger("tagbus.partitions")

#: Partitions made ahead of the current month by default.
MONTHS_AHEAD = 3
ANALYST_ROLES = ("tagbus_analyst", "tagbus_tenant_analyst")
# Serializes concurrent makers (two buses starting at once); any constant unique to us.
_LOCK_KEY = 0x7461_6762_7573_0003
_NAME = re.compile(r"^events_(\d{4})_(\d{2})$")

_PARTITIONS = """
SELECT c.relname, i.inhdetachpending
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.inhparent = 'public.events'::regclass AND n.nspname = 'public'
"""
_STANDALONE = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname LIKE 'events\\_%' AND NOT c.relispartition
"""


class PartitionError(Exception):
    """Partition maintenance could not do what it was asked; nothing was deleted."""


@dataclass(frozen=True, order=True, slots=True)
class Month:
    """A UTC calendar month, the unit of partitioning."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not 1 <= self.month <= 12 or not 1 <= self.year <= 9999:
            raise ValueError(f"not a month: {self.year}-{self.month}")

    @classmethod
    def parse(cls, text: str) -> Month:
        """``YYYY-MM`` → a month; ``ValueError`` with a one-line reason otherwise."""
        match = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
        if match is None:
            raise ValueError(f"expected a month as YYYY-MM, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, moment: datetime) -> Month:
        moment = moment.astimezone(UTC)
        return cls(moment.year, moment.month)

    def plus(self, months: int) -> Month:
        index = self.year * 12 + self.month - 1 + months
        return Month(index // 12, index % 12 + 1)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def table(self) -> str:
        return f"{PARTITION_PREFIX}{self.year:04d}_{self.month:02d}"

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def _month_of_table(name: str) -> Month | None:
    match = _NAME.match(name)
    return Month(int(match[1]), int(match[2])) if match else None


def _now() -> datetime:
    return datetime.now(UTC)


def events_partitioned(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``public.events`` is the partitioned table of migration 0003 (or later)."""
    row = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('public.events')").fetchone()
    if not conn.autocommit:
        conn.rollback()
    return bool(row and row[0])


def ensure_partitions(
    conn: psycopg.Connection[Any], months_ahead: int = MONTHS_AHEAD, *, now: datetime | None = None
) -> list[str]:
    """Create the partitions of the current month and ``months_ahead`` after it if missing.

    Idempotent, and safe to run from several processes at once (an advisory lock
    serializes them). Returns the names of the partitions created now.
    """
    if months_ahead < 0:
        raise ValueError("months_ahead must be 0 or more")
    first = Month.of(now or _now())
    created: list[str] = []
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            attached = {name for name, _ in conn.execute(_PARTITIONS).fetchall()}
            for month in (first.plus(i) for i in range(months_ahead + 1)):
                if month.table in attached:
                    continue
                table = sql.Identifier("public", month.table)
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF public.events FOR VALUES FROM ({}) TO ({})").format(
                        table, sql.Literal(month.start), sql.Literal(month.plus(1).start)
                    )
                )
                # Defence in depth: were a partition ever granted to someone, RLS without a
                # policy still shows them nothing. Reads through the parent are unaffected.
                conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
                created.append(month.table)
    except psycopg.Error as e:
        raise PartitionError(f"cannot create partitions of events: {_reason(e)}") from e
    return created


def detach_before(
    conn: psycopg.Connection[Any], month: Month, archive_schema: str = "archive", *, now: datetime | None = None
) -> list[str]:
    """Move every partition of a month before ``month`` to ``archive_schema``; returns their names.

    Each is detached (``CONCURRENTLY`` when ``conn`` is in autocommit mode, so the bus
    keeps writing meanwhile), then moved and given the analysts' read grants and
    policies. Rows are never deleted. A partition left detached by an interrupted run is
    picked up by the next one. The current month cannot be archived.
    """
    current = Month.of(now or _now())
    if month > current:
        raise PartitionError(f"cannot archive {month} or later: {current} is the current month")
    try:
        partitions = conn.execute(_PARTITIONS).fetchall()
        leftovers = [row[0] for row in conn.execute(_STANDALONE).fetchall()]
        if not conn.autocommit:
            conn.commit()
    except psycopg.Error as e:
        raise PartitionError(f"cannot list partitions of events: {_reason(e)}") from e
    archived: list[str] = []
    for name, pending in sorted(partitions):
        old = _month_of_table(name)
        if old is None or old >= month:
            continue
        _detach(conn, name, finalize=pending)
        _archive(conn, name, archive_schema)
        archived.append(name)
    for name in sorted(leftovers):
        old = _month_of_table(name)
        if old is not None and old < month:
            _archive(conn, name, archive_schema)
            archived.append(name)
    return archived


def _detach(conn: psycopg.Connection[Any], name: str, *, finalize: bool) -> None:
    table = sql.Identifier("public", name)
    if finalize:
        statement = sql.SQL("ALTER TABLE public.events DETACH PARTITION {} FINALIZE")
    elif conn.autocommit:
        # Waits for transactions that might still see the partition instead of locking
        # out the bus's inserts; not possible inside a transaction block.
        statement = sql.SQL("ALTER TABLE public.events DETACH PARTITION {} CONCURRENTLY")
    else:
        statement = sql.SQL("ALTER TABLE public.events DETACH PARTITION {}")
    try:
        conn.execute(statement.format(table))
        if not conn.autocommit:
            conn.commit()
    except psycopg.Error as e:
        if not conn.autocommit:
            conn.rollback()
        raise PartitionError(f"cannot detach {name}: {_reason(e)}") from e


def _archive(conn: psycopg.Connection[Any], name: str, schema: str) -> None:
    table = sql.Identifier(schema, name)
    roles = sql.SQL(", ").join(sql.Identifier(r) for r in ANALYST_ROLES)
    statements = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), roles),
        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(sql.Identifier("public", name), sql.Identifier(schema)),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table),
        sql.SQL("CREATE POLICY analyst_read ON {} FOR SELECT TO tagbus_analyst USING (true)").format(table),
        sql.SQL(
            "CREATE POLICY tenant_analyst_read ON {} FOR SELECT TO tagbus_tenant_analyst"
            " USING (tenant_id = current_setting('tagbus.tenant', true))"
        ).format(table),
        sql.SQL("GRANT SELECT ON {} TO {}").format(table, roles),
    ]
    try:
        with conn.transaction():
            for statement in statements:
                conn.execute(statement)
        if not conn.autocommit:
            conn.commit()
    except psycopg.Error as e:
        raise PartitionError(f"cannot move {name} to schema {schema}: {_reason(e)}") from e


def _reason(error: psycopg.Error) -> str:
    return (error.diag.message_primary or type(error).__name__).strip()


def ensure_partitions_at(database_url: str, months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """:func:`ensure_partitions` on a connection of its own."""
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            return ensure_partitions(conn, months_ahead)
    except psycopg.OperationalError as e:
        raise PartitionError(f"cannot connect to create partitions: {_reason(e)}") from e


class PartitionKeeper:
    """Keeps partitions made ahead from inside a long-running process (the bus).

    :meth:`start` makes them once before returning, then again every ``interval``
    seconds (sooner, ``retry`` seconds, after a failure). Failures are logged, never
    raised: the bus keeps serving on the partitions made ahead.
    """

    def __init__(
        self,
        database_url: str,
        *,
        months_ahead: int = MONTHS_AHEAD,
        interval: float = 86_400.0,
        retry: float = 600.0,
    ) -> None:
        self._url = database_url
        self._months_ahead = months_ahead
        self._interval = interval
        self._retry = retry
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> bool:
        try:
            created = await asyncio.to_thread(ensure_partitions_at, self._url, self._months_ahead)
        except PartitionError as e:
            log.warning("partition maintenance failed: %s", e)
            return False
        if created:
            log.info("created partitions of events: %s", ", ".join(created))
        return True

    async def start(self) -> None:
        ok = await self.run_once()
        self._task = asyncio.create_task(self._loop(ok), name="partition-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self, ok: bool) -> None:
        while True:
            await asyncio.sleep(self._interval if ok else self._retry)
            ok = await self.run_once()
