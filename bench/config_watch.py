"""Config delivery: reads from memory, push propagation, one server's scale, and TTL caches against the watch.

Runs against the local stack (``tagbus up``: bus, PostgreSQL, tailer, kinesis-mock, KCL
consumer, DynamoDB Local, moto and the config server). Every figure sits beside a baseline
measured in the same run, since the machine is shared and absolute figures drift:

1. **Reads** — the SDK's ``get`` from its memory (one thread) beside a plain ``dict`` lookup;
   gRPC ``Get`` on the config server (64 concurrent calls from ``grpc.aio``) beside gRPC health
   ``Check`` on the same server through the same client; ``GET /v1/config/{key}`` on the bus
   (``wrk``, 64 connections) beside the bus's ``/healthz``; raw DynamoDB ``GetItem`` and raw
   SSM ``GetParameter`` against the same emulators (boto3, 64 threads).
2. **Propagation** — bus ``201`` → the change delivered to a watcher, with 1, 100 and 1,000
   watchers (``grpc.aio`` streams in child processes) over 100 tenants, at 100 and 1,000
   changes/s; beside it, in the same run, ``201`` → the change readable by ``GET /v1/config``
   (today's read path) and the tailer's commit → Kinesis acknowledgement.
3. **Scale of one server process** — a private config server fed by a synthetic source
   (:mod:`bench.config_watch_server`): streams held, RSS per stream, deliveries per second,
   their delay and the server's CPU per delivered message.
4. **The trade-off** — TTL caches over ``GET /v1/config`` at 1, 10 and 60 s against the watch
   cache: staleness and read-model load (:mod:`bench.config_watch_tradeoff`).

Usage: ``python -m bench --only config_watch [--quick]`` or ``python -m bench.config_watch``.
Results: printed, and written to ``reports/bench-config-watch.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import REPO_ROOT, BenchOptions
from bench.config_watch_load import (
    PREFIX,
    Ledger,
    Tenant,
    bench_tenants,
    config_event,
    post_batch,
    run_load,
    seed,
    wait_visible,
)
from bench.config_watch_measure import (
    Metrics,
    ProcessSample,
    histogram_delta,
    histogram_quantile,
    machine_cpu_seconds,
    metric_sum,
    parse_metrics,
    summary,
)
from bench.config_watch_watchers import WatcherProcess, WatchSpec
from config_api.v1 import config_pb2, config_pb2_grpc
from config_client import ConfigCache
from projections.model import ConfigChange
from projections.stores.dynamodb import DynamoDBConfigStore
from tagbus import aws, compose, lifecycle
from tagbus import settings as settings_mod

WRK_SCRIPT = Path(__file__).with_name("wrk") / "get_config.lua"
CONFIG_SERVICE = "tagbus.config.v1.ConfigService"
PARAM_PREFIX = "paramconfig:cw/"
#: Targets the issue sets.
TARGET_PROPAGATION_P99_MS = 250.0
TARGET_TRADEOFF_LOAD = 0.01
#: The read-path probe polls ``GET /v1/config/{key}`` this often: each poll is a DynamoDB read
#: on the emulator the consumer writes to, so it is kept to one prober at 40 reads/s.
PROBE_POLL = 0.025


@dataclass(frozen=True, slots=True)
class Sizes:
    read_seconds: float
    read_keys: int
    watchers: tuple[int, ...]
    rates: tuple[float, ...]
    propagation_seconds: float
    propagation_warmup: float
    tenants: int = 100
    keys_per_tenant: int = 10


FULL = Sizes(
    read_seconds=10,
    read_keys=100,
    watchers=(1, 100, 1000),
    rates=(100, 1000),
    propagation_seconds=12,
    propagation_warmup=2,
)
QUICK = Sizes(
    read_seconds=2,
    read_keys=20,
    watchers=(1, 1000),
    rates=(100, 1000),
    propagation_seconds=4,
    propagation_warmup=1,
)


def _log(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- 1. reads


@dataclass(frozen=True, slots=True)
class ReadResult:
    name: str
    reads_per_s: float
    latency: dict[str, float]
    errors: int = 0
    client: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "read": self.name,
            "reads_per_s": self.reads_per_s,
            **{f"latency_{k}": v for k, v in self.latency.items()},
            "errors": self.errors,
            "client": self.client,
        }


def _memory_reads(name: str, get: Callable[[str], object], keys: Sequence[str], seconds: float) -> ReadResult:
    """Reads/s of ``get`` over ``keys`` in one thread, in rounds of 10,000 between clock reads."""
    count = 0
    started = time.perf_counter()
    n = len(keys)
    while (elapsed := time.perf_counter() - started) < seconds:
        for i in range(10_000):
            get(keys[i % n])
        count += 10_000
    rate = count / elapsed
    return ReadResult(name, rate, summary([]) | {"mean_ns": 1e9 / rate}, client="one thread, in process")


def _thread_reads(name: str, call: Callable[[int], None], seconds: float, threads: int = 64) -> ReadResult:
    """Reads/s and latency of ``call(i)`` from ``threads`` threads for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    deadline = time.perf_counter() + seconds

    def worker(w: int) -> None:
        i = w
        mine = latencies[w]
        while (now := time.perf_counter()) < deadline:
            try:
                call(i)
            except Exception:  # counted: a failed read is reported, not hidden
                errors[w] += 1
            mine.append(time.perf_counter() - now)
            i += threads

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    elapsed = time.perf_counter() - started
    flat = [x for part in latencies for x in part]
    return ReadResult(name, len(flat) / elapsed, summary(flat), sum(errors), client=f"boto3, {threads} threads")


