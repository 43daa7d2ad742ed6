"""Fixtures of the hostile-input suite: one bus behind the real server, and a tally of attempts.

The bus is served by ``event_bus.server`` (the limits production runs with, shortened so
slow clients are cut off within seconds) on a real PostgreSQL, and accepts HS256 tokens
as well as RS256/ES256 tokens from a JWKS endpoint, with ``iss`` and ``aud`` checked. Its
config read side is the tag router over in-memory stores.

Every test records what it tried in a :class:`HostileTally`, by kind; at the end of the
session the tally is written to ``reports/reliability-hostile.json`` for the reliability
report.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.ports import free_port
from devtools.postgres_cluster import cloned_database
from event_bus.app import create_app
from event_bus.server import ServerSettings
from event_bus.settings import BusSettings
from kernel.auth import AuthSettings
from kernel.envelope import StoredEvent
from projections.router import TagRouter
from projections.stores.memory import MemoryConfigStore
from tagbus.compose import RouterConfigReader
from tests.fixtures.bus import SECRET, TAGS, serve
from tests.fixtures.jwks import AUDIENCE, ISSUER, JwksServer, claims, serve_jwks, sign

REPORT = Path(__file__).resolve().parents[2] / "reports" / "reliability-hostile.json"
PROBLEM = "application/problem+json"
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


@dataclass
class KindCount:
    tried: int = 0
    server_errors: int = 0
    cross_tenant_reads: int = 0


@dataclass
class HostileTally:
    """Attempts by kind, with the server errors and cross-tenant reads among them."""

    kinds: dict[str, KindCount] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, *, server_error: bool = False, cross_tenant: bool = False) -> None:
        with self._lock:
            count = self.kinds.setdefault(kind, KindCount())
            count.tried += 1
            count.server_errors += server_error
            count.cross_tenant_reads += cross_tenant

    def response(self, kind: str, response: httpx.Response, *, secrets: tuple[str, ...] = ()) -> httpx.Response:
        """Record ``response``; a 5xx other than the contract's 503, or a leaked secret, counts."""
        leaked = any(s in response.text for s in secrets)
        self.record(kind, server_error=response.status_code >= 500 and response.status_code != 503, cross_tenant=leaked)
        return response

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "kinds": {k: vars(v) for k, v in sorted(self.kinds.items())},
        }


@pytest.fixture(scope="session")
def tally() -> Iterator[HostileTally]:
    collected = HostileTally()
    yield collected
    if collected.kinds:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(collected.to_json(), indent=2) + "\n")


@dataclass
class HostileBus:
    """The bus under attack: its URL, its key server, its read models."""

    base_url: str
    jwks: JwksServer
    router: TagRouter
    server_settings: ServerSettings

    def hs256(self, tenant: str, **extra: Any) -> str:
        return sign(claims(tenant, **extra), SECRET, "HS256")

    def rs256(self, tenant: str, **extra: Any) -> str:
        return sign(claims(tenant, **extra), self.jwks.keys.rsa, "RS256", self.jwks.keys.rsa_kid)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def seed_config(self, tenant: str, key: str, value: Any, version: int = 1) -> None:
        """Put ``key`` into the read model as the consumers would, from a stored event."""
        event = StoredEvent(
            id=f"seed-{tenant}-{key}-{version}",
            tenant=tenant,
            stream=key,
            version=version,
            type="config.set",
            source="/hostile-seed",
            recorded_at=datetime.now(UTC),
            data={"key": key, "value": value},
        )
        assert self.router.apply([event]).ok

    def healthy(self) -> bool:
        return httpx.get(f"{self.base_url}/healthz", timeout=5).status_code == 200


@pytest.fixture(scope="session")
def jwks_server() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


@contextmanager
def serve_bus(database_url: str, jwks: JwksServer, router: TagRouter) -> Iterator[HostileBus]:
    """The bus on ``router``'s read models, behind the production server with short limits."""
    auth = AuthSettings(jwt_secret=SECRET, jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE)
    settings = BusSettings(database_url=database_url, auth=auth, pool_size=4)
    app = create_app(
        settings,
        tags=router.registered_tags,
        config_reader=RouterConfigReader(router),
        body_timeout_seconds=BODY_TIMEOUT,
    )
    server_settings = ServerSettings(port=free_port(), header_timeout_seconds=HEADER_TIMEOUT)
    stop = serve(app, server_settings.port, server_settings)
    bus = HostileBus(f"http://127.0.0.1:{server_settings.port}", jwks, router, server_settings)
    try:
        yield bus
        # After everything the suite threw at it, the bus still answers.
        assert bus.healthy() and httpx.get(f"{bus.base_url}/readyz", timeout=5).status_code == 200
    finally:
        stop()


@pytest.fixture(scope="session")
def hostile_bus(pg_server_url: str, jwks_server: JwksServer) -> Iterator[HostileBus]:
    """The bus with in-memory read models (the reference adapter)."""
    router = TagRouter({tag: MemoryConfigStore() for tag in TAGS})
    with cloned_database(pg_server_url) as url, serve_bus(url, jwks_server, router) as bus:
        yield bus


@pytest.fixture(scope="session")
def stack_bus(pg_server_url: str, jwks_server: JwksServer) -> Iterator[HostileBus]:
    """The bus reading the local stack's DynamoDB Local and moto SSM (``tagbus up``)."""
    from botocore.exceptions import BotoCoreError

    from projections.errors import ProjectionError
    from tagbus.compose import build_router
    from tagbus.settings import load

    router = build_router(load())
    try:
        router.get("hostile-probe", "paramconfig:probe")
        router.get("hostile-probe", "tenantconfig:probe")
    except (ProjectionError, BotoCoreError) as e:
        pytest.fail(f"the local stack's read models do not answer (run `tagbus up`): {e}")
    with cloned_database(pg_server_url) as url, serve_bus(url, jwks_server, router) as bus:
        yield bus


@pytest.fixture(scope="session")
def http(hostile_bus: HostileBus) -> Iterator[httpx.Client]:
    """One client without a token for the whole session (a client per example costs ~0.1 s)."""
    with hostile_bus.client() as client:
        yield client


def assert_problem(response: httpx.Response, *allowed: int) -> None:
    """A 4xx of the contract, as problem+json whose status matches the answer's."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if allowed:
        assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == PROBLEM, response.headers
    body = response.json()
    assert body["status"] == response.status_code and body["type"] and body["title"]
