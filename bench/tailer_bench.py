"""Log tailer benchmarks: every rate next to a raw ceiling measured on the same endpoint in the same run.

1. **decode**: a backlog (full: 200,000 events in transactions of 100; quick: 20,000) sits
   in slots created before it. ``DrainingTailer.drain()`` with a :class:`NullSink` (stream,
   decode into StoredEvents, confirm) versus the raw baseline: PostgreSQL's own client of
   the same route, ``pg_recvlogical`` streaming the slot with the same pgoutput options into
   ``/dev/null`` (the walsender's decoding and sending, a C client, a null sink). Two more
   references explain the gap: the slot streamed to this process and dropped undecoded, and
   the whole backlog decoded by one ``pg_logical_slot_peek_binary_changes`` counted
   server-side, where nothing leaves the server — a rate no client reaches (fetching those
   same rows to a client already costs a third of it, and the walsender's sending, even to
   ``pg_recvlogical``, more than half). All runs alternate; each reads a fresh copy
   (``pg_copy_logical_replication_slot``) of the backlog's slot.
2. **publish**: the tailer's relay loop (``LogTailer.run()``, as the tailer process runs
   it, batches in flight included) publishing the last N events of the backlog into a
   private kinesis-mock (streams of 1 and 4 shards, without and with KPL aggregation) versus
   raw ``PutRecords`` of the very same records (500 records / 5 MiB a request, one client,
   one request at a time), raw and tailer runs alternating, compared by median time. The
   same publisher against an in-process endpoint that acknowledges at once gives its CPU
   cost, used by the on-paper sizing for real Kinesis; against one that answers each call in
   a fixed 30 ms, the relay loop runs with and without read-ahead.
3. **latency**: commit → Kinesis-acknowledged, single-event transactions committed at a
   steady 1,000 events/s by paced inserters while ``LogTailer.run()`` relays them; measured
   from the moment each commit returned to the moment ``PutRecords`` acknowledged it.
4. **memory**: peak RSS (``VmHWM``) of a process whose relay loop publishes the full
   backlog and one tenth of it, aggregated, into an endpoint answering each call in 5 ms.

Usage: ``python -m bench.tailer_bench [--quick] [--database-url URL]`` or ``python -m bench
--only tailer_bench``. The database ``tagbus_bench_tailer`` is (re)created on the server and
dropped, with its slots, at the end. Results: printed, and written to
``reports/bench-tailer.{json,md}``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql

from bench import BenchOptions
from devtools.ports import free_port
from kernel.envelope import StoredEvent
from kernel.gc_tuning import quiet_collector
from kernel.stats import percentile
from tagbus.install import find_postgres_bindir
from tailer import ChangeDecoder, KinesisPublisher, LogTailer, NullSink, SlotReader, TailerMetrics
from tailer.drain import DrainingTailer
from tailer.settings import DEFAULT_IN_FLIGHT, TailerSettings, TailerTuning
from tailer.stream import ReplicationStream

REPO_ROOT = Path(__file__).resolve().parents[1]

BENCH_DB = "tagbus_bench_tailer"
SLOT_PREFIX = "bench_tailer_"
PUBLICATION = "tagbus_events"
#: The same options as :meth:`tailer.SlotReader.peek`, whole backlog in one call.
#: Bounded by the WAL position taken after loading, as ``pg_recvlogical`` is: the streamed
#: reference counts this many messages, and an unbounded peek once counted a transaction
#: committed later that the stream had not reached.
RAW_PEEK = """
    SELECT count(*) FROM pg_logical_slot_peek_binary_changes(
        %s::name, %s::pg_lsn, NULL, 'proto_version', '1', 'publication_names', '"tagbus_events"', 'messages', 'true')
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
#: Event numbers of the latency phase start here, clear of the backlog's.
LATENCY_FIRST = 100_000_000

TARGET_DECODE_RATIO = 0.70
TARGET_NULL_SINK_PER_S = 50_000
TARGET_PUBLISH_RATIO = 0.90
TARGET_P99_SECONDS = 0.100
TARGET_PER_TAILER_PER_S = 10_000
#: The fixed call time of the read-ahead comparison: a large PutRecords to a remote Kinesis.
READ_AHEAD_CALL_SECONDS = 0.03
#: The call time of the memory comparison's endpoint: long enough that batches are read ahead.
MEMORY_CALL_SECONDS = 0.005
#: Real Kinesis, per shard, for writes.
SHARD_BYTES_PER_S = 1_000_000
SHARD_RECORDS_PER_S = 1_000
MAX_REQUEST_RECORDS = 500
MAX_REQUEST_BYTES = 5 * 1_048_576


@dataclass(frozen=True, slots=True)
class Sizes:
    backlog: int
    #: The smaller backlog of the memory comparison, and the events of each publish run.
    small: int
    publish: int
    latency_seconds: float
    #: Latency without aggregation: kinesis-mock falls behind 1,000 records/s as a shard fills.
    plain_latency_seconds: float
    decode_rounds: int
    #: Tailer runs per publish row, each between two raw runs (kinesis-mock's speed drifts);
    #: more for the aggregated rows, whose runs take seconds and swing most.
    publish_rounds: int = 2
    aggregated_publish_rounds: int = 5
    txn_size: int = 100
    latency_rate: float = 1_000.0
    latency_warmup_seconds: float = 2.0
    latency_inserters: int = 4
    poll_interval_seconds: float = 0.02


FULL = Sizes(
    backlog=200_000, small=20_000, publish=10_000, latency_seconds=30.0, plain_latency_seconds=10.0, decode_rounds=3
)
QUICK = Sizes(
    backlog=20_000,
    small=2_000,
    publish=4_000,
    latency_seconds=10.0,
    plain_latency_seconds=6.0,
    decode_rounds=2,
    publish_rounds=1,
    aggregated_publish_rounds=1,
)


# --------------------------------------------------------------------------- database and slots


@contextlib.contextmanager
def bench_server(url: str | None) -> Iterator[str]:
    """The admin URL to use: ``url``, or a throwaway cluster's when ``None``."""
    if url is not None:
        yield url
        return
    from devtools.postgres_cluster import TemporaryCluster

    cluster = TemporaryCluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


def _drop_bench_database(server_url: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        # A slot pins its database (and WAL): drop ours first, waiting for a session to let go.
        deadline = time.monotonic() + 15
        while True:
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                    (BENCH_DB,),
                )
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB)))


