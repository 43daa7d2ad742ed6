"""The change load of the ``config_watch`` benchmark: bench tenants, and ``config.set`` posted at a rate.

Each tenant posts a batch of ``b`` changes every ``period`` seconds (``b`` distinct keys of its
own), the tenants' posts spread evenly over the period, so ``rate`` changes/s reach the bus as
``rate / b`` requests/s. A Python client cannot send a thousand single requests a second on a
shared core without becoming the bottleneck, so the batch endpoint keeps the generator cheap;
the pipeline downstream of the bus still sees ``rate`` events/s, and every event is its own
change of its own key. The 201 of each change is kept by ``(tenant, key, version)``, the same
triple a watcher receives, so each delivery is matched to the moment its post was answered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from kernel.auth import issue_dev_token

#: Where the bench's keys live in each tenant (the tenantconfig tag: DynamoDB).
PREFIX = "tenantconfig:cw/"
#: A per-tenant quota far above what the bench posts, so the bus's tenant limits never shape the load.
QUOTA = {"events_per_second": 100_000, "burst": 10_000}
BATCH_TYPE = {"Content-Type": "application/cloudevents-batch+json"}


@dataclass(frozen=True, slots=True)
class Tenant:
    """A bench tenant and a token for it (posting and reading)."""

    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def bench_tenants(secret: str, run: str, count: int, *, ttl_seconds: int = 4 * 3600) -> list[Tenant]:
    """``count`` fresh tenants of this run, each with an enterprise token carrying a generous quota."""
    now = time.time()
    tenants = []
    for i in range(count):
        name = f"cw-{run}-t{i:05d}"
        token = issue_dev_token(
            secret,
            tenant=name,
            tier="enterprise",
            scope="events:write config:read",
            ttl_seconds=ttl_seconds,
            now=now,
            extra={"quota": QUOTA},
        )
        tenants.append(Tenant(name, token))
    return tenants


def config_event(key: str, value: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "/bench/config-watch",
        "type": "config.set",
        "data": {"key": key, "value": value},
    }


@dataclass
class Ledger:
    """What a load posted: when each change's 201 arrived, and how the posts went."""

    #: ``(tenant, key, version)`` → wall-clock time (``time.time()``) the 201 was read.
    acked: dict[tuple[str, str, int], float] = field(default_factory=dict)
    #: Seconds from sending each request to reading its answer.
    post_seconds: list[float] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    requests: int = 0
    #: Posts the generator sent later than their slot by more than one period (it could not keep up).
    late_slots: int = 0
    started: float = 0.0
    ended: float = 0.0
    #: CPU seconds this process spent while the load ran (the generator's own cost).
    cpu_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def batch_plan(rate: float, tenants: int, *, period: float = 1.0) -> tuple[int, float]:
    """``(batch size, period)`` so that ``tenants`` posting one batch a period make ``rate`` changes/s."""
    batch = max(1, round(rate * period / tenants))
    return batch, batch * tenants / rate


async def post_batch(
    client: httpx.AsyncClient, tenant: Tenant, events: Sequence[dict[str, Any]], ledger: Ledger
) -> list[dict[str, Any]]:
    """Post ``events`` as one batch; record each 201 in ``ledger`` and return the results."""
    body = orjson.dumps(list(events))
    sent = time.perf_counter()
    try:
        response = await client.post("/v1/events:batch", content=body, headers=tenant.headers | BATCH_TYPE)
    except httpx.HTTPError:
        ledger.failed += len(events)
        return []
    acked = time.time()
    ledger.post_seconds.append(time.perf_counter() - sent)
    ledger.requests += 1
    if response.status_code != 201:
        ledger.failed += len(events)
        return []
    results: list[dict[str, Any]] = response.json()["results"]
    for result in results:
        ledger.acked[(result["tenant"], result["stream"], result["version"])] = acked
    ledger.sent += len(results)
    return results


async def run_load(
    client: httpx.AsyncClient,
    tenants: Sequence[Tenant],
    *,
    rate: float,
    seconds: float,
    keys_per_tenant: int,
    prefix: str = PREFIX,
    ledger: Ledger | None = None,
    stop: asyncio.Event | None = None,
) -> Ledger:
    """Post ``rate`` changes/s over ``tenants`` for ``seconds`` (or until ``stop``), paced by the clock."""
    ledger = ledger or Ledger()
    batch, period = batch_plan(rate, len(tenants))
    if batch > keys_per_tenant:
        raise ValueError(f"a batch of {batch} needs at least as many keys per tenant (have {keys_per_tenant})")
    counters = [0] * len(tenants)
    gap = period / len(tenants)
    in_flight: set[asyncio.Task[list[dict[str, Any]]]] = set()
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    ledger.started = time.time()
    start = loop.time()
    slot = 0
    while True:
        due = start + slot * gap
        now = loop.time()
        if now - start >= seconds or (stop is not None and stop.is_set()):
            break
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if now - due > period:
            ledger.late_slots += 1
        i = slot % len(tenants)
        events = []
        for _ in range(batch):
            n = counters[i]
            counters[i] += 1
            events.append(config_event(f"{prefix}k{n % keys_per_tenant:03d}", {"n": n, "sent": time.time()}))
        task = asyncio.create_task(post_batch(client, tenants[i], events, ledger))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        slot += 1
    ledger.ended = time.time()
    if in_flight:
        await asyncio.gather(*in_flight)
    ledger.cpu_seconds = time.process_time() - cpu
    return ledger


async def seed(
    client: httpx.AsyncClient, tenants: Sequence[Tenant], keys: Sequence[str], *, value: Any = None
) -> Ledger:
    """Set every key in ``keys`` once in every tenant (one batch per tenant, a few at a time)."""
    ledger = Ledger(started=time.time())
    gate = asyncio.Semaphore(8)

    async def one(tenant: Tenant) -> None:
        async with gate:
            events = [config_event(key, value if value is not None else {"seed": key}) for key in keys]
            for first in range(0, len(events), 500):
                await post_batch(client, tenant, events[first : first + 500], ledger)

    await asyncio.gather(*(one(t) for t in tenants))
    ledger.ended = time.time()
    return ledger


async def wait_visible(
    client: httpx.AsyncClient, tenant: Tenant, key: str, version: int, *, timeout: float = 60.0
) -> float:
    """Seconds until ``GET /v1/config/{key}`` shows ``version`` (or later); ``TimeoutError`` after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        response = await client.get(f"/v1/config/{key}", headers=tenant.headers)
        if response.status_code == 200 and response.json()["version"] >= version:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{tenant.name} {key} v{version} not visible through GET /v1/config within {timeout:g} s")
