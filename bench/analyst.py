"""Analyst benchmark: the README's example queries over a large partitioned events table,
and what partitioning costs the bus's write path — both measured in one run.

1. Load 5,000,000 events (``--quick``: 200,000) of 200 tenants spread evenly over the last
   12 months into a database at head (monthly partitions), set-based (``INSERT … SELECT
   generate_series``, one statement per month), then ``ANALYZE``.
2. Time each example query of the README's analyst section: p50/p99 over several runs, run
   as the analyst role the README uses for it (tenant-scoped ones as
   ``tagbus_tenant_analyst`` with ``tagbus.tenant`` set, so RLS is in the measured path);
   one ``EXPLAIN ANALYZE`` per query counts the partitions actually scanned.
3. Ingest before vs after partitioning: the store's set-based write (one look-up of
   existing ids, ``write_new``: one streams upsert and one events insert, one commit per
   64-event group) from 64 concurrent tasks into a database at revision 0002 and one at
   head, alternated twice; events/s of each and the ratio (target: ≤ 10% cost).

It runs on a throwaway cluster unless ``--database-url`` names another server than the
local stack's: loading millions of rows on the stack's cluster would make the tailer's
slot decode through all of that WAL. Reports: ``reports/bench-analyst.md`` and ``.json``.

Usage: ``python -m bench --only analyst [--quick]`` or ``python -m bench.analyst [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_dumps

from bench import REPO_ROOT, BenchOptions, percentile

TENANTS = 200
STREAMS_PER_TENANT = 125
CONFIG_STREAMS = 20  # of each tenant's streams, the first ones are config keys
MONTHS = 12
GROUP = 64
TASKS = 64

# One month of generated events, set-based. Event g belongs to tenant g % 200; its j-th
# event (j = g / 200) goes to stream j % 125 with version j / 125 + 1, and recorded_at
# grows with g, so each stream's versions grow with time as the bus would write them.
LOAD_MONTH = """
INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                    recorded_at, data, metadata, digest)
SELECT 'e-' || g,
       'tenant-' || lpad((g %% 200)::text, 3, '0'),
       CASE WHEN s < 20 THEN 'tenantconfig:limits/k' || s ELSE 'order-' || s END,
       (g / 200) / 125 + 1,
       CASE WHEN s < 20 THEN 'config.set' ELSE (ARRAY['order.created', 'order.paid', 'order.shipped'])[g %% 3 + 1] END,
       '/bench/analyst',
       NULL,
       at - ((g %% 97) * interval '1 millisecond'),
       at,
       CASE WHEN s < 20 THEN jsonb_build_object('key', 'tenantconfig:limits/k' || s, 'value', g %% 1000)
            ELSE jsonb_build_object('amount', g %% 500, 'currency', 'EUR') END,
       jsonb_build_object('sub', 'svc-' || (g %% 7)),
       md5(g::text)