@contextlib.contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A freshly migrated ``tagbus_bench_tailer``; dropped with its slots on exit."""
    from devtools.postgres_cluster import apply_migrations, with_database

    _drop_bench_database(server_url)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    try:
        url = with_database(server_url, BENCH_DB)
        apply_migrations(url)
        yield url
    finally:
        _drop_bench_database(server_url)


def create_slot(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


@contextlib.contextmanager
def slot_copy(conn: psycopg.Connection[Any], source: str) -> Iterator[str]:
    """A new slot at the same position as ``source`` (it sees the same backlog); dropped on exit."""
    name = f"{SLOT_PREFIX}w{uuid.uuid4().hex[:8]}"
    conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (source, name))
    try:
        yield name
    finally:
        deadline = time.monotonic() + 15
        while True:
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Backlog:
    events: int
    transactions: int
    seconds: float
    #: Slots created before the backlog (all of it), before its last ``small`` and last ``publish`` events.
    full_slot: str
    small_slot: str
    publish_slot: str


def load_backlog(url: str, sizes: Sizes) -> Backlog:
    """Commit the backlog in transactions of ``txn_size``, creating the template slots on the way."""
    full, small, publish = (f"{SLOT_PREFIX}{name}" for name in ("full", "small", "publish"))
    marks = {sizes.backlog - sizes.small: small, sizes.backlog - sizes.publish: publish}
    transactions = 0
    with psycopg.connect(url, autocommit=True) as admin, psycopg.connect(url) as conn:
        create_slot(admin, full)
        started = time.perf_counter()
        for start in range(0, sizes.backlog, sizes.txn_size):
            for mark in sorted(m for m in marks if start <= m < start + sizes.txn_size):
                create_slot(admin, marks.pop(mark))
            conn.execute(INSERT_BATCH, {"start": start, "n": min(sizes.txn_size, sizes.backlog - start)})
            conn.commit()
            transactions += 1
        seconds = time.perf_counter() - started
    return Backlog(sizes.backlog, transactions, seconds, full, small, publish)


def tailer_settings(url: str, slot: str, sizes: Sizes, *, stream: str = "unused") -> TailerSettings:
    return TailerSettings(
        database_url=url,
        stream_name=stream,
        slot_name=slot,
        publication=PUBLICATION,
        poll_interval_seconds=sizes.poll_interval_seconds,
    )


def read_events(url: str, slot: str) -> list[StoredEvent]:
    """Every event a slot holds, decoded once (peek: the slot does not move)."""
    reader = SlotReader(url, slot, PUBLICATION)
    try:
        rows = reader.peek(10_000_000)
    finally:
        reader.close()
    return [event for transaction in ChangeDecoder().decode(rows) for event in transaction.events]


# --------------------------------------------------------------------------- 1. decode


def measure_decode(url: str, backlog: Backlog, sizes: Sizes) -> dict[str, Any]:
    """Raw server-side peek of the whole backlog versus a null-sink drain, alternating."""
    peek_rates: list[float] = []
    raw_rates: list[float] = []
    stream_rates: list[float] = []
    drain_rates: list[float] = []
    messages = 0
    with psycopg.connect(url, autocommit=True) as admin:
        [(end_lsn,)] = admin.execute("SELECT pg_current_wal_lsn()::text").fetchall()
        for round_ in range(sizes.decode_rounds):
            with slot_copy(admin, backlog.full_slot) as peek_slot:
                started = time.perf_counter()
                [(messages,)] = admin.execute(RAW_PEEK, (peek_slot, end_lsn)).fetchall()
                peek_rates.append(backlog.events / (time.perf_counter() - started))
            with slot_copy(admin, backlog.full_slot) as raw_slot:
                started = time.perf_counter()
                recvlogical(url, raw_slot, end_lsn)
                raw_rates.append(backlog.events / (time.perf_counter() - started))
            with slot_copy(admin, backlog.full_slot) as stream_slot:
                started = time.perf_counter()
                stream_messages(url, stream_slot, int(messages))
                stream_rates.append(backlog.events / (time.perf_counter() - started))
            with slot_copy(admin, backlog.full_slot) as slot:
                sink = NullSink()
                settings = tailer_settings(url, slot, sizes)
                with DrainingTailer(settings, None, sink=sink, registry=CollectorRegistry()) as tailer:
                    if not tailer.try_activate():
                        raise RuntimeError("another tailer holds the bench database's lock")
                    started = time.perf_counter()
                    result = tailer.drain()
                    elapsed = time.perf_counter() - started
                if result.events != backlog.events or sink.count != backlog.events:
                    raise RuntimeError(f"drain saw {result.events} events, expected {backlog.events}")
                drain_rates.append(backlog.events / elapsed)
            print(
                f"  decode round {round_ + 1}: server-side peek {peek_rates[-1]:,.0f}/s,"
                f" pg_recvlogical {raw_rates[-1]:,.0f}/s, stream to client {stream_rates[-1]:,.0f}/s,"
                f" tailer {drain_rates[-1]:,.0f}/s"
            )
        # Where the tailer's time goes: the rows over the wire, then pgoutput → StoredEvent in Python.
        with slot_copy(admin, backlog.full_slot) as slot:
            reader = SlotReader(url, slot, PUBLICATION)
            try:
                started = time.perf_counter()
                rows = reader.peek(10_000_000)
                fetch = backlog.events / (time.perf_counter() - started)
            finally:
                reader.close()
        started = time.perf_counter()
        decoded = sum(len(t.events) for t in ChangeDecoder().decode(rows))
        python_decode = decoded / (time.perf_counter() - started)
        del rows
    peek = statistics.mean(peek_rates)
    raw = statistics.mean(raw_rates)
    streamed = statistics.mean(stream_rates)
    drain = statistics.mean(drain_rates)
    return {
        "events": backlog.events,
        "wal_messages": int(messages),
        "rounds": sizes.decode_rounds,
        "raw_baseline": "pg_recvlogical into /dev/null",
        "raw_events_per_s": round(raw),
        "raw_messages_per_s": round(raw * messages / backlog.events),
        "raw_rounds_per_s": [round(r) for r in raw_rates],
        "peek_events_per_s": round(peek),
        "peek_messages_per_s": round(peek * messages / backlog.events),
        "peek_rounds_per_s": [round(r) for r in peek_rates],
        "ratio_to_peek": round(drain / peek, 3),
        "recvlogical_ratio_to_peek": round(raw / peek, 3),
        "fetch_ratio_to_peek": round(fetch / peek, 3),
        "tailer_events_per_s": round(drain),
        "tailer_rounds_per_s": [round(r) for r in drain_rates],
        "ratio_to_raw": round(drain / raw, 3),
        "stream_events_per_s": round(streamed),
        "stream_rounds_per_s": [round(r) for r in stream_rates],
        "ratio_to_stream": round(drain / streamed, 3),
        "fetch_events_per_s": round(fetch),
        "python_decode_events_per_s": round(python_decode),
        "read_batch": TailerTuning().max_read_batch,
        "meets_ratio": drain / raw >= TARGET_DECODE_RATIO,
        "meets_rate": drain >= TARGET_NULL_SINK_PER_S,
    }


def recvlogical(url: str, slot: str, end_lsn: str, timeout: float = 600.0) -> None:
    """PostgreSQL's own client of the tailer's route: ``pg_recvlogical`` streams the slot with
    the tailer's pgoutput options up to ``end_lsn`` into ``/dev/null`` (the raw decode baseline)."""
    subprocess.run(
        [
            str(find_postgres_bindir() / "pg_recvlogical"),
            "--dbname",
            url,
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "--endpos",
            end_lsn,
            "--file",
            "/dev/null",
            "--option",
            "proto_version=1",
            "--option",
            f"publication_names={PUBLICATION}",
            "--option",
            "messages=true",
        ],
        check=True,
        timeout=timeout,
    )


