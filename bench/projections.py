"""Projection throughput: replay and consumer apply rates against the raw write primitives.

Every rate is measured next to the raw ceiling of the write primitive it uses, on the same
endpoint in the same run (the machine is shared, so absolute rates drift):

1. **replay** of N events over K keys (full: 1,000,000 over 10,000; quick: 50,000 over
   1,000) from a database of its own (``tagbus_bench_proj``) into a fresh DynamoDB table
   generation, versus the raw rate of the request it writes with, ``TransactWriteItems`` of
   100 unconditional puts (same concurrency), with raw ``BatchWriteItem`` (25 a request)
   beside it for comparison. The replay's switch wait is 0 here: nothing else reads the
   bench's alias, and in production that wait is a constant few seconds, not a rate;
2. **consumer apply**: ``ConfigProjectionProcessor.process_records`` (decode, route,
   coalesce, ``TransactWriteItems`` of conditional puts, checkpoint) on batches of 100
   records, with distinct keys and with 10 versions per key per batch, versus raw
   ``TransactWriteItems`` of 100 conditional puts (the ratio) and raw conditional ``PutItem``
   calls (the one-by-one primitive, for comparison);
3. **SSM**: the SSM store's ``apply`` (``GetParameters`` per ten keys, then
   ``PutParameter``) versus raw ``PutParameter`` calls, distinct keys.

Usage: ``python -m bench.projections [--quick]`` or ``python -m bench --only projections``.
Results: printed, and written to ``reports/bench-projections.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bench import REPO_ROOT, BenchOptions
from consumers.deadletters import MemoryDeadLetterSink
from consumers.processor import ConfigProjectionProcessor
from kernel.envelope import CONFIG_SET, StoredEvent
from projections.replay import ReplayRunner
from projections.router import TagRouter
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.ssm import SSMConfigStore
from tagbus import aws
from tagbus import settings as settings_mod

BENCH_DB = "tagbus_bench_proj"
STACK_URL = "postgresql://tagbus:tagbus@127.0.0.1:55432/tagbus"
COPY_EVENTS = sql.SQL("COPY events ({}) FROM STDIN").format(
    sql.SQL(", ").join(
        map(sql.Identifier, ("event_id", "tenant_id", "stream_id", "version", "type", "source", "data", "digest"))
    )
)
TARGET_REPLAY_EVENTS_PER_S = 50_000
TARGET_APPLY_RATIO = 0.8
#: Raw and measured runs alternate this many times (the machine is shared).
ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Sizes:
    events: int
    keys: int
    tenants: int
    puts: int  # conditional PutItem / apply events
    ssm_puts: int
    write_concurrency: int = 4


FULL = Sizes(events=1_000_000, keys=10_000, tenants=10, puts=3_000, ssm_puts=600)
QUICK = Sizes(events=50_000, keys=1_000, tenants=10, puts=900, ssm_puts=210)


# --------------------------------------------------------------------------- setup


def _database(server_url: str, sizes: Sizes) -> str:
    """(Re)create the bench database, migrate it and load the events with COPY."""
    from devtools.postgres_cluster import apply_migrations, with_database

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    url = with_database(server_url, BENCH_DB)
    apply_migrations(url)
    per_tenant = sizes.keys // sizes.tenants
    with psycopg.connect(url) as conn, conn.cursor() as cur, cur.copy(COPY_EVENTS) as copy:
        for i in range(sizes.events):
            k = i % sizes.keys
            version = i // sizes.keys + 1
            key = f"tenantconfig:bench/k{k % per_tenant:05d}"
            data = orjson.dumps({"key": key, "value": {"n": i, "flag": i % 2 == 0}}).decode()
            copy.write_row((f"e{i}", f"tenant{k // per_tenant:02d}", key, version, CONFIG_SET, "/bench", data, "-"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")
    return url


def _drop_tables(client: Any, prefix: str) -> None:
    for name in client.list_tables(Limit=100)["TableNames"]:
        if name.startswith(prefix):
            client.delete_table(TableName=name)


def _item(tenant: str, key: str, version: int) -> dict[str, Any]:
    return {
        "pk": {"S": f"TENANT#{tenant}"},
        "sk": {"S": key},
        "version": {"N": str(version)},
        "position": {"N": "0"},
        "updated_at": {"S": "2024-05-01T12:00:00+00:00"},
        "deleted": {"BOOL": False},
        "value": {"S": '{"n":1,"flag":true}'},
    }


# --------------------------------------------------------------------------- measurements


def _raw_batch_write(client: Any, table: str, count: int, concurrency: int, label: str) -> float:
    """Items/s of unconditional BatchWriteItem, 25 a request, ``concurrency`` requests in flight."""
    requests = [{"PutRequest": {"Item": _item(label, f"tenantconfig:raw/k{i:06d}", 1)}} for i in range(count)]
    chunks = [requests[i : i + 25] for i in range(0, count, 25)]

    def send(chunk: list[dict[str, Any]]) -> None:
        pending = chunk
        while pending:
            pending = client.batch_write_item(RequestItems={table: pending}).get("UnprocessedItems", {}).get(table, [])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, chunks))
    return count / (time.perf_counter() - started)


def _transact_put(item: dict[str, Any], table: str, *, conditional: bool) -> dict[str, Any]:
    put: dict[str, Any] = {"TableName": table, "Item": item}
    if conditional:
        put |= {
            "ConditionExpression": "attribute_not_exists(#pk) OR #version < :version",
            "ExpressionAttributeNames": {"#pk": "pk", "#version": "version"},
            "ExpressionAttributeValues": {":version": item["version"]},
        }
    return {"Put": put}


def _raw_transact(client: Any, table: str, count: int, concurrency: int, label: str, *, conditional: bool) -> float:
    """Items/s of TransactWriteItems of 100 puts (conditional on version or not), distinct keys."""
    items = [_item(label, f"tenantconfig:tx/k{i:06d}", 1) for i in range(count)]
    chunks = [items[i : i + 100] for i in range(0, count, 100)]

    def send(chunk: list[dict[str, Any]]) -> None:
        client.transact_write_items(TransactItems=[_transact_put(i, table, conditional=conditional) for i in chunk])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, chunks))
    return count / (time.perf_counter() - started)


def _raw_conditional_put(client: Any, table: str, count: int, label: str) -> float:
    """Calls/s of sequential PutItem conditional on version, distinct keys (what the store does)."""
    items = [_item(label, f"tenantconfig:put/k{i:06d}", 1) for i in range(count)]
    started = time.perf_counter()
    for item in items:
        client.put_item(
            TableName=table,
            Item=item,
            ConditionExpression="attribute_not_exists(#pk) OR #version < :version",
            ExpressionAttributeNames={"#pk": "pk", "#version": "version"},
            ExpressionAttributeValues={":version": {"N": "1"}},
        )
    return count / (time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class _Record:
    binary_data: bytes
    sequence_number: str
    sub_sequence_number: int | None
    partition_key: str


class _NoCheckpoint:
    def checkpoint(self, sequence_number: str | None = None, sub_sequence_number: int | None = None) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Input:
    records: Sequence[_Record]
    checkpointer: _NoCheckpoint


def _records(tenant: str, count: int, versions_per_key: int, batch: int) -> list[list[_Record]]:
    """Kinesis-like records in batches: each key gets ``versions_per_key`` consecutive versions in a batch."""
    records: list[_Record] = []
    now = datetime.now(UTC)
    for i in range(count):
        k, version = divmod(i, versions_per_key)
        key = f"tenantconfig:apply/k{k:06d}"
        data = StoredEvent(
            id=f"a{i}",
            tenant=tenant,
            stream=key,
            version=version + 1,
            type=CONFIG_SET,
            source="/bench",
            recorded_at=now,
            data={"key": key, "value": {"n": i}},
            position=i + 1,
        ).to_record_data()
        records.append(_Record(data, f"{i:020d}", 0, f"{tenant}/{key}"))
    return [records[i : i + batch] for i in range(0, count, batch)]


def _consumer_apply(processor: ConfigProjectionProcessor, batches: list[list[_Record]]) -> float:
    """Events/s through ``process_records`` (decode, coalesce, conditional puts, checkpoint)."""
    started = time.perf_counter()
    for batch in batches:
        processor.process_records(_Input(batch, _NoCheckpoint()))
    events = sum(len(b) for b in batches)
    return events / (time.perf_counter() - started)


def _raw_put_parameter(client: Any, root: str, count: int, label: str) -> float:
    value = '{"v":"x","version":1,"position":0,"updated_at":"2024-05-01T12:00:00+00:00"}'
    started = time.perf_counter()
    for i in range(count):
        client.put_parameter(
            Name=f"{root}/raw{label}/p{i:05d}", Value=value, Type="String", Overwrite=True, Tier="Intelligent-Tiering"
        )
    return count / (time.perf_counter() - started)


def _ssm_apply(store: SSMConfigStore, count: int, label: str) -> float:
    from projections.model import ConfigChange, ConfigKey

    now = datetime.now(UTC)
    changes = [
        ConfigChange(f"apply{label}", ConfigKey("paramconfig", f"p{i:05d}"), "x", 1, 0, now) for i in range(count)
    ]
    started = time.perf_counter()
    for start in range(0, count, 100):
        result = store.apply(changes[start : start + 100])
        if not result.ok:
            raise RuntimeError(f"SSM apply failed: {result.failed[0].error}")
    return count / (time.perf_counter() - started)


def _delete_parameters(client: Any, root: str) -> None:
    names = [
        p["Name"]
        for page in client.get_paginator("get_parameters_by_path").paginate(Path=root, Recursive=True)
        for p in page.get("Parameters", [])
    ]
    for start in range(0, len(names), 10):
        client.delete_parameters(Names=names[start : start + 10])


# --------------------------------------------------------------------------- run


def run(quick: bool, *, server_url: str | None = None, reports_dir: Path | None = None) -> dict[str, Any]:
    """Run every measurement; returns the results (also printed and written under ``reports/``)."""
    sizes = QUICK if quick else FULL
    settings = settings_mod.load()
    dynamodb = aws.client(settings, "dynamodb", max_pool_connections=max(10, sizes.write_concurrency * 2))
    ssm = aws.client(settings, "ssm")
    run_id = uuid.uuid4().hex[:8]
    prefix = f"tagbus-bench-{run_id}"
    root = f"/tagbusbench{run_id}"
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "quick": quick,
        "sizes": {"events": sizes.events, "keys": sizes.keys, "puts": sizes.puts, "ssm_puts": sizes.ssm_puts},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "endpoints": {
            "dynamodb": settings.environ.get("AWS_ENDPOINT_URL_DYNAMODB", "aws"),
            "ssm": settings.environ.get("AWS_ENDPOINT_URL_SSM", "aws"),
        },
    }
    try:
        print(f"loading {sizes.events:,} events over {sizes.keys:,} keys into {BENCH_DB} …", flush=True)
        started = time.perf_counter()
        url = _database(server_url or STACK_URL, sizes)
        results["load_seconds"] = round(time.perf_counter() - started, 1)

        # 1. raw BatchWriteItem ceiling (before and after), and the replay between, same endpoint.
        raw_table = f"{prefix}-raw"
        DynamoDBConfigStore(dynamodb, table_name=raw_table, alias_table=None).ensure_table()
        raw_before = _raw_transact(dynamodb, raw_table, sizes.keys, sizes.write_concurrency, "a", conditional=False)
        batch_before = _raw_batch_write(dynamodb, raw_table, sizes.keys, sizes.write_concurrency, "ba")
        logical = f"{prefix}-cfg"
        store = DynamoDBConfigStore(dynamodb, table_name=logical, alias_table=f"{prefix}-aliases")
        store.ensure_table()
        runner = ReplayRunner(
            url,
            TagRouter({"tenantconfig": store}),
            rebuild=True,
            switch_wait=0.0,
            drop_after=0.0,
            write_concurrency=sizes.write_concurrency,
        )
        summary = runner.run()
        if summary.keys_written != sizes.keys:
            raise RuntimeError(f"replay wrote {summary.keys_written} keys, expected {sizes.keys}")
        raw_after = _raw_transact(dynamodb, raw_table, sizes.keys, sizes.write_concurrency, "b", conditional=False)
        batch_after = _raw_batch_write(dynamodb, raw_table, sizes.keys, sizes.write_concurrency, "bb")
        raw_bulk = (raw_before + raw_after) / 2
        write_rate = summary.keys_written / summary.write_seconds if summary.write_seconds else 0.0
        results["replay"] = {
            "events": summary.events_read,
            "keys": summary.keys_written,
            "seconds": round(summary.seconds, 2),
            "read_seconds": round(summary.read_seconds, 2),
            "write_seconds": round(summary.write_seconds, 2),
            "events_per_s": round(summary.events_per_second),
            "read_events_per_s": round(summary.events_read / summary.read_seconds),
            "write_keys_per_s": round(write_rate),
            "raw_transact_items_per_s": round(raw_bulk),
            "raw_transact_before_after": [round(raw_before), round(raw_after)],
            "raw_batch_write_items_per_s": round((batch_before + batch_after) / 2),
            "write_ratio_to_raw": round(write_rate / raw_bulk, 2),
            "events_ratio_to_raw": round(summary.events_per_second / raw_bulk, 2),
            "target_events_per_s": TARGET_REPLAY_EVENTS_PER_S,
            "meets_target": summary.events_per_second >= TARGET_REPLAY_EVENTS_PER_S,
        }

        # 2. consumer apply vs raw conditional PutItem, interleaved in rounds so that the
        # load of the shared machine hits both alike.
        put_table = f"{prefix}-put"
        DynamoDBConfigStore(dynamodb, table_name=put_table, alias_table=None).ensure_table()
        apply_store = DynamoDBConfigStore(dynamodb, table_name=put_table, alias_table=f"{prefix}-aliases")
        processor = ConfigProjectionProcessor(
            TagRouter({"tenantconfig": apply_store}), dead_letters=MemoryDeadLetterSink()
        )
        per_round = sizes.puts // ROUNDS
        spent = {"raw": 0.0, "transact": 0.0, "distinct": 0.0, "repeated": 0.0}
        for r in range(ROUNDS):
            spent["raw"] += per_round / _raw_conditional_put(dynamodb, put_table, per_round, f"r{r}")
            spent["transact"] += per_round / _raw_transact(dynamodb, put_table, per_round, 1, f"t{r}", conditional=True)
            spent["distinct"] += per_round / _consumer_apply(processor, _records(f"distinct{r}", per_round, 1, 100))
            spent["repeated"] += per_round / _consumer_apply(processor, _records(f"repeated{r}", per_round, 10, 100))
        if processor.stats.dead_lettered or processor.stats.outcomes.get("failed"):
            raise RuntimeError(f"apply failed: {processor.stats}")
        raw_put, raw_tx, distinct, repeated = (
            ROUNDS * per_round / spent[k] for k in ("raw", "transact", "distinct", "repeated")
        )
        results["apply"] = {
            "raw_conditional_put_per_s": round(raw_put),
            "raw_conditional_transact_items_per_s": round(raw_tx),
            "distinct_keys_events_per_s": round(distinct),
            "distinct_ratio_to_raw": round(distinct / raw_tx, 2),
            "distinct_ratio_to_put": round(distinct / raw_put, 2),
            "repeated_keys_events_per_s": round(repeated),
            "repeated_ratio_to_raw": round(repeated / raw_tx, 2),
            "batch": 100,
            "versions_per_key_when_repeated": 10,
            "rounds": ROUNDS,
            "target_ratio": TARGET_APPLY_RATIO,
            "meets_target": distinct / raw_tx >= TARGET_APPLY_RATIO and repeated > raw_tx,
        }

        # 3. SSM: raw PutParameter vs the store's read-compare-write, interleaved likewise.
        ssm_store = SSMConfigStore(ssm, root=root)
        per_round = sizes.ssm_puts // ROUNDS
        raw_spent = store_spent = 0.0
        for r in range(ROUNDS):
            raw_spent += per_round / _raw_put_parameter(ssm, root, per_round, f"r{r}")
            store_spent += per_round / _ssm_apply(ssm_store, per_round, f"r{r}")
        raw_ssm, ssm_rate = ROUNDS * per_round / raw_spent, ROUNDS * per_round / store_spent
        results["ssm"] = {
            "raw_put_parameter_per_s": round(raw_ssm),
            "store_apply_events_per_s": round(ssm_rate),
            "ratio_to_raw": round(ssm_rate / raw_ssm, 2),
            "target_ratio": TARGET_APPLY_RATIO,
            "meets_target": ssm_rate / raw_ssm >= TARGET_APPLY_RATIO,
        }
    finally:
        _drop_tables(dynamodb, prefix)
        _delete_parameters(ssm, root)
    results["table"] = _table(results)
    print(results["table"])
    reports = reports_dir or REPO_ROOT / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "bench-projections.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python -m bench.projections" + (" --quick" if quick else "")
    (reports / "bench-projections.md").write_text(
        f"# Projection benchmarks\n\n`{command}` — {results['started_at']}, {sizes.events:,} events over "
        f"{sizes.keys:,} keys, {os.cpu_count()} CPUs, DynamoDB Local and moto of the local stack.\n\n"
        + results["table"]
        + "\n"
    )
    return results


def _table(r: dict[str, Any]) -> str:
    rp, ap, ss = r["replay"], r["apply"], r["ssm"]

    def ok(flag: bool) -> str:
        return "yes" if flag else "**no**"

    rows = [
        (
            "replay (events/s, read + coalesce + write)",
            f"{rp['events_per_s']:,}",
            f"{rp['raw_transact_items_per_s']:,} items/s TransactWriteItems (100 puts)",
            f"{rp['events_ratio_to_raw']}",
            f">= 50,000/s: {ok(rp['meets_target'])}",
        ),
        (
            "replay write phase (keys/s)",
            f"{rp['write_keys_per_s']:,}",
            f"{rp['raw_transact_items_per_s']:,} items/s TransactWriteItems (100 puts); "
            f"BatchWriteItem: {rp['raw_batch_write_items_per_s']:,} items/s",
            f"{rp['write_ratio_to_raw']}",
            "",
        ),
        ("replay read phase (events/s)", f"{rp['read_events_per_s']:,}", "", "", ""),
        (
            "consumer apply, distinct keys (events/s)",
            f"{ap['distinct_keys_events_per_s']:,}",
            f"{ap['raw_conditional_transact_items_per_s']:,} items/s TransactWriteItems (100 conditional puts); "
            f"conditional PutItem: {ap['raw_conditional_put_per_s']:,}/s",
            f"{ap['distinct_ratio_to_raw']}",
            f">= 0.8: {ok(ap['distinct_ratio_to_raw'] >= TARGET_APPLY_RATIO)}",
        ),
        (
            "consumer apply, 10 versions/key/batch (events/s)",
            f"{ap['repeated_keys_events_per_s']:,}",
            f"{ap['raw_conditional_transact_items_per_s']:,} items/s TransactWriteItems (100 conditional puts)",
            f"{ap['repeated_ratio_to_raw']}",
            f"> 1: {ok(ap['repeated_ratio_to_raw'] > 1)}",
        ),
        (
            "SSM store apply, distinct keys (events/s)",
            f"{ss['store_apply_events_per_s']:,}",
            f"{ss['raw_put_parameter_per_s']:,} PutParameter/s",
            f"{ss['ratio_to_raw']}",
            f">= 0.8: {ok(ss['meets_target'])}",
        ),
    ]
    header = ("measurement", "rate", "raw ceiling (same endpoint, same run)", "ratio", "target")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    run(options.quick, server_url=options.server_url, reports_dir=options.reports_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.projections", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 events over 1,000 keys (< 1 minute)")
    parser.add_argument("--database-url", default=None, help=f"admin URL of the server (default: {STACK_URL})")
    args = parser.parse_args(argv)
    run(args.quick, server_url=args.database_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
