"""Read-only SQL for analysts (``tagbus query``): a sandboxed session, then table, CSV or JSON output.

The session runs as one of the group roles of migration 0002 — ``tagbus_analyst``, or
``tagbus_tenant_analyst`` with ``tagbus.tenant`` set — inside a ``READ ONLY`` transaction
with a statement timeout, and is always rolled back.

``SET ROLE`` alone is no sandbox when the login is a superuser (as the local stack's
``tagbus`` role is): the query text could ``RESET ROLE``, or call
``set_config('role', …)`` inside a SELECT, and read server files. So when the configured
login could escape (superuser, BYPASSRLS, or owner of ``events``), the query runs under a
throwaway LOGIN role instead: created here with a random password (sent as a SCRAM
verifier, never in clear), a one-hour expiry, membership in the one group it needs, and
dropped afterwards. Otherwise — a person's own login granted into a group, given as
``TAGBUS_ANALYST_DATABASE_URL`` — the query runs under that login directly.

The text runs through the extended query protocol, which rejects more than one statement,
and rows are streamed so at most ``limit`` of them are ever held.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import io
import secrets
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.table import Table

from tagbus.settings import Settings
from tailer import libpq_url

ANALYST_ROLE = "tagbus_analyst"
TENANT_ANALYST_ROLE = "tagbus_tenant_analyst"
#: Environment variable with a login of one's own (granted into an analyst group) for ``tagbus query``.
ANALYST_URL_ENV = "TAGBUS_ANALYST_DATABASE_URL"
_EPHEMERAL_PREFIX = "tagbus_query_"
_EPHEMERAL_LIFETIME = dt.timedelta(hours=1)
_READ_ONLY_SQLSTATES = frozenset({"25006", "42501"})  # read_only_sql_transaction, insufficient_privilege


class QueryError(Exception):
    """A query failed; ``str()`` is one line: PostgreSQL's message and its SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        self.message = message
        self.sqlstate = sqlstate
        super().__init__(f"{message} (SQLSTATE {sqlstate})" if sqlstate else message)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Column names and at most ``limit`` rows; ``truncated`` when the query had more."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool = False