def stream_messages(url: str, slot: str, messages: int, timeout: float = 600.0) -> None:
    """The tailer's route without the tailer: the slot's pgoutput messages streamed to this
    process over the replication protocol and dropped, undecoded (the fair raw ceiling of
    the client side: the walsender's decoding plus the transfer)."""
    stream = ReplicationStream(url, slot, PUBLICATION)
    stream.start()
    try:
        received = 0
        deadline = time.monotonic() + timeout
        while received < messages:
            message = stream.read(1.0)
            if type(message) is bytes:
                received += 1
            elif time.monotonic() > deadline:
                raise RuntimeError(f"streamed {received} of {messages} messages in {timeout}s")
    finally:
        stream.close()


# --------------------------------------------------------------------------- a private kinesis-mock


KINESIS_MOCK_DIR = REPO_ROOT / ".tagbus" / "kinesis-mock" / "node_modules" / "kinesis-local"


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


# --------------------------------------------------------------------------- 2. publish


class InstantKinesis:
    """A Kinesis endpoint inside this process that acknowledges every record at once and keeps them.

    Publishing into it costs only the publisher's own CPU (serialization, aggregation), and
    what it kept are the exact records, sizes and routing of the raw ``PutRecords`` runs.
    """

    def __init__(self, shards: Sequence[dict[str, Any]]) -> None:
        self._shards = list(shards)
        ranges = sorted((int(s["HashKeyRange"]["StartingHashKey"]), str(s["ShardId"])) for s in shards)
        self._starts = [start for start, _ in ranges]
        self._ids = [shard_id for _, shard_id in ranges]
        self.records: list[dict[str, Any]] = []

    def list_shards(self, **_: Any) -> dict[str, Any]:
        return {"Shards": self._shards}

    def put_records(self, **request: Any) -> dict[str, Any]:
        records: list[dict[str, Any]] = request["Records"]
        self.records.extend(records)
        return {
            "FailedRecordCount": 0,
            "Records": [{"SequenceNumber": "0", "ShardId": self._shard(r)} for r in records],
        }

    def _shard(self, record: dict[str, Any]) -> str:
        # Only aggregated records carry an explicit hash key, and only they are checked by the publisher.
        key = record.get("ExplicitHashKey")
        if key is None:
            return self._ids[0]
        return self._ids[max(0, bisect.bisect_right(self._starts, int(key)) - 1)]


class FixedDelayKinesis(InstantKinesis):
    """An :class:`InstantKinesis` whose calls each take ``delay`` seconds, answered in parallel.

    A stand-in for a remote Kinesis: the call's time is spent elsewhere, so the tailer's own
    CPU can overlap it (kinesis-mock instead spends this machine's cores on each call).
    """

    def __init__(self, shards: Sequence[dict[str, Any]], delay: float, *, keep: bool = True) -> None:
        super().__init__(shards)
        self._delay = delay
        self._keep = keep

    def put_records(self, **request: Any) -> dict[str, Any]:
        time.sleep(self._delay)
        response = super().put_records(**request)
        if not self._keep:
            self.records.clear()  # the memory comparison: nothing may grow with the backlog here
        return response


def even_shards(count: int) -> list[dict[str, Any]]:
    """``ListShards`` entries of a stream split evenly into ``count`` shards."""
    width = 2**128 // count
    return [
        {
            "ShardId": f"shardId-{index:012d}",
            "HashKeyRange": {
                "StartingHashKey": str(index * width),
                "EndingHashKey": str(2**128 - 1 if index == count - 1 else (index + 1) * width - 1),
            },
        }
        for index in range(count)
    ]


def record_bytes(record: dict[str, Any]) -> int:
    return len(record["Data"]) + len(str(record["PartitionKey"]).encode())


