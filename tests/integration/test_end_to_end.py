"""End to end through the real parts: bus → PostgreSQL → WAL → Kinesis → KCL daemon → DynamoDB and SSM.

These tests use the local stack (`tagbus up`, which `make test` runs first); they start any
part that is not running and fail, not skip, when the stack cannot be brought up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kernel.auth import issue_dev_token
from kernel.envelope import CONFIG_SET, StoredEvent
from tagbus import aws, lifecycle, stack
from tagbus import settings as settings_mod
from tailer import KinesisPublisher
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

VISIBLE_WITHIN = 30.0


@pytest.fixture(scope="module")
def live() -> Iterator[settings_mod.Settings]:
    lifecycle.up()
    yield settings_mod.load()


def _client(s: settings_mod.Settings, tenant: str) -> httpx.Client:
    assert s.auth.jwt_secret
    token = issue_dev_token(
        s.auth.jwt_secret, tenant=tenant, tier="enterprise", scope="events:write config:read", now=time.time()
    )
    return httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _post_config(client: httpx.Client, key: str, value: Any) -> int:
    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/e2e",
        "type": "config.set",
        "data": {"key": key, "value": value},
    }
    response = client.post("/v1/events", json=event)
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


def _wait_for(client: httpx.Client, key: str, version: int, timeout: float = VISIBLE_WITHIN) -> dict[str, Any]:
    """The config item ``key`` once the bus serves it at ``version`` or later."""
    last: list[httpx.Response] = []

    def visible() -> dict[str, Any] | None:
        last[:] = [client.get(f"/v1/config/{key}")]
        answer = last[0]
        return dict(answer.json()) if answer.status_code == 200 and answer.json()["version"] >= version else None

    return wait_for(
        visible,
        f"{key} v{version} to be visible",
        timeout,
        interval=0.1,
        explain=lambda: f"last answer: {last[0].text if last else None}",
    )


def test_config_reaches_both_read_models(live: settings_mod.Settings) -> None:
    tenant_a, tenant_b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    with _client(live, tenant_a) as a, _client(live, tenant_b) as b:
        dynamo_v = _post_config(a, "tenantconfig:features/search", {"enabled": True})
        ssm_v = _post_config(a, "paramconfig:db/pool-size", 32)
        _post_config(b, "tenantconfig:features/search", {"enabled": False})
        assert _wait_for(a, "tenantconfig:features/search", dynamo_v)["value"] == {"enabled": True}
        assert _wait_for(a, "paramconfig:db/pool-size", ssm_v)["value"] == 32
        assert _wait_for(b, "tenantconfig:features/search", 1)["value"] == {"enabled": False}
        # Tenant B never sees tenant A's key.
        assert b.get("/v1/config/paramconfig:db/pool-size").status_code == 404
        listed = a.get("/v1/config", params={"prefix": "tenantconfig:"}).json()
        assert [i["key"] for i in listed["items"]] == ["tenantconfig:features/search"]


def test_killed_tailer_loses_nothing(live: settings_mod.Settings) -> None:
    tenant = f"k-{uuid.uuid4().hex[:8]}"
    pid = stack.status()["tailer"].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with _client(live, tenant) as client:
        versions = {f"tenantconfig:kill/k{i}": _post_config(client, f"tenantconfig:kill/k{i}", i) for i in range(20)}
        lifecycle.up()  # brings the tailer back
        for key, version in versions.items():
            assert _wait_for(client, key, version)["value"] == int(key.rsplit("k", 1)[1])


def test_kpl_aggregated_records_are_deaggregated_by_the_daemon(live: settings_mod.Settings) -> None:
    """Records the tailer packs with ``--aggregate`` reach the read models one event each."""
    tenant = f"agg-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    events = [
        StoredEvent(
            id=str(uuid.uuid4()),
            tenant=tenant,
            stream=f"tenantconfig:agg/k{n % 5}",
            version=n // 5 + 1,
            type=CONFIG_SET,
            source="/e2e/aggregated",
            recorded_at=now,
            data={"key": f"tenantconfig:agg/k{n % 5}", "value": n},
            position=1,
        )
        for n in range(40)
    ]
    kinesis = aws.client(live, "kinesis")
    calls: list[int] = []
    counter = lambda params, **_: calls.append(len(params["Records"]))  # noqa: E731
    kinesis.meta.events.register("provide-client-params.kinesis.PutRecords", counter)
    KinesisPublisher(kinesis, live.stream_name, aggregate=True).publish(events)
    assert sum(calls) < len(events), f"not aggregated: {calls} records for {len(events)} events"
    with _client(live, tenant) as client:
        for k in range(5):
            # The last version of each key is 8 (40 events over 5 keys), with value 35 + k.
            assert _wait_for(client, f"tenantconfig:agg/k{k}", 8)["value"] == 35 + k


def test_status_shows_that_progress_is_moving(live: settings_mod.Settings) -> None:
    with _client(live, f"s-{uuid.uuid4().hex[:8]}") as client:
        _wait_for(client, "tenantconfig:status/probe", _post_config(client, "tenantconfig:status/probe", 1))
    result = subprocess.run(
        [sys.executable, "-m", "tagbus", "status"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "consumer  running" in result.stdout
    published = next(line for line in result.stdout.splitlines() if "events published" in line)
    assert int("".join(ch for ch in published.split("published")[1] if ch.isdigit())) > 0
    assert "s ago" in next(line for line in result.stdout.splitlines() if "last publish" in line)
