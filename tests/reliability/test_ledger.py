"""Ledger check against the real local stack: nothing acknowledged is lost, with and without faults."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from tagbus import lifecycle, stack
from tagbus import settings as settings_mod
from tests.reliability.ledger import LoadDriver, check

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def live() -> Iterator[settings_mod.Settings]:
    lifecycle.up()
    yield settings_mod.load()


def test_no_faults_nothing_lost(live: settings_mod.Settings) -> None:
    ledger = LoadDriver(live, events=300, tenants=5, keys=20, threads=4, max_seconds=20).run()
    report = check(ledger, live, timeout=20)
    print(report.summary())
    assert report.acked == 300, report.summary()
    assert report.lost == 0 and report.mismatches == 0, report.summary()
    assert report.ok, report.summary()


def test_killed_tailer_mid_load_loses_nothing(live: settings_mod.Settings) -> None:
    # Paced so that the kill and the restart both fall inside the load.
    driver = LoadDriver(live, events=300, tenants=5, keys=20, threads=4, max_seconds=25, pace=0.02).start()
    assert driver.wait_for_acks(100) >= 100
    assert driver.running, "the load ended before the fault; slow it down"
    pid = stack.status()["tailer"].pid
    assert pid is not None, "the tailer is not running"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    driver.wait_for_acks(200)
    lifecycle.up()
    restarted_in = time.monotonic() - killed_at
    assert stack.status()["tailer"].pid not in (None, pid)
    ledger = driver.join()
    report = check(ledger, live, timeout=25)
    print(f"tailer back {restarted_in:.1f}s after kill -9\n{report.summary()}")
    assert report.acked == 300, report.summary()
    assert report.lost == 0 and report.mismatches == 0, report.summary()
    assert report.ok, report.summary()


def test_the_check_sees_a_lost_and_a_falsified_event(live: settings_mod.Settings) -> None:
    """The checker is not vacuous: an ack that was never stored, or stored differently, is reported."""
    ledger = LoadDriver(live, events=10, tenants=1, keys=2, threads=1, domain_share=0, delete_share=0).run()
    real = ledger.events[0]
    ghost = dataclasses.replace(real, id=str(uuid.uuid4()), body=real.body | {"id": "ghost"})
    falsified = dataclasses.replace(real, body=real.body | {"data": {"key": real.key, "value": "forged"}})
    ledger.acked(ghost)
    ledger.acked(falsified)
    report = check(ledger, live, timeout=2, poll_interval=0.1)
    assert report.lost == 1, report.summary()
    assert report.mismatches >= 1, report.summary()
    assert not report.ok