def requests_of(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``records`` in PutRecords requests of at most 500 records and 5 MiB, in order."""
    out: list[list[dict[str, Any]]] = []
    request: list[dict[str, Any]] = []
    size = 0
    for record in records:
        n = record_bytes(record)
        if request and (len(request) >= MAX_REQUEST_RECORDS or size + n > MAX_REQUEST_BYTES):
            out.append(request)
            request, size = [], 0
        request.append(record)
        size += n
    if request:
        out.append(request)
    return out


def raw_put_records(client: Any, stream: str, records: Sequence[dict[str, Any]]) -> float:
    """Seconds to put ``records`` with plain ``put_records`` calls from one client (failed entries resent)."""
    pending = requests_of(records)
    started = time.perf_counter()
    for request in pending:
        unacknowledged = request
        for _ in range(100):
            response = client.put_records(Records=unacknowledged, StreamName=stream)
            if not response.get("FailedRecordCount"):
                break
            results = response["Records"]
            unacknowledged = [r for r, result in zip(unacknowledged, results, strict=True) if result.get("ErrorCode")]
        else:
            raise RuntimeError(f"raw PutRecords to {stream}: records still failing after 100 attempts")
    return time.perf_counter() - started


def raw_put_fresh(client: Any, prefix: str, shards: int, records: Sequence[dict[str, Any]]) -> float:
    """:func:`raw_put_records` into a fresh stream of ``shards`` shards."""
    with fresh_stream(client, prefix, shards) as stream:
        return raw_put_records(client, stream, records)


def wait_active(client: Any, stream: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        if time.monotonic() > deadline:
            raise RuntimeError(f"stream {stream} not ACTIVE after {timeout}s")
        time.sleep(0.2)


@contextlib.contextmanager
def fresh_stream(client: Any, prefix: str, shards: int) -> Iterator[str]:
    """A new stream of ``shards`` shards, deleted on exit.

    kinesis-mock slows down as a shard fills (≈ 1,000 records/s into an empty shard, a few
    hundred after 10,000 records), so every compared run writes the same records into an
    empty stream of its own: raw and tailer runs see the same slowdown.
    """
    name = f"{prefix}-{shards}-{uuid.uuid4().hex[:6]}"
    client.create_stream(StreamName=name, ShardCount=shards)
    try:
        wait_active(client, name)
        yield name
    finally:
        client.delete_stream(StreamName=name, EnforceConsumerDeletion=True)


def relay_all(tailer: LogTailer, registry: CollectorRegistry, events: int, timeout: float = 600.0) -> float:
    """Run the relay loop, as the tailer process does, until ``events`` are acknowledged; the seconds it took."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            tailer.run(stop)
        except BaseException as exc:  # handed to the main thread, which raises it
            failure.append(exc)

    thread = threading.Thread(target=loop, name="bench-relay", daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        while (registry.get_sample_value("tagbus_tailer_events_published_total") or 0) < events:
            if failure:
                raise failure[0]
            if not thread.is_alive() or time.perf_counter() - started > timeout:
                raise RuntimeError(f"the tailer did not publish {events} events in {timeout:.0f} s")
            time.sleep(0.002)
        return time.perf_counter() - started
    finally:
        stop.set()
        thread.join(60)


def relay_slot(
    settings: TailerSettings, client: Any, events: int, tuning: TailerTuning
) -> tuple[float, CollectorRegistry]:
    """A fresh tailer's relay loop over ``settings``' slot until ``events`` are acknowledged; seconds, metrics."""
    registry = CollectorRegistry()
    with LogTailer(settings, client, registry=registry, tuning=tuning) as tailer:
        if not tailer.try_activate():
            raise RuntimeError("another tailer holds the bench database's lock")
        return relay_all(tailer, registry, events), registry


def measure_publish(
    url: str, backlog: Backlog, sizes: Sizes, client: Any, *, prefix: str, shard_counts: Sequence[int]
) -> list[dict[str, Any]]:
    """For each shard count and aggregation mode: instant-endpoint CPU rate, raw ceiling, tailer drain."""
    events = read_events(url, backlog.publish_slot)
    if len(events) != sizes.publish:
        raise RuntimeError(f"publish slot holds {len(events)} events, expected {sizes.publish}")
    out: list[dict[str, Any]] = []
    with psycopg.connect(url, autocommit=True) as admin:
        for shards in shard_counts:
            with fresh_stream(client, prefix, shards) as probe:
                shard_list = client.list_shards(StreamName=probe)["Shards"]
            for aggregate in (False, True):
                tuning = TailerTuning(aggregate=aggregate)
                # The tailer into an endpoint that acknowledges at once: its CPU ceiling, and the
                # exact records (same read batches, same aggregates) the raw runs then replay.
                instant = InstantKinesis(shard_list)
                with slot_copy(admin, backlog.publish_slot) as slot:
                    settings = tailer_settings(url, slot, sizes, stream="instant")
                    with DrainingTailer(settings, instant, registry=CollectorRegistry(), tuning=tuning) as tailer:
                        if not tailer.try_activate():
                            raise RuntimeError("another tailer holds the bench database's lock")
                        started = time.perf_counter()
                        tailer.drain()
                        cpu_seconds = time.perf_counter() - started
                records = instant.records
                total_bytes = sum(record_bytes(r) for r in records)

                raw_runs = [raw_put_fresh(client, prefix, shards, records)]
                tailer_runs: list[float] = []
                sent = retries = 0.0
                for _ in range(sizes.aggregated_publish_rounds if aggregate else sizes.publish_rounds):
                    with slot_copy(admin, backlog.publish_slot) as slot, fresh_stream(client, prefix, shards) as stream:
                        settings = tailer_settings(url, slot, sizes, stream=stream)
                        run_seconds, registry = relay_slot(settings, client, len(events), tuning)
                        tailer_runs.append(run_seconds)
                        sent += registry.get_sample_value("tagbus_tailer_putrecords_batch_size_sum") or 0.0
                        retries += sum(
                            s.value
                            for m in registry.collect()
                            if m.name == "tagbus_tailer_publish_retries"
                            for s in m.samples
                            if s.name.endswith("_total")
                        )
                    raw_runs.append(raw_put_fresh(client, prefix, shards, records))
                raw_seconds = statistics.median(raw_runs)
                tailer_seconds = statistics.median(tailer_runs)
                raw_events = len(events) / raw_seconds
                tailer_events = len(events) / tailer_seconds
                row = {
                    "shards": shards,
                    "aggregate": aggregate,
                    "events": len(events),
                    "records": len(records),
                    "events_per_record": round(len(events) / len(records), 1),
                    "bytes_per_event": round(total_bytes / len(events)),
                    "tailer_events_per_s": round(tailer_events),
                    "tailer_records_per_s": round(sent / sum(tailer_runs)),
                    "tailer_retries": int(retries),
                    "raw_records_per_s": round(len(records) / raw_seconds),
                    "raw_events_per_s": round(raw_events),
                    "raw_mb_per_s": round(total_bytes / raw_seconds / 1e6, 2),
                    "raw_runs_events_per_s": [round(len(events) / seconds) for seconds in raw_runs],
                    "tailer_runs_events_per_s": [round(len(events) / seconds) for seconds in tailer_runs],
                    "ratio_to_raw": round(tailer_events / raw_events, 3),
                    "tailer_instant_events_per_s": round(len(events) / cpu_seconds),
                    "meets_target": tailer_events / raw_events >= TARGET_PUBLISH_RATIO,
                }
                print(
                    f"  publish {shards} shard(s){' aggregated' if aggregate else ''}: tailer {tailer_events:,.0f}"
                    f" events/s {row['tailer_runs_events_per_s']}, raw {raw_events:,.0f} events/s"
                    f" {row['raw_runs_events_per_s']} ({row['raw_records_per_s']:,} records/s)"
                )
                out.append(row)
    return out


def measure_read_ahead(url: str, backlog: Backlog, sizes: Sizes) -> list[dict[str, Any]]:
    """The relay loop with and without read-ahead into an endpoint answering in a fixed time.

    Alternating rounds over the ``small`` backlog, 4 shards, plain and aggregated: what
    preparing the next batch while a call is in flight buys when the call's time is not
    spent on this machine.
    """
    out: list[dict[str, Any]] = []
    events = sizes.small
    with psycopg.connect(url, autocommit=True) as admin:
        for aggregate in (False, True):
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for round_ in range(sizes.publish_rounds):
                for read_ahead in (True, False) if round_ % 2 == 0 else (False, True):
                    with slot_copy(admin, backlog.small_slot) as slot:
                        client = FixedDelayKinesis(even_shards(4), READ_AHEAD_CALL_SECONDS)
                        settings = tailer_settings(url, slot, sizes, stream="fixed-delay")
                        run_seconds, _ = relay_slot(
                            settings, client, events, TailerTuning(aggregate=aggregate, read_ahead=read_ahead)
                        )
                        seconds[read_ahead].append(run_seconds)
            on, off = (events / statistics.mean(seconds[flag]) for flag in (True, False))
            row = {
                "aggregate": aggregate,
                "events": events,
                "call_ms": READ_AHEAD_CALL_SECONDS * 1000,
                "read_ahead_events_per_s": round(on),
                "without_events_per_s": round(off),
                "ratio": round(on / off, 3),
            }
            print(
                f"  read-ahead, {'aggregated' if aggregate else 'plain'}, calls of {row['call_ms']:g} ms:"
                f" {on:,.0f} vs {off:,.0f} events/s without"
            )
            out.append(row)
    return out


# --------------------------------------------------------------------------- 3. latency


class AckClock:
    """A sink wrapper noting when each event was acknowledged (``time.time()`` after ``publish`` returned)."""

    def __init__(self, inner: KinesisPublisher) -> None:
        self._inner = inner
        self.acked: dict[str, float] = {}
        #: When each event was handed to the publisher (read, decoded, and its turn come).
        self.handed: dict[str, float] = {}
        #: Seconds each ``publish`` took (one or more PutRecords round trips).
        self.publish_seconds: list[float] = []

    def publish(self, batch: Sequence[StoredEvent]) -> None:
        handed = time.time()
        for event in batch:
            self.handed.setdefault(event.id, handed)
        started = time.perf_counter()
        self._inner.publish(batch)
        self.publish_seconds.append(time.perf_counter() - started)
        now = time.time()
        for event in batch:
            self.acked.setdefault(event.id, now)


def _paced_inserter(
    url: str,
    worker: int,
    *,
    workers: int,
    total: int,
    rate: float,
    t0: float,
    committed: list[float],
    stop: threading.Event,
    first: int,
    failure: list[BaseException],
) -> None:
    """Commit events ``worker, worker + workers, …`` each alone, event j due at ``t0 + j / rate``.

    A failure is handed to the main thread (which raises it) and stops the other inserters.
    """
    try:
        with psycopg.connect(url) as conn:
            for j in range(worker, total, workers):
                if stop.is_set():
                    return
                delay = t0 + j / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(INSERT_BATCH, {"start": first + j - 1, "n": 1})
                conn.commit()
                committed[j] = time.time()
    except BaseException as exc:
        failure.append(exc)
        stop.set()


def measure_latency(
    url: str,
    sizes: Sizes,
    client: Any,
    stream: str,
    *,
    shards: int,
    aggregate: bool,
    seconds: float,
    first: int,
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> dict[str, Any]:
    """Commit → acknowledged latency while single-event transactions arrive at a steady rate."""
    slot = f"{SLOT_PREFIX}latency"
    with psycopg.connect(url, autocommit=True) as admin:
        create_slot(admin, slot)
    registry = CollectorRegistry()
    metrics = TailerMetrics.for_registry(registry)
    sink = AckClock(KinesisPublisher(client, stream, metrics=metrics, aggregate=aggregate))
    settings = tailer_settings(url, slot, sizes, stream=stream)
    stop = threading.Event()
    failure: list[BaseException] = []
    tailer = LogTailer(settings, None, sink=sink, registry=registry, tuning=TailerTuning(in_flight=in_flight))

    def relay() -> None:
        try:
            tailer.run(stop)
        except BaseException as exc:  # handed to the main thread, which raises it
            failure.append(exc)

    total = int(seconds * sizes.latency_rate)
    committed = [0.0] * total
    relay_thread = threading.Thread(target=relay, name="bench-tailer", daemon=True)
    relay_thread.start()
    inserters_stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while not tailer.active:
            if failure or time.monotonic() > deadline:
                raise RuntimeError(f"the tailer did not become active: {failure}")
            time.sleep(0.05)
        t0 = time.time() + 0.2
        inserters = [
            threading.Thread(
                target=_paced_inserter,
                args=(url, w),
                kwargs={
                    "workers": sizes.latency_inserters,
                    "total": total,
                    "rate": sizes.latency_rate,
                    "t0": t0,
                    "committed": committed,
                    "stop": inserters_stop,
                    "first": first,
                    "failure": failure,
                },
                name=f"bench-inserter-{w}",
                daemon=True,
            )
            for w in range(sizes.latency_inserters)
        ]
        for thread in inserters:
            thread.start()
        for thread in inserters:
            thread.join(timeout=seconds * 3 + 30)
        if any(thread.is_alive() for thread in inserters):
            raise RuntimeError("the paced inserters did not finish in time")
        if failure:
            raise RuntimeError("a paced inserter or the tailer failed") from failure[0]
        ids = [f"bench-{first + j}" for j in range(total)]
        # Bounded: a tailer that fell behind the endpoint gets 20 s to catch up, then counts as missing.
        deadline = time.monotonic() + 20
        while len(sink.acked) < total and time.monotonic() < deadline:
            if failure:
                raise RuntimeError("the tailer failed") from failure[0]
            time.sleep(0.05)
    finally:
        inserters_stop.set()
        stop.set()
        relay_thread.join(timeout=30)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    if failure:
        raise RuntimeError("the tailer failed") from failure[0]
    missing = sum(1 for i in ids if i not in sink.acked)
    warm = int(sizes.latency_warmup_seconds * sizes.latency_rate)
    latencies = [sink.acked[ids[j]] - committed[j] for j in range(warm, total) if ids[j] in sink.acked]
    if not latencies:
        raise RuntimeError("no event of the latency run was acknowledged")
    achieved = (total - warm - 1) / (committed[total - 1] - committed[warm])
    lateness = [committed[j] - (t0 + j / sizes.latency_rate) for j in range(warm, total)]
    count = registry.get_sample_value("tagbus_tailer_commit_to_ack_seconds_count") or 0.0
    within = registry.get_sample_value("tagbus_tailer_commit_to_ack_seconds_bucket", {"le": "0.1"}) or 0.0
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    waits = [sink.handed[ids[j]] - committed[j] for j in range(warm, total) if ids[j] in sink.acked]
    result = {
        "events": total,
        "measured_events": len(latencies),
        "warmup_seconds": sizes.latency_warmup_seconds,
        "target_rate_per_s": sizes.latency_rate,
        "achieved_rate_per_s": round(achieved),
        "inserter_connections": sizes.latency_inserters,
        "commit_lateness_p99_ms": round(percentile(lateness, 99) * 1000, 1),
        "poll_interval_ms": round(sizes.poll_interval_seconds * 1000, 1),
        "shards": shards,
        "aggregate": aggregate,
        "in_flight": in_flight,
        "unacknowledged_after_20s": missing,
        "publish_calls": len(sink.publish_seconds),
        "publish_call_p50_ms": round(percentile(sink.publish_seconds, 50) * 1000, 1),
        "publish_call_p99_ms": round(percentile(sink.publish_seconds, 99) * 1000, 1),
        "handed_p50_ms": round(percentile(waits, 50) * 1000, 1),
        "handed_p99_ms": round(percentile(waits, 99) * 1000, 1),
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "mean_ms": round(statistics.mean(latencies) * 1000, 1),
        "metric_commit_to_ack_share_le_100ms": round(within / count, 4) if count else None,
        "meets_target": p99 <= TARGET_P99_SECONDS and not missing,
    }
    print(
        f"  latency ({shards} shard(s){', aggregated' if aggregate else ''}, {missing} unacknowledged)"
        f" at {achieved:,.0f} events/s: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms"
    )
    return result


# --------------------------------------------------------------------------- 4. memory


CHILD_URL_ENV = "TAGBUS_BENCH_TAILER_CHILD_URL"


def proc_status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_child(slot: str, events: int) -> None:
    """The subprocess side of :func:`measure_memory`: relay ``slot``'s ``events``, print one JSON line.

    The relay loop runs as in the tailer process, aggregating into an endpoint that answers
    each call in 5 ms and keeps nothing: a batch in flight and the next one read ahead are
    what the tailer holds.
    """
    url = os.environ[CHILD_URL_ENV]
    client = FixedDelayKinesis(even_shards(4), MEMORY_CALL_SECONDS, keep=False)
    settings = TailerSettings(database_url=url, slot_name=slot, publication=PUBLICATION)
    registry = CollectorRegistry()
    with LogTailer(settings, client, registry=registry, tuning=TailerTuning(aggregate=True)) as tailer:
        if not tailer.try_activate():
            raise RuntimeError("another tailer holds the bench database's lock")
        before = proc_status_kb("self", "VmHWM")
        seconds = relay_all(tailer, registry, events)
        published = registry.get_sample_value("tagbus_tailer_events_published_total") or 0
    after = proc_status_kb("self", "VmHWM")
    print(json.dumps({"events": int(published), "seconds": seconds, "hwm_before_kb": before, "hwm_after_kb": after}))


def relay_in_subprocess(url: str, slot: str, events: int, sizes: Sizes, timeout: float = 600.0) -> dict[str, Any]:
    """Run :func:`rss_child` and sample its ``VmRSS`` every 20 ms meanwhile."""
    command = [sys.executable, "-m", "bench.tailer_bench", "--rss-child", slot]
    command += ["--events", str(events)]
    env = {**os.environ, CHILD_URL_ENV: url}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    sampled = 0
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"memory relay of {slot} did not finish in {timeout}s")
        with contextlib.suppress(OSError, RuntimeError):
            sampled = max(sampled, proc_status_kb(process.pid, "VmRSS"))
        time.sleep(0.02)
    output = process.stdout.read().decode() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"memory relay of {slot} exited with {process.returncode}")
    report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    report["sampled_max_rss_kb"] = sampled
    return report


def measure_memory(url: str, backlog: Backlog, sizes: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as admin:
        for label, source, events in (
            ("small", backlog.small_slot, sizes.small),
            ("full", backlog.full_slot, sizes.backlog),
        ):
            with slot_copy(admin, source) as slot:
                report = relay_in_subprocess(url, slot, events, sizes)
            if report["events"] != events:
                raise RuntimeError(f"memory relay published {report['events']} events, expected {events}")
            out[label] = {
                "events": events,
                "baseline_mib": round(report["hwm_before_kb"] / 1024, 1),
                "peak_mib": round(report["hwm_after_kb"] / 1024, 1),
                "sampled_max_rss_mib": round(report["sampled_max_rss_kb"] / 1024, 1),
                "growth_mib": round((report["hwm_after_kb"] - report["hwm_before_kb"]) / 1024, 1),
                "events_per_s": round(events / report["seconds"]),
            }
            print(
                f"  memory {events:,} backlog: peak {out[label]['peak_mib']} MiB"
                f" (baseline {out[label]['baseline_mib']} MiB)"
            )
    small, full = out["small"], out["full"]
    out["peak_ratio_full_to_small"] = round(full["peak_mib"] / small["peak_mib"], 2)
    out["backlog_ratio"] = round(sizes.backlog / sizes.small, 1)
    # Flat: ten times the backlog costs well under twice the peak (the read batch caps it, not the backlog).
    out["meets_target"] = full["peak_mib"] <= 1.5 * small["peak_mib"]
    return out


# --------------------------------------------------------------------------- 5. on paper, and the report


def on_paper(decode: dict[str, Any], publish: list[dict[str, Any]]) -> dict[str, Any]:
    """Shards and aggregation for ``TARGET_PER_TAILER_PER_S`` on real Kinesis, from the measured costs."""
    target = TARGET_PER_TAILER_PER_S
    plain = next(r for r in publish if r["shards"] == max(p["shards"] for p in publish) and not r["aggregate"])
    packed = next(r for r in publish if r["shards"] == plain["shards"] and r["aggregate"])
    null_rate = decode["tailer_events_per_s"]
    # The tailer into an endpoint that acknowledges at once: decode + serialize (+ aggregate) CPU.
    cpu_plain = plain["tailer_instant_events_per_s"]
    cpu_packed = packed["tailer_instant_events_per_s"]
    shards_plain = max(
        math.ceil(target / SHARD_RECORDS_PER_S), math.ceil(target * plain["bytes_per_event"] / SHARD_BYTES_PER_S)
    )
    shards_packed = math.ceil(target * packed["bytes_per_event"] / SHARD_BYTES_PER_S)
    # One PutRecords in flight at a time: a request of 500 records must return within this for the target.
    max_round_trip_ms = 1000 * (MAX_REQUEST_RECORDS / target - 1 / cpu_plain * MAX_REQUEST_RECORDS)
    verdict = "enough" if min(cpu_plain, cpu_packed) >= target else "NOT enough"
    # Below the target on CPU alone no round trip is short enough (the bound goes negative).
    round_trip = f"~{max_round_trip_ms:.0f} ms" if max_round_trip_ms > 0 else "(none: the CPU alone is too slow)"
    text = (
        f"On paper, for real Kinesis (1 MB/s and 1,000 records/s per shard): the tailer decodes {null_rate:,} "
        f"events/s with a null sink; publishing to an endpoint that acknowledges at once (decode, serialize, "
        f"PutRecords calls: the CPU ceiling) it relays {cpu_plain:,.0f} events/s without aggregation and "
        f"{cpu_packed:,.0f} with it, so one tailer's CPU is {verdict} for "
        f"{target:,} events/s. Without aggregation each event is one record of ~{plain['bytes_per_event']} bytes, "
        f"so {target:,} events/s need {shards_plain} shards (the 1,000 records/s limit binds, not bytes: "
        f"{target * plain['bytes_per_event'] / 1e6:.1f} MB/s), and since one tailer keeps one PutRecords of 500 "
        f"records in flight by default, each must return within {round_trip} (TAGBUS_TAILER_IN_FLIGHT=2 "
        f"doubles that for events spread over many streams). With aggregation "
        f"(~{packed['events_per_record']:,} events per record here; per shard and per read batch in production) "
        f"the record limit no longer binds: {target * packed['bytes_per_event'] / 1e6:.1f} MB/s needs "
        f"{shards_packed} shard(s) by bytes, and a 5 MiB request carries thousands of events, so round-trip "
        f"time stops mattering. So: ≥ {target:,} events/s per tailer takes {shards_plain} shards without "
        f"aggregation (and PutRecords ≤ {round_trip}), or {shards_packed} shards with aggregation; "
        f"aggregation is needed below {shards_plain} shards."
    )
    return {
        "null_sink_events_per_s": null_rate,
        "cpu_ceiling_events_per_s": round(cpu_plain),
        "cpu_ceiling_aggregated_events_per_s": round(cpu_packed),
        "bytes_per_event": plain["bytes_per_event"],
        "shards_without_aggregation": shards_plain,
        "shards_with_aggregation": shards_packed,
        "max_putrecords_round_trip_ms_without_aggregation": round(max_round_trip_ms),
        "text": text,
    }


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    d, m = r["decode"], r["memory"]
    rows = [
        (
            f"decode: tailer drain, null sink ({d['events']:,} backlog)",
            f"{d['tailer_events_per_s']:,} events/s",
            f"{d['raw_events_per_s']:,} events/s ({d['raw_messages_per_s']:,} msgs/s): pg_recvlogical, null sink",
            f"{d['ratio_to_raw']:.2f}",
            f">= 0.70: {_ok(d['meets_ratio'])}; >= 50,000/s: {_ok(d['meets_rate'])}",
        ),
        (
            "decode: the same drain against the stream received undecoded",
            f"{d['tailer_events_per_s']:,} events/s",
            f"{d['stream_events_per_s']:,} events/s: slot streamed to this process, no decoding",
            f"{d['ratio_to_stream']:.2f}",
            "",
        ),
        (
            "decode: against the server counting its own peek (nothing leaves the server)",
            f"{d['tailer_events_per_s']:,} events/s",
            f"{d['peek_events_per_s']:,} events/s ({d['peek_messages_per_s']:,} msgs/s); pg_recvlogical reaches "
            f"{d['recvlogical_ratio_to_peek']:.2f} of it, the peek's rows fetched to Python "
            f"{d['fetch_ratio_to_peek']:.2f}",
            f"{d['ratio_to_peek']:.2f}",
            "",
        ),
    ]
    for p in r["publish"]:
        mode = "aggregated" if p["aggregate"] else "plain"
        rows.append(
            (
                f"publish: {p['shards']} shard(s), {mode} ({p['events']:,} events, {p['records']:,} records)",
                f"{p['tailer_events_per_s']:,} events/s ({p['tailer_records_per_s']:,} records/s)",
                f"{p['raw_events_per_s']:,} events/s ({p['raw_records_per_s']:,} records/s, "
                f"{p['raw_mb_per_s']} MB/s) raw PutRecords",
                f"{p['ratio_to_raw']:.2f}",
                f">= 0.90: {_ok(p['meets_target'])}",
            )
        )
    for a in r["read_ahead"]:
        mode = "aggregated" if a["aggregate"] else "plain"
        rows.append(
            (
                f"relay loop into an endpoint answering each call in {a['call_ms']:g} ms, 4 shards {mode}:"
                f" next batch prepared during the call ({a['events']:,} events)",
                f"{a['read_ahead_events_per_s']:,} events/s",
                f"{a['without_events_per_s']:,} events/s: the same loop, read-ahead off",
                f"{a['ratio']:.2f}",
                "",
            )
        )
    for p in r["publish"]:
        if p["shards"] == r["publish"][-1]["shards"]:
            mode = "aggregated" if p["aggregate"] else "plain"
            rows.append(
                (
                    f"tailer into an instant endpoint, {p['shards']} shard(s) {mode} (CPU ceiling)",
                    f"{p['tailer_instant_events_per_s']:,} events/s",
                    "",
                    "",
                    "",
                )
            )
    rows.append(
        (
            "decode breakdown: rows fetched to Python / Python decode only",
            f"{d['fetch_events_per_s']:,} / {d['python_decode_events_per_s']:,} events/s",
            "",
            "",
            "",
        )
    )
    for lat in r["latency"]:
        mode = "aggregated" if lat["aggregate"] else "plain"
        missing = f", {lat['unacknowledged_after_20s']:,} unacked after 20 s" if lat["unacknowledged_after_20s"] else ""
        target = f"p99 <= 100 ms: {_ok(lat['meets_target'])}"
        ceiling = _raw_ceiling(r["publish"], lat)
        if ceiling is not None and ceiling < lat["target_rate_per_s"]:
            # Offered past what the endpoint takes from a raw client: the queue only grows.
            target += f" (offered past this endpoint's raw ceiling of {ceiling:,} events/s)"
        rows.append(
            (
                f"commit → acked, {lat['shards']} shard(s) {mode}, {lat['in_flight']} in flight, "
                f"{lat['achieved_rate_per_s']:,} events/s for {lat['events'] / lat['target_rate_per_s']:g} s "
                f"(poll {lat['poll_interval_ms']} ms)",
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms (max {lat['max_ms']}){missing}; "
                f"commit → handed to PutRecords p50 {lat['handed_p50_ms']} ms",
                f"PutRecords call p50 {lat['publish_call_p50_ms']} ms, p99 {lat['publish_call_p99_ms']} ms",
                "",
                target,
            )
        )
    small, full = m["small"], m["full"]
    rows.append(
        (
            f"tailer peak RSS, relay loop (aggregated, 5 ms calls), {small['events']:,} vs {full['events']:,} backlog",
            f"{small['peak_mib']} vs {full['peak_mib']} MiB",
            f"baseline before the relay {full['baseline_mib']} MiB",
            f"{m['peak_ratio_full_to_small']:.2f} (backlog ×{m['backlog_ratio']:g})",
            f"flat (<= 1.5×): {_ok(m['meets_target'])}",
        )
    )
    return rows


def _raw_ceiling(publish: list[dict[str, Any]], lat: dict[str, Any]) -> int | None:
    """Raw ``PutRecords`` events/s of the publish run with the latency run's shards and mode, if any."""
    for p in publish:
        if p["shards"] == lat["shards"] and p["aggregate"] == lat["aggregate"]:
            return int(p["raw_events_per_s"])
    return None


HEADER = ("measurement", "rate / figure", "raw baseline (same endpoint, same run)", "ratio", "target")


def markdown_table(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tagbus log tailer", show_lines=False)
    for name in HEADER:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(cell.replace("**", "") for cell in row))
    Console(width=200).print(table)


def run(quick: bool, *, server_url: str | None = None, reports_dir: Path | None = None) -> dict[str, Any]:
    """Run every measurement; returns the results (also printed and written under ``reports/``)."""
    sizes = QUICK if quick else FULL
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "quick": quick,
        "sizes": {"backlog": sizes.backlog, "small": sizes.small, "publish": sizes.publish, "txn_size": sizes.txn_size},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    quiet_collector()  # as the tailer process does once started
    with bench_server(server_url) as admin_url, bench_database(admin_url) as url:
        print(f"loading {sizes.backlog:,} events in transactions of {sizes.txn_size} into {BENCH_DB} …", flush=True)
        backlog = load_backlog(url, sizes)
        results["backlog"] = {
            "events": backlog.events,
            "transactions": backlog.transactions,
            "events_per_s": round(backlog.events / backlog.seconds),
        }
        with psycopg.connect(url) as conn:
            [(version,)] = conn.execute("SHOW server_version").fetchall()
        results["machine"]["postgresql"] = version
        results["decode"] = measure_decode(url, backlog, sizes)
        results["memory"] = measure_memory(url, backlog, sizes)
        results["read_ahead"] = measure_read_ahead(url, backlog, sizes)
        run_id = uuid.uuid4().hex[:6]
        with KinesisMock(f"bench-tailer-{run_id}-1", shards=1) as mock:
            client = mock.client()
            results["kinesis_endpoint"] = "kinesis-mock (npm kinesis-local), private instance on 127.0.0.1"
            prefix = f"bench-tailer-{run_id}"
            results["publish"] = measure_publish(url, backlog, sizes, client, prefix=prefix, shard_counts=(1, 4))
            results["latency"] = []
            # Flush what the backlog and the publish runs dirtied now, not in a timed checkpoint
            # (5 min after the load) in the middle of a latency run: twice today such a run saw
            # its own commits late by seconds, which no isolated rerun reproduced.
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
            # (shards, aggregated, seconds, batches in flight): the tailer's default of one, and
            # two once, the evidence for that default on this endpoint.
            runs = (
                (1, True, sizes.latency_seconds, DEFAULT_IN_FLIGHT),
                (4, True, sizes.plain_latency_seconds, DEFAULT_IN_FLIGHT),
                (4, True, sizes.plain_latency_seconds, 2),
                (4, False, sizes.plain_latency_seconds, DEFAULT_IN_FLIGHT),
            )
            for index, (shards, aggregate, seconds, in_flight) in enumerate(runs):
                with fresh_stream(client, prefix, shards) as stream:
                    results["latency"].append(
                        measure_latency(
                            url,
                            sizes,
                            client,
                            stream,
                            shards=shards,
                            aggregate=aggregate,
                            seconds=seconds,
                            first=LATENCY_FIRST * (index + 1),
                            in_flight=in_flight,
                        )
                    )
    results["on_paper"] = on_paper(results["decode"], results["publish"])
    rows = table_rows(results)
    results["table"] = markdown_table(rows)
    print_table(rows)
    print(results["on_paper"]["text"])
    reports = reports_dir or REPO_ROOT / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "bench-tailer.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python -m bench.tailer_bench" + (" --quick" if quick else "")
    lat = results["latency"][0]
    (reports / "bench-tailer.md").write_text(
        f"# Log tailer benchmarks\n\n`{command}` — {results['started_at']}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{version}, a private kinesis-mock on 127.0.0.1. Backlog {sizes.backlog:,} events in transactions of "
        f"{sizes.txn_size}; publish runs use the backlog's last {sizes.publish:,} events, "
        f"{sizes.publish_rounds} tailer run(s) between {sizes.publish_rounds + 1} raw runs "
        f"({sizes.aggregated_publish_rounds} between {sizes.aggregated_publish_rounds + 1} aggregated), rates from "
        f"the median times; latency: "
        f"single-event transactions at {lat['target_rate_per_s']:,.0f}/s from "
        f"{lat['inserter_connections']} paced connections, first {lat['warmup_seconds']:g} s excluded, tailer "
        f"poll interval {lat['poll_interval_ms']} ms. Each rate is next to its raw baseline from the same run "
        f"(the machine is shared; absolute rates drift).\n\n"
        + results["table"]
        + "\n\n"
        + results["on_paper"]["text"]
        + "\n"
    )
    return results


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    run(options.quick, server_url=options.server_url, reports_dir=options.reports_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tailer_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000-event backlog, 10 s latency run")
    parser.add_argument("--database-url", default=os.environ.get("TAGBUS_BENCH_DATABASE_URL"))
    parser.add_argument("--rss-child", metavar="SLOT", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.events)
        return 0
    from bench.__main__ import server_url

    run(args.quick, server_url=server_url(args.database_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
