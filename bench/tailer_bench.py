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
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from event_bus.settings import TailerSettings
from event_bus.tailer import ChangeDecoder, LogTailer, NullSink

REPO_ROOT = Path(__file__).resolve().parents[1]

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


# --------------------------------------------------------------------------- a private kinesis-mock


KINESIS_MOCK_DIR = REPO_ROOT / ".tagbus" / "kinesis-mock" / "node_modules" / "kinesis-local"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kinesis_client(endpoint: str, **config: Any) -> Any:
    """A boto3 Kinesis client for a local endpoint (dummy credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(**config) if config else None,
    )


class KinesisMock:
    """A kinesis-mock (npm ``kinesis-local``) process of our own, on free ports, with one stream.

    The shared stack's instance is never touched. With ``persist_dir`` the mock saves its
    state there (also on SIGTERM) and reloads it on :meth:`start`, so it can be stopped and
    brought back holding the records it had acknowledged.
    """

    def __init__(self, stream: str, *, shards: int = 1, persist_dir: Path | None = None) -> None:
        if not (KINESIS_MOCK_DIR / "main.js").is_file():
            raise RuntimeError(f"kinesis-mock is not installed at {KINESIS_MOCK_DIR} (run `make setup`)")
        self.stream = stream
        self.shards = shards
        self.port = free_port()
        self._tls_port = free_port()
        self._persist_dir = persist_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="kinesis-mock-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **config: Any) -> Any:
        return kinesis_client(self.endpoint, **config)

    def start(self, timeout: float = 60.0) -> KinesisMock:
        env = {
            **os.environ,
            "KINESIS_MOCK_PLAIN_PORT": str(self.port),
            "KINESIS_MOCK_TLS_PORT": str(self._tls_port),
            "AWS_REGION": "us-east-1",
            "INITIALIZE_STREAMS": f"{self.stream}:{self.shards}:us-east-1",
            "SHARD_LIMIT": "50",
            "LOG_LEVEL": "WARN",
        }
        if self._persist_dir is not None:
            self._persist_dir.mkdir(parents=True, exist_ok=True)
            env |= {
                "SHOULD_PERSIST_DATA": "true",
                "LOAD_DATA_IF_EXISTS": "true",
                "PERSIST_PATH": str(self._persist_dir),
                "PERSIST_INTERVAL": "1s",
            }
        self._process = subprocess.Popen(
            ["node", "main.js"], cwd=KINESIS_MOCK_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"kinesis-mock exited with {self._process.returncode}; log: {self._log.name}")
            try:
                summary = client.describe_stream_summary(StreamName=self.stream)["StreamDescriptionSummary"]
                if summary["StreamStatus"] == "ACTIVE":
                    return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process (SIGTERM lets it persist its state first) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang, as with an unresponsive endpoint."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> KinesisMock:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_all(self, *, idle_pages: int = 2) -> dict[str, list[tuple[str, bytes]]]:
        """Every record of every shard from TRIM_HORIZON: shard id → [(partition key, data)], in shard order."""
        client = self.client()
        out: dict[str, list[tuple[str, bytes]]] = {}
        for shard in client.list_shards(StreamName=self.stream)["Shards"]:
            shard_id = shard["ShardId"]
            iterator = client.get_shard_iterator(
                StreamName=self.stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            records: list[tuple[str, bytes]] = []
            empty = 0
            while iterator and empty < idle_pages:
                page = client.get_records(ShardIterator=iterator, Limit=10_000)
                records.extend((r["PartitionKey"], r["Data"]) for r in page["Records"])
                empty = 0 if page["Records"] else empty + 1
                iterator = page.get("NextShardIterator")
            out[shard_id] = records
        return out


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
