"""End to end through the real parts: bus → PostgreSQL → WAL → Kinesis → KCL daemon → DynamoDB and SSM.

These tests use the local stack (`tagbus up`, which `make test` runs first); they start any
part that is not running and fail, not skip, when the stack cannot be brought up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from kernel.envelope import CONFIG_SET, StoredEvent
from tagbus import aws, lifecycle, stack
from tagbus import settings as settings_mod
from tailer import KinesisPublisher
from tests.fixtures.config_api import bus_client, post_config, wait_until_served

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def live() -> Iterator[settings_mod.Settings]:
    lifecycle.up()
    yield settings_mod.load()


def test_config_reaches_both_read_models(live: settings_mod.Settings) -> None:
    tenant_a, tenant_b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    with bus_client(live, tenant_a) as a, bus_client(live, tenant_b) as b:
        dynamo_v = post_config(a, "tenantconfig:features/search", {"enabled": True})
        ssm_v = post_config(a, "paramconfig:db/pool-size", 32)
        post_config(b, "tenantconfig:features/search", {"enabled": False})
        assert wait_until_served(a, "tenantconfig:features/search", dynamo_v)["value"] == {"enabled": True}
        assert wait_until_served(a, "paramconfig:db/pool-size", ssm_v)["value"] == 32
        assert wait_until_served(b, "tenantconfig:features/search", 1)["value"] == {"enabled": False}
        # Tenant B never sees tenant A's key.
        assert b.get("/v1/config/paramconfig:db/pool-size").status_code == 404
        listed = a.get("/v1/config", params={"prefix": "tenantconfig:"}).json()
        assert [i["key"] for i in listed["items"]] == ["tenantconfig:features/search"]


def test_killed_tailer_loses_nothing(live: settings_mod.Settings) -> None:
    tenant = f"k-{uuid.uuid4().hex[:8]}"
    pid = stack.status()["tailer"].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with bus_client(live, tenant) as client:
        versions = {f"tenantconfig:kill/k{i}": post_config(client, f"tenantconfig:kill/k{i}", i) for i in range(20)}
        lifecycle.up()  # brings the tailer back
        for key, version in versions.items():
            assert wait_until_served(client, key, version)["value"] == int(key.rsplit("k", 1)[1])


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
    with bus_client(live, tenant) as client:
        for k in range(5):
            # The last version of each key is 8 (40 events over 5 keys), with value 35 + k.
            assert wait_until_served(client, f"tenantconfig:agg/k{k}", 8)["value"] == 35 + k


def test_status_shows_that_progress_is_moving(live: settings_mod.Settings) -> None:
    with bus_client(live, f"s-{uuid.uuid4().hex[:8]}") as client:
        wait_until_served(client, "tenantconfig:status/probe", post_config(client, "tenantconfig:status/probe", 1))
    result = subprocess.run(
        [sys.executable, "-m", "tagbus", "status"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "consumer  running" in result.stdout
    published = next(line for line in result.stdout.splitlines() if "events published" in line)
    assert int("".join(ch for ch in published.split("published")[1] if ch.isdigit())) > 0
    assert "s ago" in next(line for line in result.stdout.splitlines() if "last publish" in line)
