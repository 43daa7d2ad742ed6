"""The demo: config events for two tenants travel through every part until both read models show them.

Before posting, a reader-SDK watcher per tenant subscribes to the config server: each change
is printed as it is pushed, with its delay from the bus's commit, and the demo waits until
every posted change was pushed before it checks the read models.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config_client import ConfigClientError
from kernel.auth import issue_dev_token
from tagbus.settings import Settings
from tagbus.watching import Arrival, ServerUnreachable, StampedWatch

DEMO_CONFIG: dict[str, dict[str, Any]] = {
    "acme": {
        "tenantconfig:features/dark-mode": True,
        "tenantconfig:limits/max-users": 250,
        "paramconfig:db/pool-size": 20,
        "paramconfig:email/sender": "ops@acme.example",
    },
    "globex": {
        "tenantconfig:features/dark-mode": False,
        "tenantconfig:limits/max-users": 5_000,
        "paramconfig:db/pool-size": 64,
        "paramconfig:email/sender": "noreply@globex.example",
    },
}

STORES = {"tenantconfig": "DynamoDB", "paramconfig": "SSM"}


class DemoError(RuntimeError):
    """The demo could not complete; the message says which step."""


@dataclass(frozen=True, slots=True)
class Posted:
    tenant: str
    key: str
    value: Any
    version: int
    posted_at: float


class Pushes:
    """What the watchers received, by (tenant, key), and a way to wait for a version of each."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._changed = threading.Condition()
        self.latest: dict[tuple[str, str], Arrival] = {}

    def arrived(self, a: Arrival) -> None:
        if not a.snapshot:
            c = a.change
            value = "(deleted)" if c.deleted else orjson.dumps(c.value).decode()
            self._console.print(
                f"  pushed  {c.tenant:<7} {c.key:<34} {escape(value):<26} v{c.version:<4} {a.delay_ms:>6,.0f} ms",
                highlight=False,
            )
        with self._changed:
            self.latest[(a.change.tenant, a.change.key)] = a
            self._changed.notify_all()

    def wait_for(self, posted: list[Posted], timeout: float) -> dict[tuple[str, str], Arrival]:
        """The arrival of every posted version (or a later one); DemoError naming what never came."""

        def pushed(p: Posted) -> bool:
            a = self.latest.get((p.tenant, p.key))
            return a is not None and a.change.version >= p.version

        with self._changed:
            if not self._changed.wait_for(lambda: all(pushed(p) for p in posted), timeout):
                missing = [f"{p.tenant}/{p.key}" for p in posted if not pushed(p)]
                raise DemoError(f"not pushed after {timeout:.0f}s: {', '.join(missing)} (see `tagbus status`)")
            return {(p.tenant, p.key): self.latest[(p.tenant, p.key)] for p in posted}


@contextmanager
def watching(settings: Settings, pushes: Pushes, tokens: dict[str, str], timeout: float) -> Iterator[None]:
    """One SDK watcher per demo tenant, each ready (first snapshot in) before this yields."""
    with ExitStack() as stack:
        for tenant, token in tokens.items():
            watch = StampedWatch(settings.grpc_target, token=token, prefixes=list(STORES), on_arrival=pushes.arrived)
            try:
                watch.start(timeout)
            except ServerUnreachable as e:
                raise DemoError(f"{e}: is the config part up (`tagbus status`)?") from e
            except ConfigClientError as e:
                raise DemoError(f"the config server refused {tenant}'s watch: {e}") from e
            stack.callback(watch.close)
        yield


def run(settings: Settings, console: Console, *, timeout: float = 90.0) -> None:
    """Watch, post the demo config, wait until every change was pushed and every value is readable."""
    secret = settings.auth.jwt_secret
    if not secret:
        raise DemoError("no TAGBUS_JWT_SECRET: run `tagbus up` first")
    tokens = {
        tenant: issue_dev_token(
            secret,
            tenant=tenant,
            subject="demo",
            tier="enterprise",
            scope="events:write config:read",
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            now=time.time(),
        )
        for tenant in DEMO_CONFIG
    }
    pushes = Pushes(console)
    with watching(settings, pushes, tokens, min(timeout, 30.0)):
        console.print(
            f"watching {', '.join(DEMO_CONFIG)} on the config server ({settings.grpc_target});"
            " posting; each change as it is pushed (delay from the bus's commit):",
            highlight=False,
        )
        _run(settings, console, pushes, tokens, timeout=timeout)


