"""The demo: config events for two tenants travel through every part until both read models show them."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from kernel.auth import issue_dev_token
from tagbus.settings import Settings

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


def run(settings: Settings, console: Console, *, timeout: float = 90.0) -> None:
    """Post the demo config, wait until every value is readable, print them as a table."""
    secret = settings.auth.jwt_secret
    if not secret:
        raise DemoError("no TAGBUS_JWT_SECRET: run `tagbus up` first")
    clients = {
        tenant: httpx.Client(
            base_url=settings.base_url,
            timeout=10.0,
            headers={
                "Authorization": "Bearer "
                + issue_dev_token(
                    secret,
                    tenant=tenant,
                    subject="demo",
                    tier="enterprise",
                    scope="events:write config:read",
                    issuer=settings.auth.issuer,
                    audience=settings.auth.audience,
                    now=time.time(),
                )
            },
        )
        for tenant in DEMO_CONFIG
    }
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
    console.print(f"posted {len(posted)} config events for {len(DEMO_CONFIG)} tenants; waiting for the read models…")

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

    table = Table("tenant", "key", "store", "value", "version", "visible after")
    for p in posted:
        item, latency = seen[(p.tenant, p.key)]
        if item["value"] != p.value:
            raise DemoError(f"{p.tenant}/{p.key} reads {item['value']!r}, expected {p.value!r}")
        table.add_row(
            p.tenant,
            p.key,
            STORES[p.key.split(":")[0]],
            repr(item["value"]),
            str(item["version"]),
            f"{latency * 1000:.0f} ms",
        )
    console.print(table)
    for client in clients.values():
        client.close()
