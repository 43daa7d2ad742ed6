"""Capacity, a soak at 80% of it, 3× capacity, recovery: back pressure instead of timeouts, flat memory.

The load of every phase is offered by wrk; Python workers probe the latency of single posts
alongside (``tests/reliability/overload.py``).

Short run (CI): 30 s soak, 10 s overload. ``TAGBUS_RELIABILITY=full``: 5-minute soak, 60 s overload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tagbus import settings as settings_mod
from tests.reliability.faults import Mode
from tests.reliability.overload import (
    LoadPool,
    Sampler,
    Shot,
    flood,
    measure_capacity,
    memory,
    per_second,
    summarize,
)
from tests.reliability.report import Results

pytestmark = pytest.mark.stack

#: Single posts per second from the Python workers during the soak and after the overload:
#: their latency is what the report's plot shows.
PROBE_RATE = 20.0


def _with_probes(pool: LoadPool, load: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], list[Shot]]:
    """Run ``load`` (wrk) while the pool probes the bus at ``PROBE_RATE`` for as long."""
    with ThreadPoolExecutor(1) as runner:
        running = runner.submit(load)
        probes: list[Shot] = []
        while not running.done():
            probes += pool.open(PROBE_RATE, 2.0)
        return running.result(), probes


def test_soak_then_three_times_capacity(live_stack: settings_mod.Settings, mode: Mode, results: Results) -> None:
    pool = LoadPool(live_stack, workers=2)
    sampler = Sampler(live_stack).start()
    origin = time.monotonic()
    phases: list[dict[str, object]] = []
    recovery_seconds = max(10.0, mode.overload_seconds / 2)
    try:
        # Every phase's load comes from wrk (C): a Python generator offering it would take the
        # CPU the bus needs (2 CPUs shared). Python probes sample the latency of single posts.
        phases.append({"t": 0.0, "label": "capacity"})
        measured: dict[str, Any] = measure_capacity(live_stack, mode.capacity_seconds, connections=64)
        capacity = measured["events_per_second"]
        assert capacity > 0, "no event acknowledged while measuring capacity"

        soak_started = time.monotonic()
        phases.append({"t": soak_started - origin, "label": "soak 80%"})
        soak, soak_probes = _with_probes(
            pool, lambda: flood(live_stack, 0.8 * capacity, mode.soak_seconds, connections=64)
        )
        soak_ended = time.monotonic()

        # 3x of the bus's capacity measured again right before (the soak's load has settled).
        phases.append({"t": soak_ended - origin, "label": "capacity"})
        bus_capacity = measure_capacity(live_stack, mode.capacity_seconds, connections=64)["events_per_second"]
        measured["events_per_second_before_3x"] = bus_capacity
        phases.append({"t": time.monotonic() - origin, "label": "3x"})
        over = flood(live_stack, 3 * bus_capacity, mode.overload_seconds)
        over["target_rate"] = 3 * bus_capacity

        phases.append({"t": time.monotonic() - origin, "label": "after"})
        after, after_probes = _with_probes(
            pool, lambda: flood(live_stack, 0.8 * capacity, recovery_seconds, connections=64)
        )
    finally:
        sampler.stop()
        pool.close()

    soak["target_rate"] = 0.8 * capacity
    soak["memory"] = memory(sampler.samples, soak_started, soak_ended, warm_up=min(60.0, mode.soak_seconds / 3))
    soak["probes"] = summarize(soak_probes, mode.soak_seconds)
    after["target_rate"] = 0.8 * capacity
    after["probes"] = summarize(after_probes, recovery_seconds)
    notes = []
    if over["achieved_rate"] < 2.5 * bus_capacity:
        notes.append(
            f"The load generator offered only {over['achieved_rate']:.0f}/s in the 3× phase"
            f" (target {3 * bus_capacity:.0f}/s): it shares the 2 CPUs with the stack."
        )
    results.overload = {
        "capacity": measured,
        "soak": soak,
        "overload": over,
        "recovery": after,
        # The probes' latency per second (none in the 3x phase) and the slot lag.
        "series": per_second(soak_probes + after_probes, origin, sampler.samples),
        "phases": phases,
        "notes": notes,
    }
    print(results.overload | {"series": f"{len(results.overload['series'])} points"})

    shed = over["statuses"].get("429", 0) + over["statuses"].get("503", 0)
    assert over["retry_after"] == shed, "every 429/503 must carry Retry-After"
    for phase in (soak, soak["probes"], over, after, after["probes"]):
        # Pushed back or answered, never an error: no 5xx besides 503, no 4xx besides 429.
        assert phase["statuses"].get("other", 0) == 0, phase
    assert after["statuses"].get("2xx", 0) > 0, f"nothing acknowledged after the overload: {after}"
    if mode.soak_seconds < 120:
        # The short run (CI) checks behaviour, not speed: it shares 2 CPUs with a stack that is
        # still catching up after the fault tests. Recovered here means served at least about as
        # well as the soak.
        assert ok_share(after) >= min(0.99, ok_share(soak)) - 0.1, (soak, after)
        return
    # The full run (own warm-up, 5 minutes) holds the figures: no timeout during the soak; after the
    # overload, within half the recovery phase every second's posts are acknowledged again (≥ 99%)
    # with a latency near the soak's; flat memory.
    assert soak["statuses"].get("timeout", 0) == 0, f"requests timed out during the soak: {soak}"
    assert over["statuses"].get("timeout", 0) == 0, f"requests timed out at 3x instead of being refused: {over}"
    recovered = after["recovered_after_s"]
    assert recovered is not None and recovered <= recovery_seconds / 2, f"not served fully again: {after}"
    assert after["p50_ms"] <= 3 * soak["p50_ms"] + 20, (soak, after)
    for part, mem in soak["memory"].items():
        assert mem["growth_percent"] < 10, f"{part} RSS grew {mem['growth_percent']:.1f}% during the soak"


def ok_share(phase: dict[str, Any]) -> float:
    """The share of a phase's requests that were acknowledged."""
    return phase["statuses"].get("2xx", 0) / phase["sent"] if phase["sent"] else 0.0
