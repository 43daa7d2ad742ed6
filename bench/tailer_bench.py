"""Log tailer decode throughput against raw slot reads, on one backlog in the same run.

A backlog of N committed events (transactions of ``--txn-size``) sits in a fresh slot.
Measured, in this order (peeks do not consume the slot; the tailer drain does):

1. ``raw server``: ``SELECT count(*) FROM pg_logical_slot_peek_binary_changes(…)`` —
   the server decodes the whole backlog through pgoutput; nothing crosses the wire.
2. ``raw fetch``: the same peek, rows fetched into Python (binary), not decoded.
3. ``python decode``: :class:`ChangeDecoder` over the rows fetched in 2 (no I/O).
4. ``tailer drain``: ``LogTailer.drain()`` with a :class:`NullSink` — peek batches,
   decode into StoredEvents, advance the slot: the decode-only end-to-end rate.

Usage: ``python -m bench.tailer_bench [--events 100000] [--database-url URL]``. Without a
URL (or ``TAGBUS_BENCH_DATABASE_URL``) a throwaway cluster is started, as in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import psycopg
from prometheus_client import CollectorRegistry

from event_bus.settings import TailerSettings
from event_bus.tailer import ChangeDecoder, LogTailer, NullSink

PEEK_ALL = """
    SELECT {select} FROM pg_logical_slot_peek_binary_changes(
        %s::name, NULL, NULL, 'proto_version', '1', 'publication_names', 'tagbus_events', 'messages', 'true')
"""

INSERT_BATCH = """
    INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, subject, occurred_at,
                        data, metadata, digest)
    SELECT 'bench-' || n, 'tenant-' || (n %% 7), 'tenantconfig:feature/' || n,
           1, 'config.set', '/bench', 'tenantconfig:feature/' || n, now(),
           jsonb_build_object('key', 'tenantconfig:feature/' || n,
                              'value', jsonb_build_object('enabled', true, 'limit', n,
                                                          'note', repeat('x', 64))),
           '{"correlationid": "c", "sub": "bench"}'::jsonb, md5(n::text)
    FROM generate_series(%(start)s::bigint + 1, %(start)s::bigint + %(n)s) AS n
"""


@contextlib.contextmanager
def bench_database(url: str | None) -> Iterator[str]:
    from tests.fixtures.postgres_cluster import TemporaryCluster, cloned_database, create_template

    cluster = None
    if url is None:
        cluster = TemporaryCluster.start()
        url = cluster.url
    try:
        create_template(url)
        with cloned_database(url) as database_url:
            yield database_url
    finally:
        if cluster is not None:
            cluster.stop()


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f}/s  ({seconds:.3f}s)"


def run(database_url: str, events: int, txn_size: int, read_batch: int) -> None:
    slot = f"tagbus_bench_{uuid.uuid4().hex[:8]}"
    settings = TailerSettings(database_url=database_url, slot_name=slot, read_batch=read_batch)
    sink = NullSink()
    with LogTailer(settings, None, sink=sink, registry=CollectorRegistry()) as tailer:
        assert tailer.try_activate()
        with psycopg.connect(database_url) as conn:
            started = time.perf_counter()
            for start in range(0, events, txn_size):
                conn.execute(INSERT_BATCH, {"start": start, "n": min(txn_size, events - start)})
                conn.commit()
            elapsed = time.perf_counter() - started
            print(f"backlog     {events:,} events, {events // txn_size:,} transactions: {rate(events, elapsed)}")

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SET DateStyle = 'ISO'")
            conn.execute("SET TimeZone = 'UTC'")
            started = time.perf_counter()
            [(messages,)] = conn.execute(PEEK_ALL.format(select="count(*)"), (slot,)).fetchall()
            print(f"raw server  {rate(events, time.perf_counter() - started)}  ({messages:,} messages)")
            started = time.perf_counter()
            rows = [r[0] for r in conn.execute(PEEK_ALL.format(select="data"), (slot,), binary=True).fetchall()]
            print(f"raw fetch   {rate(events, time.perf_counter() - started)}")
        started = time.perf_counter()
        decoded = sum(len(t.events) for t in ChangeDecoder().decode(rows))
        print(f"py decode   {rate(decoded, time.perf_counter() - started)}")
        del rows

        started = time.perf_counter()
        result = tailer.drain()
        elapsed = time.perf_counter() - started
        print(f"drain       {rate(result.events, elapsed)}  (NullSink, with slot advances)")
        assert result.events == events == sink.count, (result, events, sink.count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--txn-size", type=int, default=100)
    parser.add_argument("--read-batch", type=int, default=2_000)
    parser.add_argument("--database-url", default=os.environ.get("TAGBUS_BENCH_DATABASE_URL"))
    args = parser.parse_args()
    with bench_database(args.database_url) as url:
        run(url, args.events, args.txn_size, args.read_batch)


if __name__ == "__main__":
    main()