async def _aio_reads(name: str, call: Callable[[int], Any], seconds: float, concurrency: int = 64) -> ReadResult:
    """Reads/s and latency of ``await call(i)`` from ``concurrency`` coroutines for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while (now := loop.time()) < deadline:
            try:
                await call(i)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(loop.time() - now)
            i += concurrency

    started = loop.time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = loop.time() - started
    return ReadResult(
        name, len(latencies) / elapsed, summary(latencies), errors, client=f"grpc.aio, {concurrency} calls"
    )


def _wrk(
    name: str,
    settings: settings_mod.Settings,
    tenant: Tenant,
    *,
    path: str,
    count: int,
    seconds: float,
    connections: int = 64,
) -> ReadResult:
    """Reads/s and latency of ``wrk`` GETs of ``path`` (+ ``%03d`` of 0..count-1) on the bus."""
    command = [
        "wrk", "-t", "2", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "-s", str(WRK_SCRIPT),
        settings.base_url, "--", tenant.token, path, str(count),
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((x for x in process.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {process.stdout}\n{process.stderr}")
    raw = orjson.loads(line[8:])
    errors = raw["non2xx"] + raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    latency = {
        "n": raw["requests"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }
    rate = raw["requests"] / (raw["duration_us"] / 1e6)
    return ReadResult(name, rate, latency, errors, f"wrk, 2 threads, {connections} connections")


async def _wait_served(stub: config_pb2_grpc.ConfigServiceAsyncStub, tenant: Tenant, key: str, version: int) -> None:
    metadata = (("authorization", f"Bearer {tenant.token}"),)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            answer = await stub.Get(config_pb2.GetRequest(key=key), metadata=metadata)
            if answer.entry.version >= version:
                return
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the config server did not serve {key} v{version} within 60 s")


async def reads_row(settings: settings_mod.Settings, tenant: Tenant, sizes: Sizes) -> list[dict[str, Any]]:
    keys = [f"{PREFIX}k{i:03d}" for i in range(sizes.read_keys)]
    params = [f"{PARAM_PREFIX}k{i:03d}" for i in range(sizes.read_keys)]
    seconds = sizes.read_seconds
    async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as bus:
        await seed(bus, [tenant], keys + params)
        await wait_visible(bus, tenant, keys[-1], 1)
        await wait_visible(bus, tenant, params[-1], 1)
    channels = [
        grpc.aio.insecure_channel(settings.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    stubs = [config_pb2_grpc.ConfigServiceStub(c) for c in channels]
    health = [health_pb2_grpc.HealthStub(c) for c in channels]
    metadata = (("authorization", f"Bearer {tenant.token}"),)
    await _wait_served(stubs[0], tenant, keys[-1], 1)
    # Each measured read beside the baseline it is compared with (``None``: it is a baseline).
    rows: list[tuple[ReadResult, str | None]] = []

    # SDK get from memory, beside a dict lookup of the same items in the same loop.
    with ConfigCache(settings.grpc_target, token=tenant.token, prefixes=[PREFIX]) as cache:
        cache.wait_ready(timeout=30)
        held = {key: cache.get(key) for key in keys}
        if any(item is None for item in held.values()):
            raise RuntimeError("the SDK cache does not hold every seeded key")
        rows.append((_memory_reads("dict.get of the same items", held.get, keys, seconds), None))
        rows.append((_memory_reads("SDK ConfigCache.get (memory)", cache.get, keys, seconds), rows[-1][0].name))

    def grpc_get(i: int) -> Any:
        return stubs[i % 4].Get(config_pb2.GetRequest(key=keys[i % len(keys)]), metadata=metadata)

    def grpc_check(i: int) -> Any:
        return health[i % 4].Check(health_pb2.HealthCheckRequest(service=CONFIG_SERVICE))

    rows.append((await _aio_reads("gRPC health Check (same server, same client)", grpc_check, seconds), None))
    rows.append((await _aio_reads("gRPC Get (config server memory)", grpc_get, seconds), rows[-1][0].name))
    for channel in channels:
        await channel.close(None)

    # The bus over HTTP (wrk), beside raw reads of the same stores.
    dynamodb = aws.client(settings, "dynamodb", max_pool_connections=64)
    ssm = aws.client(settings, "ssm", max_pool_connections=64)
    table = DynamoDBConfigStore(dynamodb).current_table()
    pk = {"S": f"TENANT#{tenant.name}"}

    def get_item(i: int) -> None:
        key = keys[i % len(keys)]
        if "Item" not in dynamodb.get_item(TableName=table, Key={"pk": pk, "sk": {"S": key}}, ConsistentRead=True):
            raise LookupError(key)

    def get_parameter(i: int) -> None:
        ssm.get_parameter(Name=f"/tagbus/{tenant.name}/cw/k{i % len(params):03d}")

    def http(name: str, path: str, count: int) -> ReadResult:
        return _wrk(name, settings, tenant, path=path, count=count, seconds=seconds)

    rows.append((http("bus GET /healthz (trivial endpoint)", "/healthz", 0), None))
    rows.append((_thread_reads("raw DynamoDB GetItem (consistent)", get_item, seconds), None))
    rows.append((http("bus GET /v1/config/{key}, tenantconfig", f"/v1/config/{PREFIX}k", len(keys)), rows[-1][0].name))
    rows.append((_thread_reads("raw SSM GetParameter", get_parameter, seconds), None))
    rows.append(
        (http("bus GET /v1/config/{key}, paramconfig", f"/v1/config/{PARAM_PREFIX}k", len(params)), rows[-1][0].name)
    )
    by_name = {r.name: r for r, _ in rows}
    out = []
    for measured, baseline in rows:
        row = measured.to_json() | {"baseline": baseline}
        if baseline is not None:
            row["ratio_to_baseline"] = measured.reads_per_s / by_name[baseline].reads_per_s
        out.append(row)
        _log(
            f"  {measured.name}: {measured.reads_per_s:,.0f}/s p99 {measured.latency['p99_ms']:.2f} ms, "
            f"{measured.errors} errors ({measured.client})"
        )
    return out


# --------------------------------------------------------------------------- 2. propagation


@dataclass
class _Probes:
    """201 → visible through ``GET /v1/config``: today's read path, timed in the same run."""

    samples: list[float]
    late: int = 0