FROM (
    SELECT g, ((g / 200) %% 125) AS s,
           %(start)s::timestamptz + (g::float8 / %(total)s) * (%(span)s::interval) AS at
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
) AS rows
"""


@dataclass(frozen=True, slots=True)
class Query:
    """One README example: name, SQL, and the role/tenant it runs as."""

    name: str
    text: str
    tenant: str | None = None


QUERIES = (
    Query(
        "types in the last hour",
        "SELECT type, count(*) FROM events WHERE recorded_at > now() - interval '1 hour' GROUP BY 1",
    ),
    Query(
        "events by day and type, last 7 days",
        "SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, type, count(*) FROM events"
        " WHERE recorded_at >= now() - interval '7 days' GROUP BY 1, 2 ORDER BY 1, 3 DESC",
    ),
    Query(
        "one tenant's last month by type",
        "SELECT type, count(*) FROM events WHERE recorded_at >= date_trunc('month', now()) - interval '1 month'"
        " AND recorded_at < date_trunc('month', now()) GROUP BY 1",
        tenant="tenant-042",
    ),
    Query(
        "a stream's history (stream_history)",
        "SELECT version, type, recorded_at, data FROM stream_history WHERE stream_id = 'order-42' ORDER BY version",
        tenant="tenant-042",
    ),
    Query(
        "a config key's changes (config_changes)",
        "SELECT key, version, old_value, new_value, who, changed_at FROM config_changes"
        " WHERE key = 'tenantconfig:limits/k7' ORDER BY version",
        tenant="tenant-042",
    ),
    Query(
        "worst ingest latency, all history (ingest_latency)",
        "SELECT tenant_id, day, p50_ms, p99_ms FROM ingest_latency ORDER BY p99_ms DESC LIMIT 10",
    ),
)


@dataclass(slots=True)
class QueryResult:
    name: str
    sql: str
    role: str
    runs: int
    rows: int
    p50_ms: float
    p99_ms: float
    partitions_scanned: int
    partitions_total: int


@dataclass(slots=True)
class IngestResult:
    name: str
    revision: str
    events: int
    seconds: float
    rate: float


@dataclass(slots=True)
class Report:
    started_at: str
    quick: bool
    command: str
    postgres: dict[str, str]
    machine: dict[str, Any]
    events_loaded: int
    load_seconds: float
    table_size: str
    queries: list[QueryResult] = field(default_factory=list)
    ingest: list[IngestResult] = field(default_factory=list)
    ingest_ratio: float = float("nan")
    #: One connection, groups in turns: p50/p99 ms per 64-event group and commit, by revision.
    sequential: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- servers and databases


@contextlib.contextmanager
def server(explicit: str | None) -> Iterator[str]:
    """Admin URL of the server to use: ``explicit`` unless it is the local stack's, else a throwaway cluster."""
    from bench.__main__ import STACK_URL
    from devtools.postgres_cluster import TemporaryCluster

    if explicit and explicit != STACK_URL:
        yield explicit
        return
    cluster = TemporaryCluster.start()
    try:
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            # Room for the load, and durable commits for the ingest part (as bench.ingest).
            conn.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
            conn.execute("ALTER SYSTEM SET shared_buffers = '512MB'")
            conn.execute("ALTER SYSTEM SET work_mem = '32MB'")
            conn.execute("ALTER SYSTEM SET maintenance_work_mem = '256MB'")
        cluster._run(
            "pg_ctl", "-D", str(cluster.datadir), "-l", str(cluster.root / "server.log"), "-w", "-t", "60", "restart"
        )
        yield cluster.url
    finally:
        cluster.stop()


def set_durable(server_url: str, durable: bool) -> None:
    value = "on" if durable else "off"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET fsync = {}").format(sql.Literal(value)))
        conn.execute(sql.SQL("ALTER SYSTEM SET full_page_writes = {}").format(sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")


def database_at(server_url: str, name: str, revision: str) -> str:
    """A new database ``name`` migrated to ``revision``."""
    from alembic import command
    from alembic.config import Config

    from devtools.postgres_cluster import sqlalchemy_url, with_database

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server_url, name)
    cfg = Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url))
    command.upgrade(cfg, revision)
    return url


# --------------------------------------------------------------------------- load


def load(url: str, total: int, now: datetime) -> float:
    """``total`` events over the 12 months up to ``now``, one statement per month; seconds taken."""
    from event_bus.partitions import ensure_partitions

    start = now - timedelta(days=365)
    span = now - start
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_partitions(conn, MONTHS + 1, now=start)
        ensure_partitions(conn, 3, now=now)
        # Cut the series where each month starts, so every statement fills one partition.
        cuts = [0]
        month = datetime(start.year, start.month, 1, tzinfo=UTC)
        while True:
            month = (month + timedelta(days=32)).replace(day=1)
            if month >= now:
                break
            cuts.append(min(total, max(0, int((month - start) / span * total))))
        cuts.append(total)
        for first, end in itertools.pairwise(cuts):
            if end > first:
                conn.execute(
                    LOAD_MONTH, {"start": start, "total": total, "span": span, "first": first, "last": end - 1}
                )
                print(f"  loaded {end:,}/{total:,} events ({time.perf_counter() - started:.0f}s)", flush=True)
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute("VACUUM (ANALYZE) event_keys")
    return time.perf_counter() - started


