"""The local stack renews its Kinesis stream, and repairs it after kinesis-mock dies unsaved.

Both run on the shared stack (``tagbus up``, which ``make test`` runs first) and leave it
running on a fresh stream: every change posted before, during and after must reach the read
models.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest

from tagbus import aws, generations, lifecycle, stack
from tagbus import settings as settings_mod
from tests.fixtures.config_api import bus_client, post_config, wait_until_served
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def live() -> Iterator[settings_mod.Settings]:
    lifecycle.up()
    yield settings_mod.load()
    lifecycle.up()  # whatever a test left stopped


def _stream_created(s: settings_mod.Settings) -> datetime:
    client = aws.client(s, "kinesis")
    try:
        summary = client.describe_stream_summary(StreamName=s.stream_name)["StreamDescriptionSummary"]
    finally:
        client.close()
    created: datetime = summary["StreamCreationTimestamp"]
    return created


def _slot_lag(s: settings_mod.Settings) -> int:
    import psycopg

    from tailer import slot_status

    with psycopg.connect(s.database_url) as conn:
        status = slot_status(conn, s.tailer().slot_name)
    assert status is not None
    return status.lag_bytes


def test_rotation_renews_the_stream_and_loses_nothing(live: settings_mod.Settings) -> None:
    cfg = stack.StackConfig.from_env()
    tenant = f"rot-{uuid.uuid4().hex[:8]}"
    with bus_client(live, tenant) as client:
        before = {
            f"tenantconfig:rotation/k{i}": post_config(client, f"tenantconfig:rotation/k{i}", i) for i in range(5)
        }
        for key, version in before.items():
            wait_until_served(client, key, version)
        created = _stream_created(live)

        generation = generations.rotate(cfg, live, drain_timeout=120)

        assert _stream_created(live) > created, "the stream was not replaced"
        assert generation.since is not None, "the old stream's last event was not read"
        saved = generations.Generation.load(generations.generation_file(cfg))
        assert saved is not None and saved.records == 0 and saved.since == generation.since
        assert all(part.running for part in stack.status(cfg).values()), stack.format_status(stack.status(cfg))
        after = {
            f"tenantconfig:rotation/k{i}": post_config(client, f"tenantconfig:rotation/k{i}", -i) for i in range(5)
        }
        for key, version in after.items():
            assert wait_until_served(client, key, version)["value"] == -int(key.rsplit("k", 1)[1])


def test_kinesis_killed_unsaved_is_repaired_from_the_events_table(live: settings_mod.Settings) -> None:
    """kill -9 of kinesis-mock loses what it took since its last save; ``tagbus up`` republishes it."""
    cfg = stack.StackConfig.from_env()
    tenant = f"crash-{uuid.uuid4().hex[:8]}"
    stack.down(cfg, ["consumer"])  # so that the changes are only in Kinesis when it dies
    with bus_client(live, tenant) as client:
        posted = {f"paramconfig:crash/k{i}": post_config(client, f"paramconfig:crash/k{i}", f"v{i}") for i in range(8)}
        wait_for(lambda: _slot_lag(live) == 0 or None, "the tailer to publish the changes", 60)
        pid = stack.status(cfg)["kinesis"].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: stack.status(cfg)["kinesis"].pid is None or None, "kinesis-mock gone", 15)

        lifecycle.up(cfg)

        assert not generations.crash_mark(cfg).exists(), "the repair did not finish"
        for key, version in posted.items():
            assert wait_until_served(client, key, version, timeout=120)["value"] == f"v{key.rsplit('k', 1)[1]}"
