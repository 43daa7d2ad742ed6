"""The trade-off, measured: TTL caches over ``GET /v1/config`` against the watch cache (the SDK).

N simulated services each hold the config of K tenants (of T; each tenant is held by several
services). Under a steady change rate, every service reads its tenants' config through

- a TTL cache at each TTL: the tenant's whole prefix listed by ``GET /v1/config?prefix=`` (one
  request per tenant and TTL, the cheapest TTL cache there is: a per-key cache makes one per
  key), re-listed as soon as it expires, as a service that reads all the time would; and
- the watch cache: one :class:`config_client.AsyncConfigCache` per service and tenant.

All of them run side by side over the same changes, after a warm-up as long as the longest
TTL (so each TTL cache's age is spread over its whole TTL, as in a steady state). A checker
samples, a few times a second, random ``(service, tenant, key)`` triples of each cache kind and
asks the events table how long the cached version has been superseded: the ``recorded_at`` of
the first newer version committed before the sample (0 when the cache holds the latest).

Read-model load: the TTL caches' GETs are counted by the bench; the watch caches make none in
steady state, which the bus's own ``/metrics`` confirms (its ``get_config`` and
``list_config`` counters over the window, less the TTL caches' GETs, bound the watch caches'
reads from above; anything else using the shared bus lands there too).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from bench.config_watch_load import PREFIX, Ledger, Tenant, run_load, seed, wait_visible
from bench.config_watch_measure import metric_sum, parse_metrics, summary
from config_client import AsyncConfigCache, State

#: Staleness of a sample: the first version newer than the cached one that was recorded before
#: the sample was taken, and how long before (seconds); no such version: 0.
STALENESS = """
SELECT s.i, COALESCE(GREATEST(0, EXTRACT(EPOCH FROM (%(at)s::timestamptz - n.first_newer))), 0)::float8
FROM unnest(%(tenants)s::text[], %(streams)s::text[], %(versions)s::bigint[])
     WITH ORDINALITY AS s(tenant, stream, version, i)
LEFT JOIN LATERAL (
    SELECT min(e.recorded_at) AS first_newer FROM events e
    WHERE e.tenant_id = s.tenant AND e.stream_id = s.stream AND e.version > s.version
      AND e.recorded_at <= %(at)s::timestamptz
) n ON true
ORDER BY s.i
"""


@dataclass(frozen=True, slots=True)
class TradeoffSizes:
    services: int
    tenants_per_service: int
    tenants: int
    keys_per_tenant: int
    #: Changes per second over every tenant's keys.
    rate: float
    ttls: tuple[float, ...]
    warmup: float
    window: float
    #: Samples per cache kind per checker tick, and seconds between ticks.
    samples: int = 30
    tick: float = 0.2


FULL = TradeoffSizes(
    services=10, tenants_per_service=10, tenants=20, keys_per_tenant=10, rate=40, ttls=(1, 10, 60), warmup=60, window=30
)
QUICK = TradeoffSizes(
    services=5, tenants_per_service=4, tenants=10, keys_per_tenant=10, rate=20, ttls=(1, 10, 60), warmup=6, window=8
)


class TtlCache:
    """One service's TTL cache of one tenant: the prefix listed, held for ``ttl`` seconds."""

    def __init__(self, client: httpx.AsyncClient, tenant: Tenant, ttl: float, gets: list[float]) -> None:
        self.client = client
        self.tenant = tenant
        self.ttl = ttl
        self.versions: dict[str, int] = {}
        self.gets = gets
        self.errors = 0

    async def fetch(self) -> None:
        after: str | None = None
        fresh: dict[str, int] = {}
        while True:
            params = {"prefix": PREFIX, "limit": "1000"} | ({"after": after} if after else {})
            self.gets.append(time.monotonic())
            response = await self.client.get("/v1/config", params=params, headers=self.tenant.headers)
            if response.status_code != 200:
                self.errors += 1
                return
            body = response.json()
            fresh.update((item["key"], item["version"]) for item in body["items"])
            after = body["next"]
            if not after:
                break
        self.versions = fresh

    async def run(self, first_expiry: float, stop: asyncio.Event) -> None:
        """Expire first after ``first_expiry`` seconds, then every ``ttl`` (a refresh takes its own time)."""
        delay = first_expiry
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
            started = time.monotonic()
            await self.fetch()
            delay = max(0.0, self.ttl - (time.monotonic() - started))