# --------------------------------------------------------------------------- queries


def _scanned(plan: dict[str, Any], total: set[str]) -> set[str]:
    """Partitions of events a plan node tree actually read (executed at least once)."""
    found: set[str] = set()
    name = plan.get("Relation Name")
    if name in total and plan.get("Actual Loops", 0) > 0:
        found.add(name)
    for child in plan.get("Plans", ()):
        found |= _scanned(child, total)
    return found


def time_query(url: str, query: Query, runs: int) -> QueryResult:
    role = "tagbus_tenant_analyst" if query.tenant else "tagbus_analyst"
    with psycopg.connect(url, autocommit=True) as conn:
        partitions = {
            r[0] for r in conn.execute("SELECT relid::regclass::text FROM pg_partition_tree('events') WHERE isleaf")
        }
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if query.tenant:
            conn.execute("SELECT set_config('tagbus.tenant', %s, false)", (query.tenant,))
        statement = sql.SQL(query.text)  # type: ignore[arg-type]  # a constant of this module
        rows = len(conn.execute(statement).fetchall())  # warm-up
        latencies: list[float] = []
        budget = time.perf_counter() + 60  # a slow query gets fewer runs (at least 3)
        while len(latencies) < runs and (len(latencies) < 3 or time.perf_counter() < budget):
            t0 = time.perf_counter()
            conn.execute(statement).fetchall()
            latencies.append((time.perf_counter() - t0) * 1e3)
        [(plan,)] = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(statement)).fetchall()
    scanned = _scanned(plan[0]["Plan"], partitions)
    return QueryResult(
        query.name,
        query.text,
        role + (f" ({query.tenant})" if query.tenant else ""),
        len(latencies),
        rows,
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(scanned),
        len(partitions),
    )


# --------------------------------------------------------------------------- ingest before/after


FIND_EXISTING_0002 = (
    "SELECT e.tenant_id, e.event_id, e.stream_id, e.version, e.recorded_at, e.digest"
    " FROM unnest(%s::text[], %s::text[]) AS k(tenant_id, event_id)"
    " JOIN events e ON e.tenant_id = k.tenant_id AND e.event_id = k.event_id"
)


def _group(prefix: str, n: int) -> list[Any]:
    from event_bus.validation import NewEvent

    return [
        NewEvent(id=f"{prefix}-{n}-{i}", tenant=f"tenant-{i % 8}", stream=f"order-{prefix}-{(n * GROUP + i) % 512}",
                 type="order.created", source="/bench/ingest", subject=None, time=None,
                 data={"amount": i, "currency": "EUR", "note": "x" * 96}, metadata={"sub": "bench"},
                 expected_version=None, digest=hashlib.sha256(f"{prefix}-{n}-{i}".encode()).hexdigest())
        for i in range(GROUP)
    ]  # fmt: skip


async def _writer(url: str, prefix: str, deadline: float, partitioned: bool) -> int:
    """The store's set-based path: look up existing ids, then write_new, one commit per group."""
    from event_bus.store import find_existing, write_new

    written = 0
    conn = await psycopg.AsyncConnection.connect(url)
    set_json_dumps(orjson.dumps, context=conn)  # as the store's pool configures its connections
    try:
        n = 0
        while time.perf_counter() < deadline:
            events = _group(prefix, n)
            async with conn.transaction():
                if partitioned:
                    existing = await find_existing(conn, events)
                else:
                    cur = await conn.execute(FIND_EXISTING_0002, ([e.tenant for e in events], [e.id for e in events]))
                    existing = {(r[0], r[1]): r for r in await cur.fetchall()}
                assert not existing
                await write_new(conn, events)
            written += len(events)
            n += 1
    finally:
        await conn.close()
    return written


