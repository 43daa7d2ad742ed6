"""Every fault kind under steady load, each followed by the ledger check: nothing acknowledged is lost.

Short run (CI): each fault once, 5 s outages. ``TAGBUS_RELIABILITY=full`` (``make reliability``):
each kill 3 times at random moments, 30 s outages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tagbus import aws, lifecycle, stack
from tagbus import settings as settings_mod
from tailer import run_tailer
from tailer.settings import TailerTuning
from tests.reliability import faults
from tests.reliability.faults import FaultResult, Mode, run_fault
from tests.reliability.report import Results
from tests.reliability.throttle import ThrottlingKinesis

pytestmark = pytest.mark.stack

KILLS: dict[str, tuple[str, Callable[[], None]]] = {
    "bus": ("kill -9 of the bus process, then tagbus up", lambda: faults.kill_part("bus")),
    "tailer": ("kill -9 of the tailer process, then tagbus up", lambda: faults.kill_part("tailer")),
    "kcl-daemon": (
        "kill -9 of the KCL MultiLangDaemon (Java); the consumer part starts a new one",
        faults.kill_kcl_daemon,
    ),
    "kcl-processor": (
        "kill -9 of one Python record processor (KCL then exits its JVM; the consumer part restarts it)",
        faults.kill_processor,
    ),
}

OUTAGES = {
    "kinesis": "kinesis-mock",
    "dynamodb": "DynamoDB Local",
    "moto": "moto (SSM)",
}


def _assert_survived(result: FaultResult, summary: str) -> None:
    assert result.lost == 0, summary
    assert result.mismatches == 0, summary
    assert result.duplicated == 0, summary
    assert result.ok, summary


@pytest.mark.parametrize("kind", list(KILLS))
def test_kill_9_under_load(kind: str, live_stack: settings_mod.Settings, mode: Mode, results: Results) -> None:
    method, inject = KILLS[kind]
    result, report = run_fault(live_stack, f"kill -9 {kind}", method, inject, times=mode.kills)
    results.faults.append(result)
    print(f"{result}\n{report.summary()}")
    _assert_survived(result, report.summary())


@pytest.mark.parametrize("part", list(OUTAGES))
def test_emulator_outage_under_load(part: str, live_stack: settings_mod.Settings, mode: Mode, results: Results) -> None:
    seconds = mode.outage_seconds
    method = f"SIGSTOP/SIGCONT of the {OUTAGES[part]} process group for {seconds:g}s (hung endpoint, state kept)"
    result, report = run_fault(
        live_stack,
        f"{part} stopped {seconds:g}s",
        method,
        lambda: faults.pause_part(part, seconds),
        times=1,
        recovery_from_start=False,
    )
    results.faults.append(result)
    print(f"{result}\n{report.summary()}")
    _assert_survived(result, report.summary())


@pytest.mark.parametrize("shutdown", ["fast", "immediate"])
def test_postgres_restart_under_load(
    shutdown: str, live_stack: settings_mod.Settings, mode: Mode, results: Results
) -> None:
    method = f"pg_ctl stop -m {shutdown}, then tagbus up"
    result, report = run_fault(
        live_stack, f"postgres -m {shutdown}", method, lambda: faults.restart_postgres(shutdown), times=1
    )
    results.faults.append(result)
    print(f"{result}\n{report.summary()}")
    _assert_survived(result, report.summary())


def test_kinesis_throttling_under_load(live_stack: settings_mod.Settings, mode: Mode, results: Results) -> None:
    """The stack's tailer is swapped for one in this process whose boto3 client throttles (see throttle.py)."""
    stack.down(parts=["tailer"])
    client = aws.client(live_stack, "kinesis", connect_timeout=5, read_timeout=15, retries={"max_attempts": 1})
    throttling = ThrottlingKinesis(client, records_per_second=2.0)
    stop = threading.Event()
    relay = threading.Thread(
        target=run_tailer,
        args=(live_stack.tailer(), throttling),
        kwargs={"stop": stop, "metrics_port": None, "tuning": TailerTuning(aggregate=True)},
    )
    relay.start()
    throttled_for = max(5.0, mode.outage_seconds)

    def burst() -> None:
        throttling.active.set()
        try:
            time.sleep(throttled_for)
        finally:
            throttling.active.clear()

    try:
        result, report = run_fault(
            live_stack,
            f"kinesis throttled {throttled_for:g}s",
            "injected: boto3 client wrapper; for the burst a 1-shard budget of 2 records/s (KPL-aggregated"
            " records: kinesis-mock is too slow for unaggregated ones at this load) refuses records at random"
            " positions and 10% of whole calls with ProvisionedThroughputExceededException"
            " (kinesis-mock enforces no shard limit)",
            burst,
            times=1,
            pace=0.01,
            recovery_from_start=False,
        )
    finally:
        stop.set()
        relay.join(timeout=30)
        client.close()
        lifecycle.up()
    result.injected = throttling.injected
    result.notes.append(
        f"during the burst {throttling.calls} PutRecords calls: {throttling.refused_calls} refused whole,"
        f" {throttling.partial_calls} partial ({throttling.refused_records} records refused)"
    )
    results.faults.append(result)
    print(f"{result}\n{report.summary()}")
    assert throttling.refused_records > 0, "the load never went past the shard budget: nothing was throttled"
    _assert_survived(result, report.summary())