def _run(settings: Settings, console: Console, pushes: Pushes, tokens: dict[str, str], *, timeout: float) -> None:
    with ExitStack() as stack:
        clients = {
            tenant: stack.enter_context(
                httpx.Client(base_url=settings.base_url, timeout=10.0, headers={"Authorization": "Bearer " + token})
            )
            for tenant, token in tokens.items()
        }
        posted = _post(clients)
        readable = _wait_readable(clients, posted, timeout)
    arrivals = pushes.wait_for(posted, timeout)
    pushed_ms = sorted(a.delay_ms or 0.0 for a in arrivals.values())
    readable_ms = sorted(latency * 1000 for _, latency in readable.values())
    console.print(
        f"all {len(posted)} changes pushed to the watchers (p50 {statistics.median(pushed_ms):,.0f} ms,"
        f" max {pushed_ms[-1]:,.0f} ms) and readable in the read models (p50 {statistics.median(readable_ms):,.0f} ms,"
        f" max {readable_ms[-1]:,.0f} ms)",
        highlight=False,
    )
    table = Table("tenant", "key", "store", "value", "version", "pushed after", "readable after")
    for p in posted:
        item, latency = readable[(p.tenant, p.key)]
        if item["value"] != p.value:
            raise DemoError(f"{p.tenant}/{p.key} reads {item['value']!r}, expected {p.value!r}")
        pushed = arrivals[(p.tenant, p.key)].change
        if pushed.value != p.value:
            raise DemoError(f"{p.tenant}/{p.key} was pushed as {pushed.value!r}, expected {p.value!r}")
        table.add_row(
            p.tenant,
            p.key,
            STORES[p.key.split(":")[0]],
            repr(item["value"]),
            str(item["version"]),
            f"{arrivals[(p.tenant, p.key)].delay_ms or 0.0:,.0f} ms",
            f"{latency * 1000:,.0f} ms",
        )
    console.print(table)
    console.print("pushed after: the bus's commit → the watcher; readable after: the bus's 201 → GET /v1/config")


def _post(clients: dict[str, httpx.Client]) -> list[Posted]:
    posted: list[Posted] = []
    for tenant, config in DEMO_CONFIG.items():
        for key, value in config.items():
            event = {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": "/tagbus/demo",
                "type": "config.set",
                "data": {"key": key, "value": value},
            }
            response = clients[tenant].post("/v1/events", json=event)
            if response.status_code != 201:
                raise DemoError(f"posting {key} for {tenant} answered {response.status_code}: {response.text[:200]}")
            posted.append(Posted(tenant, key, value, response.json()["version"], time.monotonic()))
    return posted


def _wait_readable(
    clients: dict[str, httpx.Client], posted: list[Posted], timeout: float
) -> dict[tuple[str, str], tuple[dict[str, Any], float]]:
    """Each posted version as ``GET /v1/config`` reads it, and seconds from its 201 until then."""
    seen: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(posted):
        if time.monotonic() > deadline:
            missing = [f"{p.tenant}/{p.key}" for p in posted if (p.tenant, p.key) not in seen]
            raise DemoError(f"not visible after {timeout:.0f}s: {', '.join(missing)} (see `tagbus status`)")
        for p in posted:
            if (p.tenant, p.key) in seen:
                continue
            response = clients[p.tenant].get(f"/v1/config/{p.key}")
            if response.status_code == 200 and response.json()["version"] >= p.version:
                seen[(p.tenant, p.key)] = (response.json(), time.monotonic() - p.posted_at)
        time.sleep(0.1)
    return seen