async def _ingest(url: str, seconds: float, partitioned: bool) -> tuple[int, float]:
    run = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    counts = await asyncio.gather(*(_writer(url, f"{run}-{t}", started + seconds, partitioned) for t in range(TASKS)))
    return sum(counts), time.perf_counter() - started


async def _interleaved(flat_url: str, part_url: str, groups: int) -> dict[str, list[float]]:
    """One connection per database; one 64-event group each in turn (order swapped every
    time), so machine noise falls on both alike: seconds per group, by revision."""
    from event_bus.store import find_existing, write_new

    conns = {}
    for revision, url in (("0002", flat_url), ("head", part_url)):
        conns[revision] = await psycopg.AsyncConnection.connect(url)
        set_json_dumps(orjson.dumps, context=conns[revision])
    times: dict[str, list[float]] = {"0002": [], "head": []}
    run = uuid.uuid4().hex[:8]
    try:
        for n in range(groups):
            for revision in ("0002", "head") if n % 2 == 0 else ("head", "0002"):
                conn = conns[revision]
                events = _group(f"seq-{run}", n)
                t0 = time.perf_counter()
                async with conn.transaction():
                    if revision == "head":
                        await find_existing(conn, events)
                    else:
                        ids = ([e.tenant for e in events], [e.id for e in events])
                        await (await conn.execute(FIND_EXISTING_0002, ids)).fetchall()
                    await write_new(conn, events)
                times[revision].append(time.perf_counter() - t0)
    finally:
        for conn in conns.values():
            await conn.close()
    return times


def ingest(flat_url: str, part_url: str, seconds: float, rounds: int) -> list[IngestResult]:
    """Both databases warmed up, then measured in turns, the order swapped every round."""
    targets = [(flat_url, False, "0002"), (part_url, True, "head")]
    for url, partitioned, _ in targets:
        asyncio.run(_ingest(url, min(seconds, 2.0), partitioned))
    results = []
    for r in range(rounds):
        for url, partitioned, revision in targets if r % 2 == 0 else reversed(targets):
            count, elapsed = asyncio.run(_ingest(url, seconds, partitioned))
            name = "partitioned + event_keys" if partitioned else "unpartitioned"
            results.append(IngestResult(f"{name}, round {r + 1}", revision, count, elapsed, count / elapsed))
            print(f"  {results[-1].name}: {count / elapsed:,.0f} events/s", flush=True)
    return results


# --------------------------------------------------------------------------- report


