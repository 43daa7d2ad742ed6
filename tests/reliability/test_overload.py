"""Capacity, a soak at 80% of it, 3× capacity, recovery: back pressure instead of timeouts, flat memory.

Short run (CI): 30 s soak, 10 s overload. ``TAGBUS_RELIABILITY=full``: 5-minute soak, 60 s overload.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tagbus import settings as settings_mod
from tests.reliability.faults import Mode
from tests.reliability.overload import (
    LoadPool,
    Sampler,
    flood,
    measure_capacity,
    memory,
    per_second,
    recovered_after,
    summarize,
)
from tests.reliability.report import Results

pytestmark = pytest.mark.stack

CAPACITY_CLIENTS = 16


def test_soak_then_three_times_capacity(live_stack: settings_mod.Settings, mode: Mode, results: Results) -> None:
    pool = LoadPool(live_stack, workers=2)
    sampler = Sampler(live_stack).start()
    origin = time.monotonic()
    phases: list[dict[str, object]] = []
    try:
        phases.append({"t": 0.0, "label": "capacity"})
        # The soak's own client, closed loop: its capacity includes the CPU the generator takes
        # from the stack (2 CPUs shared), so 80% of it is a load that client can offer steadily.
        measured = measure_capacity(live_stack, mode.capacity_seconds, connections=64)
        closed = summarize(pool.closed(CAPACITY_CLIENTS, mode.capacity_seconds), mode.capacity_seconds)
        capacity = closed["acked_rate"]
        measured |= {"events_per_second_wrk": measured["events_per_second"], "events_per_second": capacity}
        measured |= {"clients": CAPACITY_CLIENTS, "p50_ms": closed["p50_ms"], "p99_ms": closed["p99_ms"]}
        assert capacity > 0, "no event acknowledged while measuring capacity"

        soak_started = time.monotonic()
        phases.append({"t": soak_started - origin, "label": "soak 80%"})
        soak_shots = pool.open(0.8 * capacity, mode.soak_seconds)
        soak_ended = time.monotonic()

        # 3x of the bus's own capacity, measured again by wrk right before (the first measure
        # can catch the stack still catching up after the fault tests), offered by wrk too:
        # offering it from Python would take the CPU the bus needs.
        phases.append({"t": soak_ended - origin, "label": "capacity (wrk)"})
        bus_capacity = measure_capacity(live_stack, mode.capacity_seconds, connections=64)["events_per_second"]
        measured["events_per_second_wrk_before_3x"] = bus_capacity
        phases.append({"t": time.monotonic() - origin, "label": "3x"})
        over = flood(live_stack, 3 * bus_capacity, mode.overload_seconds)
        over["target_rate"] = 3 * bus_capacity

        recovery_seconds = max(10.0, mode.overload_seconds / 2)
        phases.append({"t": time.monotonic() - origin, "label": "after"})
        after_shots = pool.open(0.8 * capacity, recovery_seconds)
    finally:
        sampler.stop()
        pool.close()

    soak = summarize(soak_shots, mode.soak_seconds)
    soak["target_rate"] = 0.8 * capacity
    soak["memory"] = memory(sampler.samples, soak_started, soak_ended, warm_up=min(60.0, mode.soak_seconds / 3))
    after = summarize(after_shots, recovery_seconds)
    after["recovered_after_s"] = recovered_after(after_shots)
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
        # No latency points in the 3x phase: wrk reports its percentiles for the phase as a whole.
        "series": per_second(soak_shots + after_shots, origin, sampler.samples),
        "phases": phases,
        "notes": notes,
    }
    print(results.overload | {"series": f"{len(results.overload['series'])} points"})

    shed = over["statuses"].get("429", 0) + over["statuses"].get("503", 0)
    assert over["retry_after"] == shed, "every 429/503 must carry Retry-After"
    for phase in (soak, over, after):
        # Pushed back or answered, never an error: no 5xx besides 503, no 4xx besides 429.
        assert phase["statuses"].get("other", 0) == 0, phase
    assert after["statuses"].get("2xx", 0) > 0, f"nothing acknowledged after the overload: {after}"
    if mode.soak_seconds < 120:
        # The short run (CI) checks behaviour, not speed: its generator shares 2 CPUs with a stack
        # that is still catching up after the fault tests, and a stall of the generator's own event
        # loop counts as a timeout. Recovered here means served at least about as well as the soak.
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