@dataclass
class KindResult:
    name: str
    staleness: list[float] = field(default_factory=list)
    read_model_requests: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, window: float) -> dict[str, Any]:
        stale = [s for s in self.staleness if s > 0]
        return {
            "cache": self.name,
            "samples": len(self.staleness),
            "stale_fraction": len(stale) / len(self.staleness) if self.staleness else math.nan,
            "staleness": summary(self.staleness),
            "staleness_mean_ms": 1000 * sum(self.staleness) / len(self.staleness) if self.staleness else math.nan,
            "read_model_requests_per_s": self.read_model_requests / window,
            "errors": self.errors,
            **self.extra,
        }


def _holdings(sizes: TradeoffSizes, tenants: Sequence[Tenant]) -> list[list[Tenant]]:
    """Which tenants each service holds: consecutive runs of K, wrapping around the T tenants."""
    return [
        [tenants[(s * sizes.tenants_per_service + j) % len(tenants)] for j in range(sizes.tenants_per_service)]
        for s in range(sizes.services)
    ]


async def _bus_config_reads(client: httpx.AsyncClient) -> float:
    samples = parse_metrics((await client.get("/metrics")).text)
    return metric_sum(samples, "tagbus_http_requests_total", route="get_config") + metric_sum(
        samples, "tagbus_http_requests_total", route="list_config"
    )