def run(quick: bool, *, server_url: str | None, reports_dir: Path) -> Report:
    total = 200_000 if quick else 5_000_000
    runs = 5 if quick else 15
    now = datetime.now(UTC)
    with server(server_url) as admin:
        set_durable(admin, False)  # the load is not what is measured
        url = database_at(admin, "tagbus_bench_analyst", "head")
        print(f"loading {total:,} events of {TENANTS} tenants over {MONTHS} months", flush=True)
        load_seconds = load(url, total, now)
        with psycopg.connect(url) as conn:
            size = conn.execute(
                "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) FROM pg_partition_tree('events')"
            ).fetchone()
            names = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "work_mem")
            settings = {n: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(n))).fetchone()[0]) for n in names}  # type: ignore[index]
        report = Report(
            started_at=now.isoformat(timespec="seconds"),
            quick=quick,
            command=f"python -m bench --only analyst{' --quick' if quick else ''}",
            postgres=settings,
            machine={"cores": os.cpu_count(), "platform": platform.platform()},
            events_loaded=total,
            load_seconds=load_seconds,
            table_size=str(size[0] if size else "?"),
        )
        for query in QUERIES:
            report.queries.append(time_query(url, query, runs))
            q = report.queries[-1]
            print(f"  {q.name}: p50 {q.p50_ms:.1f} ms, p99 {q.p99_ms:.1f} ms, "
                  f"{q.partitions_scanned}/{q.partitions_total} partitions", flush=True)  # fmt: skip
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE tagbus_bench_analyst WITH (FORCE)")
        set_durable(admin, True)
        report.postgres["fsync (ingest part)"] = "on"
        flat = database_at(admin, "tagbus_bench_flat", "0002")
        part = database_at(admin, "tagbus_bench_part", "head")
        print(f"ingest: {TASKS} tasks × {GROUP}-event groups, revision 0002 vs head", flush=True)
        report.ingest = ingest(flat, part, 3.0 if quick else 15.0, 2 if quick else 4)
        times = asyncio.run(_interleaved(flat, part, 300 if quick else 2_000))
        report.sequential = {
            revision: {"groups": len(t), "p50_ms": percentile(t, 50) * 1e3, "p99_ms": percentile(t, 99) * 1e3}
            for revision, t in times.items()
        }
        print(f"  one connection, in turns: {report.sequential}", flush=True)
    before = sum(r.events for r in report.ingest if r.revision == "0002") / sum(
        r.seconds for r in report.ingest if r.revision == "0002"
    )
    after = sum(r.events for r in report.ingest if r.revision == "head") / sum(
        r.seconds for r in report.ingest if r.revision == "head"
    )
    report.ingest_ratio = after / before
    write_reports(report, reports_dir)
    return report


def write_reports(report: Report, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench-analyst.json").write_bytes(orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2))
    lines = [
        "# tagbus analyst benchmark",
        "",
        f"`{report.command}` — {report.started_at}, {'quick' if report.quick else 'full'} run, throwaway cluster; "
        f"{report.machine['cores']} cores; PostgreSQL {report.postgres.get('server_version')}.",
        "",
        f"{report.events_loaded:,} events of {TENANTS} tenants over {MONTHS} months (monthly partitions), "
        f"loaded set-based in {report.load_seconds:.0f} s; events with indexes: {report.table_size}.",
        "",
        "| query | runs as | runs | rows | p50 ms | p99 ms | partitions read |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {q.name} | {q.role} | {q.runs} | {q.rows} | {q.p50_ms:.1f} | {q.p99_ms:.1f} | "
        f"{q.partitions_scanned} of {q.partitions_total} |"
        for q in report.queries
    ]
    lines += [
        "",
        f"Ingest, the store's set-based write ({GROUP}-event groups, {TASKS} concurrent tasks, one commit per "
        "group, fsync on) into fresh databases at revision 0002 and at head, both warmed up, then in turns "
        "(order swapped every round):",
        "",
        "| database | events/s |",
        "|---|---|",
        *(f"| {r.name} (revision {r.revision}) | {r.rate:,.0f} |" for r in report.ingest),
        "",
        f"Partitioned / unpartitioned, all rounds: **{report.ingest_ratio:.2f}** (target ≥ 0.90).",
        "",
        "One connection, one group per database in turns (so machine noise falls on both alike), time per "
        f"{GROUP}-event group including its commit:",
        "",
        "| revision | groups | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {rev} | {v['groups']:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |"
            for rev, v in report.sequential.items()
        ),
        "",
        "Queries (exact SQL):",
        "",
        *(f"- {q.name}: `{q.sql}`" for q in report.queries),
        "",
    ]
    (directory / "bench-analyst.md").write_text("\n".join(lines), encoding="utf-8")


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    report = run(options.quick, server_url=options.server_url, reports_dir=options.reports_dir)
    print(f"ingest partitioned/unpartitioned: {report.ingest_ratio:.2f}")
    print("written: reports/bench-analyst.md, reports/bench-analyst.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analyst", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 events instead of 5,000,000")
    parser.add_argument("--database-url", default=os.environ.get("TAGBUS_BENCH_DATABASE_URL"))
    args = parser.parse_args(argv)
    run(args.quick, server_url=args.database_url, reports_dir=REPO_ROOT / "reports")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
