"""Lag-aware back pressure without a database: the freshness estimate, the shedding policy
(thresholds, tier order, hysteresis, Retry-After), the watcher's metrics, the settings that
turn it on, and the alert rules that watch it."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from event_bus.backpressure import FreshnessTracker, Lag, PipelineLag, ShedPolicy, SlotPosition, pipeline_lag
from event_bus.problems import Problem
from event_bus.settings import BusSettings
from kernel.auth import AuthSettings
from tagbus import settings as tagbus_settings
from tagbus.stack import StackConfig, stack_env

MIB = 1_048_576
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def policy(**kwargs: object) -> ShedPolicy:
    args: dict[str, object] = {"lag_bound_bytes": 100 * MIB, "freshness_bound_seconds": None} | kwargs
    return ShedPolicy(**args)  # type: ignore[arg-type]


def at(pressure: float) -> Lag:
    """A lag of ``pressure`` times the 100 MiB bound of :func:`policy`."""
    return Lag(int(pressure * 100 * MIB), 0.0)


def refusal(shed: ShedPolicy, tier: str) -> Problem | None:
    try:
        shed.check(tier)
    except Problem as problem:
        return problem
    return None


# -- freshness ------------------------------------------------------------------------------


def test_a_caught_up_slot_is_fresh() -> None:
    tracker = FreshnessTracker()
    assert tracker.observe(0.0, SlotPosition(wal_lsn=500, confirmed_lsn=500)) == Lag(0, 0.0)
    assert tracker.observe(1.0, SlotPosition(wal_lsn=900, confirmed_lsn=900)) == Lag(0, 0.0)


def test_freshness_grows_with_time_while_the_slot_does_not_move() -> None:
    tracker = FreshnessTracker()
    tracker.observe(0.0, SlotPosition(1_000, 1_000))
    assert tracker.observe(1.0, SlotPosition(1_500, 1_000)) == Lag(500, 0.0)
    assert tracker.observe(5.0, SlotPosition(1_500, 1_000)) == Lag(500, 4.0)  # no new WAL: still 4 s old
    assert tracker.observe(30.0, SlotPosition(2_000, 1_000)) == Lag(1_000, 29.0)


def test_a_slot_that_moves_but_falls_behind_is_seen_as_stale() -> None:
    # WAL grows 100 bytes/s; the tailer confirms steadily, but what was written 10 s before.
    tracker = FreshnessTracker()
    lag = Lag(0, 0.0)
    for second in range(60):
        wal = 100 * second
        lag = tracker.observe(float(second), SlotPosition(wal, max(0, wal - 1_000)))
    # The slot moved every second, yet what it has not confirmed is about 10 s old.
    assert lag.slot_lag_bytes == 1_000
    assert 9.0 <= lag.freshness_seconds <= 10.0


def test_catching_up_brings_freshness_back_down() -> None:
    tracker = FreshnessTracker()
    for second in range(20):
        tracker.observe(float(second), SlotPosition(100 * second, 0))
    assert tracker.observe(20.0, SlotPosition(2_000, 0)).freshness_seconds == 19.0
    # The slot confirmed what was written by t=15: the oldest unconfirmed WAL is from t=16.
    assert tracker.observe(21.0, SlotPosition(2_100, 1_500)).freshness_seconds == 5.0
    assert tracker.observe(22.0, SlotPosition(2_100, 2_100)) == Lag(0, 0.0)


def test_a_long_backlog_costs_resolution_not_the_oldest_mark() -> None:
    tracker = FreshnessTracker(max_marks=8)
    for second in range(1, 1_000):
        lag = tracker.observe(float(second), SlotPosition(10 * second, 0))
    assert lag.freshness_seconds == 998.0  # the first WAL past the slot was seen at t=1
    assert len(tracker._marks) <= 8


# -- the policy ----------------------------------------------------------------------------


def test_tiers_are_shed_in_order_basic_first_enterprise_at_the_bound() -> None:
    shed = policy()
    seen = []
    for pressure in (0.2, 0.49, 0.5, 0.74, 0.75, 0.99, 1.0, 3.0):
        shed.update(at(pressure))
        seen.append(sorted(shed.shedding))
    assert seen == [
        [],
        [],
        ["basic"],
        ["basic"],
        ["basic", "premium"],
        ["basic", "premium"],
        ["basic", "enterprise", "premium"],
        ["basic", "enterprise", "premium"],
    ]


def test_a_refused_tier_gets_a_503_problem_with_retry_after() -> None:
    shed = policy()
    shed.update(at(0.6))
    problem = refusal(shed, "basic")
    assert problem is not None
    assert problem.status == 503
    assert int(problem.headers["Retry-After"]) >= 1
    body = problem.to_json()
    assert body["type"].endswith("/pipeline-behind") and body["status"] == 503 and body["tier"] == "basic"
    assert "slot lag" in body["detail"]
    assert refusal(shed, "premium") is None and refusal(shed, "enterprise") is None


def test_an_unknown_tier_is_shed_with_the_lowest() -> None:
    shed = policy()
    shed.update(at(0.6))
    assert refusal(shed, "trial") is not None


def test_hysteresis_a_tier_is_readmitted_only_well_below_its_threshold() -> None:
    shed = policy()
    shed.update(at(0.5))
    assert shed.shedding == {"basic"}
    # Hovering around the threshold does not flap.
    for pressure in (0.48, 0.52, 0.45, 0.5, 0.41):
        shed.update(at(pressure))
        assert shed.shedding == {"basic"}, pressure
    shed.update(at(0.39))  # below 0.8 of 0.5
    assert shed.shedding == frozenset()
    # Readmitted, it is shed again only at its threshold, not at the release point.
    shed.update(at(0.45))
    assert shed.shedding == frozenset()


def test_each_tier_has_its_own_release_point() -> None:
    shed = policy()
    shed.update(at(1.2))
    shed.update(at(0.7))  # below enterprise's 0.8, above premium's 0.6
    assert shed.shedding == {"basic", "premium"}
    shed.update(at(0.55))
    assert shed.shedding == {"basic"}


def test_freshness_sheds_the_same_way_and_the_worse_signal_counts() -> None:
    shed = policy(lag_bound_bytes=100 * MIB, freshness_bound_seconds=60.0)
    shed.update(Lag(1_000, 31.0))
    assert shed.shedding == {"basic"}
    shed.update(Lag(80 * MIB, 31.0))
    assert shed.shedding == {"basic", "premium"}
    shed.update(Lag(1_000, 61.0))
    assert shed.shedding == {"basic", "premium", "enterprise"}
    only_freshness = policy(lag_bound_bytes=None, freshness_bound_seconds=10.0)
    only_freshness.update(Lag(10**12, 4.0))  # no lag bound: any lag is fine
    assert only_freshness.shedding == frozenset()


def test_retry_after_grows_with_the_pressure_and_is_longer_for_lower_tiers() -> None:
    shed = policy()

    def retry_after(pressure: float, tier: str) -> int:
        shed.update(at(pressure))
        problem = refusal(shed, tier)
        assert problem is not None, (pressure, tier)
        return int(problem.headers["Retry-After"])

    basic = [retry_after(p, "basic") for p in (0.5, 1.0, 2.0, 4.0)]
    assert basic == sorted(basic) and basic[0] < basic[-1]
    assert retry_after(1.5, "basic") > retry_after(1.5, "premium") > retry_after(1.5, "enterprise") >= 1
    assert retry_after(1_000.0, "basic") == 60  # bounded
    shed.update(at(0.41))  # held by hysteresis, below the threshold: still at least a second
    problem = refusal(shed, "basic")
    assert problem is not None and int(problem.headers["Retry-After"]) >= 1


def test_an_unknown_lag_sheds_nothing() -> None:
    shed = policy()
    shed.update(at(5.0))
    shed.update(None)
    assert shed.shedding == frozenset()
    assert refusal(shed, "basic") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lag_bound_bytes": None},
        {"lag_bound_bytes": 0},
        {"freshness_bound_seconds": -1.0},
        {"shed_from": {}},
        {"shed_from": {"basic": 0.0}},
        {"release": 1.0},
    ],
)
def test_a_policy_that_cannot_work_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        policy(**kwargs)


# -- the watcher ---------------------------------------------------------------------------


class ScriptedLag(PipelineLag):
    """The watcher reading slot positions from a list instead of a database."""

    def __init__(self, positions: list[SlotPosition | None], clock: Clock, registry: CollectorRegistry) -> None:
        shed = ShedPolicy(lag_bound_bytes=1_000, freshness_bound_seconds=10.0)
        super().__init__("postgresql://unused", "slot", shed, registry=registry, clock=clock)
        self.positions = positions

    async def _read(self) -> SlotPosition | None:
        return self.positions.pop(0)


def metric(registry: CollectorRegistry, line: str) -> float:
    for text in generate_latest(registry).decode().splitlines():
        if text.startswith(line + " "):
            return float(text.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line}")


def test_the_watcher_exports_lag_freshness_and_which_tiers_are_shed() -> None:
    clock, registry = Clock(), CollectorRegistry()
    watcher = ScriptedLag(
        [SlotPosition(100, 100), SlotPosition(700, 100), SlotPosition(700, 100), None, SlotPosition(800, 800)],
        clock,
        registry,
    )

    async def scenario() -> None:
        assert await watcher.sample_once() == Lag(0, 0.0)
        assert metric(registry, 'tagbus_backpressure_shedding{tier="basic"}') == 0
        assert metric(registry, "tagbus_backpressure_lag_bound_bytes") == 1_000
        clock.now += 1
        assert await watcher.sample_once() == Lag(600, 0.0)
        assert metric(registry, "tagbus_pipeline_slot_lag_bytes") == 600
        assert metric(registry, 'tagbus_backpressure_shedding{tier="basic"}') == 1
        assert metric(registry, 'tagbus_backpressure_shedding{tier="premium"}') == 0
        clock.now += 8  # the same unconfirmed WAL, 8 s later: freshness 0.8 of its bound
        assert await watcher.sample_once() == Lag(600, 8.0)
        assert metric(registry, "tagbus_pipeline_freshness_seconds") == 8.0
        assert metric(registry, 'tagbus_backpressure_shedding{tier="premium"}') == 1
        assert await watcher.sample_once() is None  # the slot vanished: unknown, nothing shed
        assert math.isnan(metric(registry, "tagbus_pipeline_slot_lag_bytes"))
        assert metric(registry, 'tagbus_backpressure_shedding{tier="basic"}') == 0
        assert await watcher.sample_once() == Lag(0, 0.0)

    asyncio.run(scenario())


def test_back_pressure_is_off_without_a_bound() -> None:
    base = BusSettings(database_url="postgresql://unused", auth=AuthSettings(jwt_secret="x" * 32))
    assert pipeline_lag(base, CollectorRegistry()) is None
    on = BusSettings(database_url=base.database_url, auth=base.auth, backpressure_freshness_seconds=30.0)
    watcher = pipeline_lag(on, CollectorRegistry())
    assert watcher is not None and watcher.slot_name == "tagbus_tailer"


# -- settings ------------------------------------------------------------------------------


def test_the_environment_turns_it_on_for_the_bus(tmp_path: Path) -> None:
    env = {"TAGBUS_BACKPRESSURE_LAG_BYTES": "268435456", "TAGBUS_BACKPRESSURE_FRESHNESS_SECONDS": "60"}
    bus = tagbus_settings.load(env, home=tmp_path).bus()
    assert bus.backpressure_lag_bytes == 256 * MIB
    assert bus.backpressure_freshness_seconds == 60.0
    assert bus.backpressure_slot == tagbus_settings.load({}, home=tmp_path).tailer().slot_name
    off = tagbus_settings.load({"TAGBUS_BACKPRESSURE_LAG_BYTES": "0"}, home=tmp_path).bus()
    assert off.backpressure_lag_bytes is None and off.backpressure_freshness_seconds is None


@pytest.mark.parametrize("text", ["lots", "-5", "1.5"])
def test_a_malformed_bound_is_a_settings_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(tagbus_settings.SettingsError, match="TAGBUS_BACKPRESSURE_LAG_BYTES"):
        tagbus_settings.load({"TAGBUS_BACKPRESSURE_LAG_BYTES": text}, home=tmp_path)


def test_the_local_stack_runs_with_back_pressure_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGBUS_BACKPRESSURE_LAG_BYTES", raising=False)
    monkeypatch.delenv("TAGBUS_BACKPRESSURE_FRESHNESS_SECONDS", raising=False)
    env = stack_env(StackConfig(root=tmp_path))
    bus = tagbus_settings.load(env, home=tmp_path).bus()
    assert bus.backpressure_lag_bytes is not None and bus.backpressure_freshness_seconds is not None


# -- alert rules ---------------------------------------------------------------------------


def test_every_alert_has_a_runbook_and_watches_a_metric_the_bus_exports() -> None:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in alerts} >= {"TagbusShedding", "TagbusSlotLagNearBound"}
    registry = CollectorRegistry()
    settings = BusSettings(
        database_url="postgresql://unused",
        auth=AuthSettings(jwt_secret="x" * 32),
        backpressure_lag_bytes=MIB,
        backpressure_freshness_seconds=60.0,
    )
    assert pipeline_lag(settings, registry) is not None
    exported = generate_latest(registry).decode()
    for rule in alerts:
        assert rule["annotations"]["runbook"].strip(), rule["alert"]
        named = re.findall(r"\btagbus_[a-z_]+", rule["expr"])
        assert named, rule["alert"]
        for name in named:
            assert f"\n{name} " in exported or f"\n{name}{{" in exported, (rule["alert"], name)


def _promtool() -> str | None:
    """``TAGBUS_PROMTOOL``, or the one on PATH, or the one ``make setup`` unpacked."""
    local = RULES.parents[1] / ".tagbus" / "bin" / "promtool"
    return os.environ.get("TAGBUS_PROMTOOL") or shutil.which("promtool") or (str(local) if local.is_file() else None)


@pytest.mark.skipif(_promtool() is None, reason="no promtool (make setup unpacks it from Debian's prometheus)")
def test_the_alert_rules_pass_promtool() -> None:
    promtool = _promtool()
    assert promtool is not None
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