def run_query(
    settings: Settings,
    sql_text: str,
    *,
    tenant: str | None,
    limit: int,
    statement_timeout: float = 30.0,
    database_url: str | None = None,
) -> QueryResult:
    """Run one read-only statement as an analyst role and return at most ``limit`` rows.

    ``tenant`` switches to the tenant-scoped role with ``tagbus.tenant`` set to it. The
    login is ``database_url``, else ``TAGBUS_ANALYST_DATABASE_URL``, else the bus's own URL.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if tenant is not None and not tenant:
        raise ValueError("tenant must not be empty")
    if not sql_text.strip():
        raise QueryError("empty query")
    url = libpq_url(database_url or settings.environ.get(ANALYST_URL_ENV) or settings.database_url)
    group = ANALYST_ROLE if tenant is None else TENANT_ANALYST_ROLE
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="tagbus-query") as login:
            if not _can_escape(login):
                return _run(login, sql_text, group=group, tenant=tenant, limit=limit, timeout=statement_timeout)
            with _ephemeral_login(login, url, group) as sandbox_url, _connect(sandbox_url) as sandbox:
                return _run(sandbox, sql_text, group=group, tenant=tenant, limit=limit, timeout=statement_timeout)
    except psycopg.Error as e:
        raise _query_error(e) from e


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, connect_timeout=10, application_name="tagbus-query")


def _can_escape(conn: psycopg.Connection[Any]) -> bool:
    """Whether the session user could get out of a SET ROLE sandbox to more than an analyst sees."""
    row = conn.execute(
        """
        SELECT r.rolsuper OR r.rolbypassrls
               OR pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = 'events'::regclass), 'USAGE')
        FROM pg_roles r WHERE r.rolname = session_user
        """
    ).fetchone()
    return bool(row and row[0])


@contextlib.contextmanager
def _ephemeral_login(admin: psycopg.Connection[Any], url: str, group: str) -> Iterator[str]:
    """A throwaway LOGIN role inside ``group`` (URL yielded), dropped on exit."""
    allowed = admin.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (allowed and allowed[0]):
        raise QueryError(
            f"this login is privileged but cannot create roles: set {ANALYST_URL_ENV} to a login "
            f"granted {ANALYST_ROLE} or {TENANT_ANALYST_ROLE}"
        )
    _drop_expired_logins(admin)
    name = _EPHEMERAL_PREFIX + uuid.uuid4().hex[:16]
    password = secrets.token_urlsafe(32)
    verifier = admin.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
    expires = (dt.datetime.now(dt.UTC) + _EPHEMERAL_LIFETIME).isoformat()
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1 PASSWORD {} VALID UNTIL {} IN ROLE {}").format(
            sql.Identifier(name), sql.Literal(verifier), sql.Literal(expires), sql.Identifier(group)
        )
    )
    try:
        params = conninfo_to_dict(url)
        params.update(user=name, password=password)
        yield make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})
    finally:
        _drop_login(admin, name)


def _drop_login(admin: psycopg.Connection[Any], name: str) -> None:
    # The backend that used the role may still be removing its temporary objects.
    for _ in range(20):
        try:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            return
        except psycopg.errors.DependentObjectsStillExist:
            time.sleep(0.05)
    # Left behind: it expires within the hour and the next run drops it.


def _drop_expired_logins(admin: psycopg.Connection[Any]) -> None:
    stale = admin.execute(
        "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s) AND rolvaliduntil < now()",
        (_EPHEMERAL_PREFIX,),
    ).fetchall()
    for (name,) in stale:
        with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _run(
    conn: psycopg.Connection[Any], sql_text: str, *, group: str, tenant: str | None, limit: int, timeout: float
) -> QueryResult:
    conn.autocommit = False
    conn.read_only = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(group)))
            cur.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout * 1000)}ms",))
            if tenant is not None:
                cur.execute("SELECT set_config('tagbus.tenant', %s, true)", (tenant,))
            rows: list[tuple[Any, ...]] = []
            truncated = False
            # stream() always uses the extended protocol (one statement only) and single-row mode.
            with contextlib.closing(cast("Generator[Any, None, None]", cur.stream(sql_text.encode()))) as stream:
                for row in stream:
                    if len(rows) == limit:
                        truncated = True
                        break
                    rows.append(tuple(row))
            columns = tuple(col.name for col in cur.description or ())
        return QueryResult(columns=columns, rows=tuple(rows), truncated=truncated)
    finally:
        conn.rollback()


def _query_error(e: psycopg.Error) -> QueryError:
    sqlstate = e.sqlstate
    message = (e.diag.message_primary if e.diag else None) or str(e) or type(e).__name__
    message = " ".join(message.split())
    if sqlstate in _READ_ONLY_SQLSTATES:
        message += " — tagbus query is read-only"
    return QueryError(message, sqlstate)


# ------------------------------------------------------------------ output


def _text(value: Any) -> str:
    """One cell as text: NULL is empty, JSON values are JSON, times are ISO 8601."""
    if value is None:
        return ""
    if isinstance(value, dict | list | bool):
        return orjson.dumps(value).decode()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def render_table(result: QueryResult, *, title: str | None = None) -> Table:
    """A rich table of the result; NULLs are dimmed."""
    caption = f"{len(result.rows)} row(s)" + (" (truncated: raise --limit)" if result.truncated else "")
    table = Table(*result.columns, title=title, caption=caption)
    for row in result.rows:
        table.add_row(*("[dim]null[/dim]" if v is None else _escape(_text(v)) for v in row))
    return table


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def to_csv(result: QueryResult) -> str:
    """RFC 4180 CSV with a header row; NULL is an empty field, JSON values are JSON text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([_text(v) for v in row] for row in result.rows)
    return buffer.getvalue()


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def to_json(result: QueryResult) -> bytes:
    """A JSON array with one object per row (column → value); JSON columns stay JSON."""
    return orjson.dumps(rows_as_dicts(result), default=_json_default)


def rows_as_dicts(result: QueryResult) -> Sequence[dict[str, Any]]:
    """Rows keyed by column name (a later duplicate column name wins)."""
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]