async def _probe_read_path(
    bus: httpx.AsyncClient, tenant: Tenant, stop: asyncio.Event, probes: _Probes, *, slot: int, timeout: float = 10.0
) -> None:
    n = 0
    ledger = Ledger()
    while not stop.is_set():
        key = f"{PREFIX}probe{slot}-{n % 4}"
        results = await post_batch(bus, tenant, [config_event(key, n)], ledger)
        n += 1
        if not results:
            continue
        acked = ledger.acked[(tenant.name, key, results[0]["version"])]
        while time.time() - acked < timeout:
            got = await bus.get(f"/v1/config/{key}", headers=tenant.headers)
            if got.status_code == 200 and got.json()["version"] >= results[0]["version"]:
                probes.samples.append(time.time() - acked)
                break
            await asyncio.sleep(PROBE_POLL)
        else:
            probes.samples.append(timeout)
            probes.late += 1
        await asyncio.sleep(0.1)


async def _scrape(client: httpx.AsyncClient, url: str) -> Metrics:
    try:
        return parse_metrics((await client.get(url, timeout=5)).text)
    except httpx.HTTPError:
        return {}


def _histograms(before: Metrics, after: Metrics, *, contains: str) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) and count of every ``*_seconds`` histogram whose name has ``contains``, between two scrapes."""
    names = {n[: -len("_bucket")] for (n, _) in after if n.endswith("_seconds_bucket") and contains in n}
    out = {}
    for name in sorted(names):
        buckets = histogram_delta(before, after, name)
        count = max(buckets.values()) if buckets else 0.0
        if count > 0:
            out[name] = {
                "count": count,
                "p50_ms": 1000 * histogram_quantile(buckets, 0.5),
                "p99_ms": 1000 * histogram_quantile(buckets, 0.99),
            }
    return out


def _pid(settings: settings_mod.Settings, part: str) -> int | None:
    try:
        return int((settings.home / "run" / f"{part}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _sample(pid: int | None) -> ProcessSample | None:
    """The process's figures, or ``None`` if it is gone (a shared stack's part may be restarted)."""
    if pid is None:
        return None
    try:
        return ProcessSample.of(pid)
    except (OSError, StopIteration):
        return None


class _ShadowSink:
    """Records when a Kinesis change source, the server's own code, applies each change of this run.

    A second reader of the stream in the bench process, beside the server: it shows the
    Kinesis → server stage, which the server does not time per change.
    """

    def __init__(self, tenant_prefix: str) -> None:
        self._prefix = tenant_prefix
        #: ``(tenant, key, version)`` → seconds from the change's ``recorded_at`` to its ``apply``.
        self.applied: dict[tuple[str, str, int], float] = {}
        self.ready = threading.Event()
        self.failures = 0

    def load(self, entries: Iterable[ConfigChange]) -> None:
        for _ in entries:
            pass

    def apply(self, changes: Sequence[ConfigChange]) -> None:
        now = time.time()
        for change in changes:
            if change.tenant.startswith(self._prefix):
                key = (change.tenant, str(change.key), change.version)
                self.applied.setdefault(key, now - change.updated_at.timestamp())

    def caught_up(self, *, lag_ms: int) -> None:
        self.ready.set()

    def source_failed(self, error: Exception) -> None:
        self.failures += 1


@contextlib.contextmanager
def _shadow_source(settings: settings_mod.Settings, tenant_prefix: str) -> Iterator[_ShadowSink]:
    sink = _ShadowSink(tenant_prefix)
    stop = threading.Event()
    source = compose.config_source(settings, compose.build_router(settings))
    thread = threading.Thread(target=source.run, args=(sink, stop), name="shadow-source", daemon=True)
    thread.start()
    try:
        if not sink.ready.wait(120):
            raise TimeoutError("the shadow Kinesis source did not catch up within 120 s")
        yield sink
    finally:
        stop.set()
        thread.join(30)


@dataclass(frozen=True, slots=True)
class _Phase:
    """One rate of one watcher count, as measured while it ran (deliveries are matched afterwards)."""

    rate: float
    ledger: Ledger
    probes: _Probes
    before: tuple[Metrics, Metrics]
    after: tuple[Metrics, Metrics]
    server_before: ProcessSample | None
    server_after: ProcessSample | None
    watcher_cpu_seconds: float
    machine_cpu_seconds: float
    #: Seconds the CPU figures cover (the load, from just before it to just after it).
    cpu_window: float


async def propagation_row(settings: settings_mod.Settings, sizes: Sizes, run: str) -> list[dict[str, Any]]:
    assert settings.auth.jwt_secret
    tenants = bench_tenants(settings.auth.jwt_secret, run, sizes.tenants)
    probe_tenant = bench_tenants(settings.auth.jwt_secret, f"{run}probe", 1)[0]
    keys = [f"{PREFIX}k{i:03d}" for i in range(sizes.keys_per_tenant)]
    # Blocks the loop while the shadow source snapshots the read models: nothing else runs yet.
    with _shadow_source(settings, f"cw-{run}-") as shadow:
        rows = await _propagation(settings, sizes, tenants=tenants, probe_tenant=probe_tenant, keys=keys, shadow=shadow)
    return rows


async def _propagation(
    settings: settings_mod.Settings,
    sizes: Sizes,
    *,
    tenants: list[Tenant],
    probe_tenant: Tenant,
    keys: list[str],
    shadow: _ShadowSink,
) -> list[dict[str, Any]]:
    tailer_url = f"http://127.0.0.1:{settings.environ.get('TAGBUS_TAILER_METRICS_PORT', '9464')}/metrics"
    server_url = f"{settings.config_base_url}/metrics"
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=settings.base_url, timeout=30, limits=limits) as bus:
        await seed(bus, tenants, keys)
        await wait_visible(bus, tenants[-1], keys[-1], 1)
        for count in sizes.watchers:
            streams = [(tenants[i % len(tenants)].name, [PREFIX]) for i in range(count)]
            per_tenant: dict[str, int] = {}
            for tenant_name, _ in streams:
                per_tenant[tenant_name] = per_tenant.get(tenant_name, 0) + 1
            processes = 1 if count <= 200 else 2
            tokens = {t.name: t.token for t in tenants if t.name in per_tenant}
            specs = [
                WatchSpec(settings.grpc_target, tokens, streams[p::processes], channels=4) for p in range(processes)
            ]
            watchers = [WatcherProcess(spec) for spec in specs]
            try:
                ready = await asyncio.gather(*(loop.run_in_executor(None, w.wait_ready) for w in watchers))
                _log(f"  {count} watchers ready in {max(ready):.1f} s ({processes} process(es))")
                phases: list[_Phase] = []
                for rate in sizes.rates:
                    before = (await _scrape(bus, tailer_url), await _scrape(bus, server_url))
                    stop = asyncio.Event()
                    probes = _Probes([])
                    prober = asyncio.create_task(_probe_read_path(bus, probe_tenant, stop, probes, slot=0))
                    try:
                        server_pid = _pid(settings, "config")
                        cpu_before = _sample(server_pid)
                        watchers_before = [ProcessSample.of(w.pid) for w in watchers]
                        machine_before = machine_cpu_seconds()
                        wall = time.monotonic()
                        ledger = await run_load(
                            bus,
                            tenants,
                            rate=rate,
                            seconds=sizes.propagation_warmup + sizes.propagation_seconds,
                            keys_per_tenant=sizes.keys_per_tenant,
                        )
                        # CPU over the load alone (the prober may still wait for its last probe).
                        cpu_after = _sample(server_pid) if cpu_before else None
                        machine = machine_cpu_seconds() - machine_before
                        watcher_cpu = sum(
                            ProcessSample.of(w.pid).cpu_seconds - b.cpu_seconds
                            for w, b in zip(watchers, watchers_before, strict=True)
                        )
                        wall = time.monotonic() - wall
                    finally:
                        stop.set()
                        await prober
                    await asyncio.sleep(3.0)  # deliveries still in flight
                    after = (await _scrape(bus, tailer_url), await _scrape(bus, server_url))
                    phases.append(
                        _Phase(rate, ledger, probes, before, after, cpu_before, cpu_after, watcher_cpu, machine, wall)
                    )
                    _log(f"    {rate:g} changes/s: {ledger.achieved_rate:,.0f}/s posted, {ledger.failed} failed")
                records = [w.stop() for w in watchers]
            except BaseException:
                for w in watchers:
                    w.kill()
                raise
            deliveries = [d for r in records for d in r.deliveries()]
            errors: dict[str, int] = {}
            for r in records:
                for code, n in r.errors.items():
                    errors[code] = errors.get(code, 0) + n
            for phase in phases:
                rate, ledger, probes = phase.rate, phase.ledger, phase.probes
                cpu_before, cpu_after = phase.server_before, phase.server_after
                counted_from = ledger.started + sizes.propagation_warmup
                window = ledger.ended - counted_from
                counted = {k: t for k, t in ledger.acked.items() if t >= counted_from}
                expected = sum(per_tenant.get(tenant, 0) for tenant, _, _ in counted)
                from_ack: list[float] = []
                from_commit: list[float] = []
                bus_stage: dict[tuple[str, str, int], float] = {}
                for tenant_name, key, version, received, updated in deliveries:
                    acked = counted.get((tenant_name, key, version))
                    if acked is not None:
                        from_ack.append(received - acked)
                        from_commit.append(received - updated)
                        bus_stage[(tenant_name, key, version)] = acked - updated
                to_source = [shadow.applied[k] for k in counted if k in shadow.applied]
                server_cpu = (
                    cpu_after.cpu_seconds - cpu_before.cpu_seconds if cpu_before is not None and cpu_after else math.nan
                )
                seconds = ledger.seconds
                row = {
                    "watchers": count,
                    "tenants": len(tenants),
                    "watcher_processes": len(watchers),
                    "target_rate": rate,
                    "achieved_rate": ledger.achieved_rate,
                    "failed": ledger.failed,
                    "requests_per_s": ledger.requests / seconds if seconds else math.nan,
                    "late_slots": ledger.late_slots,
                    "generator_cpu_cores": ledger.cpu_seconds / phase.cpu_window,
                    "post": summary(ledger.post_seconds),
                    "window_s": window,
                    "deliveries_expected": expected,
                    "deliveries_matched": len(from_ack),
                    "deliveries_per_s": len(from_ack) / window if window > 0 else math.nan,
                    "ack_to_watcher": summary(from_ack),
                    "commit_to_watcher": summary(from_commit),
                    "recorded_to_201": summary(list(bus_stage.values())),
                    "commit_to_source_apply": summary(to_source),
                    "shadow_source_failures": shadow.failures,
                    "baseline_ack_to_get_visible": summary(probes.samples) | {"late": probes.late},
                    "commit_to_kinesis_ack": _histograms(phase.before[0], phase.after[0], contains="commit_to_ack"),
                    "server_deliveries": metric_sum(phase.after[1], "config_server_deliveries_total")
                    - metric_sum(phase.before[1], "config_server_deliveries_total"),
                    "server_source_lag_s_after": metric_sum(phase.after[1], "config_server_source_lag_seconds"),
                    "server_cpu_cores": server_cpu / phase.cpu_window,
                    "server_rss_mib": cpu_after.rss_bytes / 2**20 if cpu_after else math.nan,
                    "watcher_cpu_cores": phase.watcher_cpu_seconds / phase.cpu_window,
                    "machine_busy_cores": phase.machine_cpu_seconds / phase.cpu_window,
                    "watch_errors": errors,
                    "resyncs": sum(r.resyncs for r in records),
                }
                rows.append(row)
                pushed, polled = summary(from_ack), summary(probes.samples)
                _log(
                    f"  {count} watchers, {rate:g}/s: 201→watcher p50 {pushed['p50_ms']:.0f} ms "
                    f"p99 {pushed['p99_ms']:.0f} ms; {len(from_ack)}/{expected} delivered; "
                    f"201→GET p99 {polled['p99_ms']:.0f} ms"
                )
    return rows


# --------------------------------------------------------------------------- 3. scale of one server


@dataclass(frozen=True, slots=True)
class ScaleSizes:
    tenants: int
    watchers_per_tenant: int
    #: Deliveries per second to try, in turn (changes/s = deliveries / watchers per tenant).
    deliveries: tuple[int, ...]
    seconds: float
    keys: int = 10
    processes: int = 2
    channels: int = 8


SCALE_FULL = ScaleSizes(tenants=1000, watchers_per_tenant=10, deliveries=(1_000, 5_000, 10_000), seconds=10)
SCALE_QUICK = ScaleSizes(tenants=200, watchers_per_tenant=10, deliveries=(1_000, 2_000), seconds=3)


@dataclass(frozen=True, slots=True)
class _Step:
    """One delivery rate of the scale row, as measured while it ran."""

    deliveries: int
    rate: float
    started: float
    ended: float
    before: ProcessSample
    after: ProcessSample
    made: int
    watcher_cpu_seconds: float
    machine_cpu_seconds: float


async def scale_row(settings: settings_mod.Settings, sizes: ScaleSizes, run: str) -> dict[str, Any]:
    from bench.config_watch_server import ServerProcess, ServerSpec

    assert settings.auth.jwt_secret
    tenants = bench_tenants(settings.auth.jwt_secret, f"{run}scale", sizes.tenants)
    server = ServerProcess(
        ServerSpec(
            tenants=[t.name for t in tenants],
            keys=sizes.keys,
            jwt_secret=settings.auth.jwt_secret,
            audience=settings.auth.audience,
            max_streams_per_tenant=max(1_000, sizes.watchers_per_tenant),
        )
    )
    loop = asyncio.get_running_loop()
    watchers: list[WatcherProcess] = []
    try:
        await asyncio.sleep(1.0)  # the synthetic snapshot is loaded
        idle = ProcessSample.of(server.pid)
        streams = [(t.name, [PREFIX]) for t in tenants for _ in range(sizes.watchers_per_tenant)]
        tokens = {t.name: t.token for t in tenants}
        watchers = [
            WatcherProcess(WatchSpec(server.target, tokens, streams[p :: sizes.processes], channels=sizes.channels))
            for p in range(sizes.processes)
        ]
        ready = await asyncio.gather(*(loop.run_in_executor(None, w.wait_ready) for w in watchers))
        await asyncio.sleep(1.0)
        held = ProcessSample.of(server.pid)
        _log(
            f"  {len(streams)} streams held in {max(ready):.1f} s; server RSS "
            f"{idle.rss_bytes / 2**20:.0f} → {held.rss_bytes / 2**20:.0f} MiB"
        )
        steps: list[_Step] = []
        for deliveries in sizes.deliveries:
            rate = deliveries / sizes.watchers_per_tenant
            before = ProcessSample.of(server.pid)
            watcher_before = [ProcessSample.of(w.pid) for w in watchers]
            machine_before = machine_cpu_seconds()
            started = time.time()
            made_before = server.set_rate(rate)
            await asyncio.sleep(sizes.seconds)
            made_after = server.set_rate(0)
            ended = time.time()
            after = ProcessSample.of(server.pid)
            machine = machine_cpu_seconds() - machine_before
            watcher_cpu = sum(
                ProcessSample.of(w.pid).cpu_seconds - b.cpu_seconds
                for w, b in zip(watchers, watcher_before, strict=True)
            )
            await asyncio.sleep(2.0)  # deliveries still in flight
            steps.append(
                _Step(deliveries, rate, started, ended, before, after, made_after - made_before, watcher_cpu, machine)
            )
            _log(f"    {deliveries:,} deliveries/s asked ({rate:g} changes/s): made {made_after - made_before:,}")
        records = [w.stop() for w in watchers]
        watchers = []
    finally:
        for w in watchers:
            w.kill()
        server.stop()
    received = [(r[3], r[4]) for rec in records for r in rec.changes]
    errors: dict[str, int] = {}
    for rec in records:
        for code, n in rec.errors.items():
            errors[code] = errors.get(code, 0) + n
    out_steps = []
    for step in steps:
        delays = [got - stamped for got, stamped in received if step.started <= stamped <= step.ended]
        seconds = step.ended - step.started
        cpu = step.after.cpu_seconds - step.before.cpu_seconds
        out_steps.append(
            {
                "target_deliveries_per_s": step.deliveries,
                "changes_per_s": step.rate,
                "changes_made": step.made,
                "deliveries_expected": step.made * sizes.watchers_per_tenant,
                "deliveries_received": len(delays),
                "deliveries_per_s": len(delays) / seconds,
                "delay": summary(delays),
                "server_cpu_cores": cpu / seconds,
                "server_cpu_us_per_delivery": 1e6 * cpu / len(delays) if delays else math.nan,
                "server_rss_mib": step.after.rss_bytes / 2**20,
                "watcher_cpu_cores": step.watcher_cpu_seconds / seconds,
                "machine_busy_cores": step.machine_cpu_seconds / seconds,
            }
        )
        delay = summary(delays)
        _log(
            f"  {len(delays) / seconds:,.0f} deliveries/s: delay p50 {delay['p50_ms']:.0f} ms "
            f"p99 {delay['p99_ms']:.0f} ms, server {cpu / seconds:.2f} cores, "
            f"{1e6 * cpu / max(1, len(delays)):.0f} µs CPU per delivery"
        )
    return {
        "streams": len(streams),
        "tenants": sizes.tenants,
        "watcher_processes": sizes.processes,
        "ready_s": max(ready),
        "server_rss_idle_mib": idle.rss_bytes / 2**20,
        "server_rss_streams_mib": held.rss_bytes / 2**20,
        "rss_per_stream_kib": (held.rss_bytes - idle.rss_bytes) / len(streams) / 1024,
        "watch_errors": errors,
        "resyncs": sum(r.resyncs for r in records),
        "steps": out_steps,
    }


# --------------------------------------------------------------------------- run and report

ROWS = ("reads", "propagation", "scale", "tradeoff")


async def _tradeoff(settings: settings_mod.Settings, quick: bool, run: str) -> dict[str, Any]:
    from bench import config_watch_tradeoff as tradeoff

    sizes = tradeoff.QUICK if quick else tradeoff.FULL
    assert settings.auth.jwt_secret
    tenants = bench_tenants(settings.auth.jwt_secret, f"{run}ttl", sizes.tenants)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=settings.base_url, timeout=30, limits=limits) as bus:
        return await tradeoff.measure(
            sizes,
            bus=bus,
            tenants=tenants,
            grpc_target=settings.grpc_target,
            database_url=settings.database_url,
            log=_log,
        )


ROW_TITLES = {
    "reads": "reads:",
    "propagation": "propagation:",
    "scale": "scale of one server process (private server, synthetic source):",
    "tradeoff": "trade-off, TTL caches against the watch cache:",
}


def run(
    quick: bool,
    *,
    reports_dir: Path,
    rows: Sequence[str] = ROWS,
    start_stack: bool = True,
    merge: bool = False,
) -> dict[str, Any]:
    """Measure ``rows`` and write the report; ``merge`` keeps the other rows of the existing report."""
    if start_stack:
        lifecycle.up()
    settings = settings_mod.load()
    assert settings.auth.jwt_secret, "the local stack's JWT secret (.tagbus/env)"
    sizes = QUICK if quick else FULL
    run_id = uuid.uuid4().hex[:6]
    previous = reports_dir / "bench-config-watch.json"
    result: dict[str, Any] = orjson.loads(previous.read_bytes()) if merge and previous.is_file() else {}
    if result.get("quick", quick) != quick:
        raise ValueError("--merge into a report of the other mode (quick / full)")
    result |= {"quick": quick, "host": platform.node(), "cpus": os.cpu_count()}
    result.setdefault("runs", {})
    measure: dict[str, Callable[[], Any]] = {
        "reads": lambda: reads_row(
            settings, bench_tenants(settings.auth.jwt_secret or "", f"{run_id}read", 1)[0], sizes
        ),
        "propagation": lambda: propagation_row(settings, sizes, run_id),
        "scale": lambda: scale_row(settings, SCALE_QUICK if quick else SCALE_FULL, run_id),
        "tradeoff": lambda: _tradeoff(settings, quick, run_id),
    }
    for row in ROWS:
        if row not in rows:
            continue
        _log(ROW_TITLES[row])
        meta: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_at_start": os.getloadavg(),
        }
        config_pid = _pid(settings, "config")
        result[row] = asyncio.run(measure[row]())
        meta |= {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_at_end": os.getloadavg(),
            "config_server_pids": [config_pid, _pid(settings, "config")],
        }
        result["runs"][row] = meta
    _report(result, reports_dir)
    return result


def _ms(cell: dict[str, float], key: str = "p99_ms") -> str:
    value = cell.get(key, math.nan)
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _pair(cell: dict[str, float]) -> str:
    return f"{_ms(cell, 'p50_ms')} / {_ms(cell, 'p99_ms')}"


def _reads_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Reads",
        "",
        "| read | client | reads/s | p50 ms | p99 ms | errors | compared with | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['ratio_to_baseline']:,.2f}×" if "ratio_to_baseline" in row else "(baseline)"
        p50 = _ms({"p50_ms": row["latency_p50_ms"]}, "p50_ms")
        if "latency_mean_ns" in row:
            p50 = f"({row['latency_mean_ns']:.0f} ns each)"
        lines.append(
            f"| {row['read']} | {row['client']} | {row['reads_per_s']:,.0f} "
            f"| {p50} | {_ms({'p99_ms': row['latency_p99_ms']})} "
            f"| {row['errors']} | {row['baseline'] or ''} | {ratio} |"
        )
    lines += [
        "",
        "Memory reads run in one thread, in rounds of 10,000 between clock reads (no latency per read). The gRPC "
        "rows are bounded by the Python client on this 2-core machine as much as by the server: the health "
        "`Check` through the same client is the ceiling of that client. The raw store rows are boto3 from 64 "
        "threads in one process (the GIL bounds them too); the bus rows are `wrk` (C, 2 threads, 64 connections).",
    ]
    return lines


def _propagation_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Propagation: bus 201 → change delivered to a watcher",
        "",
        "| watchers | changes/s (achieved) | delivered / expected | 201 → watcher p50 / p99 ms "
        "| baseline: 201 → readable by `GET /v1/config` p50 / p99 ms | p99 ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row["baseline_ack_to_get_visible"]
        ratio = row["ack_to_watcher"]["p99_ms"] / base["p99_ms"] if base["n"] else math.nan
        lines.append(
            f"| {row['watchers']:,} | {row['target_rate']:,.0f} ({row['achieved_rate']:,.0f}) "
            f"| {row['deliveries_matched']:,} / {row['deliveries_expected']:,} | {_pair(row['ack_to_watcher'])} "
            f"| {_pair(base)} ({base['n']} probes, {base['late']} late) | {ratio:.2f} |"
        )
    lines += [
        "",
        "Where the time goes (p50 / p99 ms) and what it cost (CPU cores over the run):",
        "",
        "| watchers | changes/s | POST (batch) | recorded → 201 (bus) | commit → Kinesis ack (tailer) "
        "| commit → source apply (shadow source) | commit → watcher | ≈ server → watcher (p50) | config server "
        "| watcher processes | generator | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kin: dict[str, float] = next(iter(row["commit_to_kinesis_ack"].values()), {})
        rest = row["commit_to_watcher"]["p50_ms"] - row["commit_to_source_apply"]["p50_ms"]
        lines.append(
            f"| {row['watchers']:,} | {row['target_rate']:,.0f} | {_pair(row['post'])} "
            f"| {_pair(row['recorded_to_201'])} "
            f"| {_pair(kin) if kin else '-'} | {_pair(row['commit_to_source_apply'])} "
            f"| {_pair(row['commit_to_watcher'])} | {_ms({'p50_ms': rest}, 'p50_ms')} "
            f"| {row['server_cpu_cores']:.2f} | {row['watcher_cpu_cores']:.2f} | {row['generator_cpu_cores']:.2f} "
            f"| {row['machine_busy_cores']:.2f} of {os.cpu_count()} |"
        )
    first = rows[0] if rows else {}
    lines += [
        "",
        f"Each run posts for {first.get('window_s', 0):.0f} s after a short warm-up that is not counted (changes "
        f"acknowledged during it are left out). {first.get('tenants', 100)} tenants; watcher *i* watches tenant "
        "*i* mod 100 (prefix `tenantconfig:cw/`), so with 1,000 watchers each change goes to 10 of them; watchers "
        "are `grpc.aio` streams in one or two child processes. Each delivery is matched to the 201 of its post by "
        "(tenant, key, version). The load posts one batch per tenant per second (10 changes at 1,000/s, 1 at "
        "100/s: 100 requests/s to the bus); *generator* is the bench process (load and probe). The baseline probe "
        "posts to a tenant no one watches and polls `GET /v1/config/{key}` every "
        f"{1000 * PROBE_POLL:.0f} ms until the new version shows (today's read path), in the same run.",
        "",
        "Stages: *recorded → 201* is the bus from the event's `recorded_at` (its insert) to the answer read by the "
        "generator; *commit → Kinesis ack* is the tailer's own histogram over the run (bucket-interpolated); "
        "*commit → source apply* is a second `KinesisChangeSource` (the server's own code, with its own shard "
        "iterators) run in the bench process, timed from `recorded_at` to its `sink.apply`: the config server "
        "exposes no per-change timing, so this shadow reader stands for the server's Kinesis → memory stage (it "
        "polls each shard every 200 ms when idle, the KCL's minimum, so about 100 ms of it is the poll on "
        "average); *commit → watcher* is from `recorded_at` (the change's `updated_at`) to the watcher reading "
        "it, and *server → watcher* the difference of the two p50s (the scale row below times it alone). A 201 "
        "is timed when the generator reads it: on a saturated machine the generator's loop reads some answers "
        "late, after the watcher already had the change, which pulls the low percentiles of *201 → watcher* "
        "towards (or below) zero; *commit → watcher* has no such skew.",
    ]
    return lines


def _scale_md(scale: dict[str, Any]) -> list[str]:
    lines = [
        "## Scale of one config server process",
        "",
        f"A private config server in its own process, fed by a synthetic in-process source (so the pipeline in "
        f"front of it does not bound it): {scale['streams']:,} watch streams over {scale['tenants']:,} tenants from "
        f"{scale['watcher_processes']} client processes (`grpc.aio`, a few channels each), held in "
        f"{scale['ready_s']:.1f} s. Server RSS {scale['server_rss_idle_mib']:.0f} MiB before the streams, "
        f"{scale['server_rss_streams_mib']:.0f} MiB with them: **{scale['rss_per_stream_kib']:.1f} KiB per stream**. "
        f"Errors: {scale['watch_errors'] or 'none'}; resyncs: {scale['resyncs']}.",
        "",
        "| deliveries/s asked | changes/s | delivered/s | delivered / expected | delay p50 / p99 / max ms "
        "| server CPU | server CPU per delivery | server RSS | watcher processes' CPU | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in scale["steps"]:
        lines.append(
            f"| {step['target_deliveries_per_s']:,} | {step['changes_per_s']:,.0f} | {step['deliveries_per_s']:,.0f} "
            f"| {step['deliveries_received']:,} / {step['deliveries_expected']:,} "
            f"| {_pair(step['delay'])} / {_ms(step['delay'], 'max_ms')} | {step['server_cpu_cores']:.2f} cores "
            f"| {step['server_cpu_us_per_delivery']:.0f} µs | {step['server_rss_mib']:.0f} MiB "
            f"| {step['watcher_cpu_cores']:.2f} cores | {step['machine_busy_cores']:.2f} of {os.cpu_count()} cores |"
        )
    lines += [
        "",
        "Delay is from the moment the synthetic source made the change to the moment a watcher process read it "
        "(the server's fan-out, gRPC and the watcher's own loop); the clients share the machine's 2 cores with "
        "the server, so at the top step the client processes' CPU is part of what bounds it.",
    ]
    return lines


def _tradeoff_md(tradeoff: dict[str, Any]) -> list[str]:
    sizes = tradeoff["sizes"]
    kinds = tradeoff["kinds"]
    ttl1 = next((k for k in kinds if k["cache"] == "TTL 1 s"), None)
    lines = [
        "## The trade-off: TTL caches over `GET /v1/config` against the watch cache",
        "",
        f"{sizes['services']} services, each holding {sizes['tenants_per_service']} of {sizes['tenants']} tenants "
        f"({sizes['keys_per_tenant']} keys each), {sizes['rate']:g} changes/s "
        f"(achieved {tradeoff['load']['achieved_rate']:.1f}/s) over all keys; every cache kind runs side by side over "
        f"the same changes; {sizes['warmup_s']:g} s warm-up, then {sizes['window_s']:.0f} s sampled.",
        "",
        "| cache | samples | stale | staleness p50 / p99 / max ms | mean ms | read-model requests/s "
        "| load vs TTL 1 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        load = kind["read_model_requests_per_s"]
        versus = (
            f"{load / ttl1['read_model_requests_per_s']:.2%}" if ttl1 and ttl1["read_model_requests_per_s"] else "-"
        )
        lines.append(
            f"| {kind['cache']} | {kind['samples']:,} | {kind['stale_fraction']:.1%} "
            f"| {_pair(kind['staleness'])} / {_ms(kind['staleness'], 'max_ms')} | {kind['staleness_mean_ms']:.0f} "
            f"| {load:.2f} | {versus} |"
        )
    lines += [
        "",
        "Staleness of a sample: how long before the sample a newer version of that key had been recorded in the "
        "events table than the one the cache held (0 if it held the latest); samples are random (service, tenant, "
        "key) triples, a few times a second, checked with one SQL query per tick. A TTL cache lists its tenant's "
        "whole prefix once per TTL (the cheapest TTL cache: a per-key one would make one request per key). "
        + (
            "The warm-up is as long as the longest TTL, so each TTL cache's age is spread over its whole TTL. "
            if sizes["warmup_s"] >= max(_ttls(kinds), default=0)
            else "Quick run: the warm-up is shorter than the longest TTLs, so their staleness is understated. "
        )
        + "The watch "
        "cache's read-model requests are the bus's `get_config` + `list_config` counters over the window less the "
        "TTL caches' GETs (an upper bound: anything else on the shared bus counts too); "
        f"over this window the bus served {tradeoff['bus_config_reads_in_window']:.0f} config reads in all.",
    ]
    return lines


def _ttls(kinds: list[dict[str, Any]]) -> list[float]:
    return [float(k["cache"].split()[1]) for k in kinds if k["cache"].startswith("TTL ")]


def _verdicts(result: dict[str, Any]) -> list[str]:
    out = []
    for row in result.get("propagation", []):
        if row["watchers"] == 1000 and row["target_rate"] == 1000:
            p99 = row["ack_to_watcher"]["p99_ms"]
            ok = p99 <= TARGET_PROPAGATION_P99_MS
            out.append(
                f"{'✔' if ok else '✘'} propagation p99 ≤ 250 ms at 1,000 watchers, 1,000 changes/s: {p99:.0f} ms"
            )
    scale = result.get("scale")
    if scale and scale["streams"] < 10_000:
        out.append(f"(quick run: {scale['streams']:,} streams, the 10,000-stream targets are not tried)")
    elif scale:
        total = max([scale["server_rss_streams_mib"]] + [s["server_rss_mib"] for s in scale["steps"]])
        out.append(
            f"{'✔' if total <= 1024 else '✘'} {scale['streams']:,} streams in ≤ 1 GiB server RSS "
            f"(delivering included): {total:.0f} MiB"
        )
        top = max(scale["steps"], key=lambda s: s["deliveries_per_s"], default=None)
        if top:
            ok = top["deliveries_per_s"] >= 10_000 * 0.95 and top["delay"]["p99_ms"] <= 500
            out.append(
                f"{'✔' if ok else '✘'} 10,000 deliveries/s with p99 ≤ 500 ms: {top['deliveries_per_s']:,.0f}/s, "
                f"p99 {top['delay']['p99_ms']:.0f} ms"
            )
    tradeoff = result.get("tradeoff")
    if tradeoff:
        kinds = {k["cache"]: k for k in tradeoff["kinds"]}
        watch, ttl1 = kinds.get("watch cache (SDK)"), kinds.get("TTL 1 s")
        if watch and ttl1:
            ok = (
                watch["staleness"]["p99_ms"] < ttl1["staleness"]["p99_ms"]
                and watch["read_model_requests_per_s"] < TARGET_TRADEOFF_LOAD * ttl1["read_model_requests_per_s"]
            )
            out.append(
                f"{'✔' if ok else '✘'} watch cache staleness p99 below the 1 s TTL cache's "
                f"({watch['staleness']['p99_ms']:.0f} vs {ttl1['staleness']['p99_ms']:.0f} ms) at under 1% of its "
                f"read-model load ({watch['read_model_requests_per_s']:.2f} vs "
                f"{ttl1['read_model_requests_per_s']:.1f} requests/s)"
            )
    return out


def _report(result: dict[str, Any], reports_dir: Path) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "bench-config-watch.json").write_bytes(
        orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    lines = [
        "# Config delivery (`python -m bench --only config_watch" + (" --quick" if result["quick"] else "") + "`)",
        "",
        f"{'Quick' if result['quick'] else 'Full'} run on {result['cpus']} shared cores; the local stack's emulators "
        "(kinesis-mock, DynamoDB Local, moto) stand in for AWS, so ratios matter more than absolute figures. "
        "Each row below was measured at (UTC, load average at its start → end):",
        "",
    ]
    for row in ROWS:
        meta = result.get("runs", {}).get(row)
        if not meta:
            continue
        loads = f"{meta['load_average_at_start'][0]:.1f} → {meta['load_average_at_end'][0]:.1f}"
        pids = meta["config_server_pids"]
        restarted = (
            f"; **the shared config server was restarted meanwhile** (pid {pids[0]} → {pids[1]})"
            if len(set(pids)) > 1
            else ""
        )
        lines.append(f"- {row}: {meta['started']} to {meta['finished']}, load {loads}{restarted}")
    lines.append("")
    errors = [
        f"{row['watchers']:,} watchers: {row['watch_errors']}"
        for row in result.get("propagation", [])
        if row["watch_errors"]
    ]
    if errors:
        lines += [
            "Watch stream errors during the propagation row (each count covers its watcher set's whole life): "
            + "; ".join(errors)
            + ".",
            "",
        ]
    verdicts = _verdicts(result)
    if verdicts:
        lines += [f"- {v}" for v in verdicts] + [""]
    if "reads" in result:
        lines += [*_reads_md(result["reads"]), ""]
    if "propagation" in result:
        lines += [*_propagation_md(result["propagation"]), ""]
    if "scale" in result:
        lines += [*_scale_md(result["scale"]), ""]
    if "tradeoff" in result:
        lines += [*_tradeoff_md(result["tradeoff"]), ""]
    text = "\n".join(lines)
    (reports_dir / "bench-config-watch.md").write_text(text)
    print(text)


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    run(options.quick, reports_dir=options.reports_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.config_watch", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of every row)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="run only these rows")
    parser.add_argument("--no-up", action="store_true", help="do not start missing stack parts (tagbus up)")
    parser.add_argument("--reports-dir", type=Path, default=REPO_ROOT / "reports")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other rows of the existing report (re-measure some rows only)"
    )
    args = parser.parse_args(argv)
    run(args.quick, reports_dir=args.reports_dir, rows=args.rows, start_stack=not args.no_up, merge=args.merge)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