async def measure(
    sizes: TradeoffSizes,
    *,
    bus: httpx.AsyncClient,
    tenants: Sequence[Tenant],
    grpc_target: str | None,
    database_url: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cache kind side by side over one change load; their staleness and read-model load.

    ``grpc_target`` ``None``: no config server to watch, the TTL caches alone.
    """
    keys = [f"{PREFIX}k{i:03d}" for i in range(sizes.keys_per_tenant)]
    seeded = await seed(bus, tenants, keys)
    if seeded.failed:
        raise RuntimeError(f"{seeded.failed} seed changes were refused by the bus")
    # Every cache starts from the seeded state, so no sample counts the seeding as staleness.
    for tenant in tenants:
        await wait_visible(bus, tenant, keys[-1], 1)
    holdings = _holdings(sizes, tenants)
    stop = asyncio.Event()
    ttl_gets: dict[float, list[float]] = {ttl: [] for ttl in sizes.ttls}
    ttl_caches: dict[float, list[list[TtlCache]]] = {
        ttl: [[TtlCache(bus, t, ttl, ttl_gets[ttl]) for t in held] for held in holdings] for ttl in sizes.ttls
    }
    watch_caches = [
        [AsyncConfigCache(grpc_target, token=t.token, prefixes=[PREFIX]) for t in held] if grpc_target else []
        for held in holdings
    ]
    for row in watch_caches:
        for cache in row:
            await cache.start()
    await asyncio.gather(*(cache.wait_ready(60) for row in watch_caches for cache in row))
    # Everything lists once now; the first expiry of each TTL cache is spread over its TTL.
    await asyncio.gather(*(c.fetch() for per_ttl in ttl_caches.values() for row in per_ttl for c in row))
    refreshers = [
        asyncio.create_task(c.run(random.uniform(0, c.ttl), stop))
        for per_ttl in ttl_caches.values()
        for row in per_ttl
        for c in row
    ]
    ledger = Ledger()
    load = asyncio.create_task(
        run_load(
            bus,
            tenants,
            rate=sizes.rate,
            seconds=sizes.warmup + sizes.window + 1,
            keys_per_tenant=sizes.keys_per_tenant,
            ledger=ledger,
            stop=stop,
        )
    )
    log(f"  trade-off: {sizes.warmup:g} s warm-up at {sizes.rate:g} changes/s, then {sizes.window:g} s sampled")
    await asyncio.sleep(sizes.warmup)

    def cached(caches: list[list[TtlCache]]) -> Callable[[int, int, str], int]:
        return lambda s, t, k: caches[s][t].versions.get(k, 0)

    kinds = {f"TTL {ttl:g} s": cached(ttl_caches[ttl]) for ttl in sizes.ttls}

    def watched(s: int, t: int, k: str) -> int:
        item = watch_caches[s][t].get(k)
        return item.version if item is not None else 0

    if grpc_target:
        kinds["watch cache (SDK)"] = watched
    results = {name: KindResult(name) for name in kinds}
    bus_reads_before = await _bus_config_reads(bus)
    window_start = time.monotonic()
    not_ready = 0
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while time.monotonic() - window_start < sizes.window:
            tick = time.monotonic()
            at = datetime.now(UTC)
            names: list[str] = []
            tenant_ids: list[str] = []
            streams: list[str] = []
            versions: list[int] = []
            for name, version_of in kinds.items():
                for _ in range(sizes.samples):
                    s = random.randrange(sizes.services)
                    t = random.randrange(sizes.tenants_per_service)
                    key = random.choice(keys)
                    names.append(name)
                    tenant_ids.append(holdings[s][t].name)
                    streams.append(key)
                    versions.append(version_of(s, t, key))
            not_ready += sum(c.state is not State.READY for row in watch_caches for c in row)
            rows = await (
                await conn.execute(
                    STALENESS, {"at": at, "tenants": tenant_ids, "streams": streams, "versions": versions}
                )
            ).fetchall()
            for (_, stale), name in zip(rows, names, strict=True):
                results[name].staleness.append(float(stale))
            await asyncio.sleep(max(0.0, sizes.tick - (time.monotonic() - tick)))
    window = time.monotonic() - window_start
    window_end = time.monotonic()
    bus_reads = await _bus_config_reads(bus) - bus_reads_before
    stop.set()
    await asyncio.gather(load, *refreshers)
    ttl_in_window = 0
    for ttl in sizes.ttls:
        result = results[f"TTL {ttl:g} s"]
        result.read_model_requests = sum(window_start <= g < window_end for g in ttl_gets[ttl])
        result.errors = sum(c.errors for row in ttl_caches[ttl] for c in row)
        ttl_in_window += result.read_model_requests
    watch = results.get("watch cache (SDK)", KindResult("unused"))
    # Whatever the bus served beyond the TTL caches' GETs: an upper bound of the watch caches'.
    watch.read_model_requests = max(0, round(bus_reads) - ttl_in_window)
    stats = [c.stats() for row in watch_caches for c in row]
    watch.extra = {
        "changes_applied": sum(s.changes_applied for s in stats),
        "reconnects": sum(s.reconnects for s in stats),
        "resyncs": sum(s.resyncs for s in stats),
        "not_ready_samples": not_ready,
    }
    for row in watch_caches:
        for cache in row:
            await cache.close()
    return {
        "sizes": {
            "services": sizes.services,
            "tenants_per_service": sizes.tenants_per_service,
            "tenants": sizes.tenants,
            "keys_per_tenant": sizes.keys_per_tenant,
            "rate": sizes.rate,
            "warmup_s": sizes.warmup,
            "window_s": window,
        },
        "load": {"sent": ledger.sent, "failed": ledger.failed, "achieved_rate": ledger.achieved_rate},
        "bus_config_reads_in_window": bus_reads,
        "kinds": [r.to_json(window) for r in results.values()],
    }
