"""End-to-end capacity of the local stack, catch-up after a backlog, and the stack after wear.

``python -m bench.capacity [--quick] [--rows capacity catchup wear]``, against the local stack
(``tagbus up``); every part is real. A steady load posts ``config.set`` batches (the freshness
benchmark's generator) while probers post to their own keys and time each change until
``GET /v1/config`` serves it. Each second the slot lag is sampled; each part's CPU (its whole
process tree: the consumer's KCL JVM and record processors, PostgreSQL's backends) is read
from ``/proc`` at the start and the end of each step.

**capacity** climbs a ladder of rates. A step *keeps up* when, over its second half, the slot
lag does not grow (by less than :data:`LAG_GROWTH_BOUND` between its first and last 10 s) and
probe freshness stays under :data:`FRESH_BOUND` at p99 with no late probe. The highest rate
that keeps up is held for :data:`CONFIRM_SECONDS` (five minutes) to confirm it; the part
using the most CPU in the first step that fails is named as the one that saturates. The bus's
own capacity (``reports/bench-ingest.md``) is the raw baseline beside it.

**catchup** runs at half the confirmed capacity, stops the tailer for :data:`OUTAGE_SECONDS`
while the load goes on, starts it again, and measures how fast the backlog drains (slot lag
back to near zero, and the events the tailer published per second meanwhile) and how long
until probe freshness is back under its bound.

**wear** pushes :data:`WEAR_EVENTS` events through the stack with the keeper on (it renews the
stream as it fills), then times the end-to-end drain of a fixed burst, as on a fresh stream
at the start of the row: the ratio is the wear.

The keeper is stopped for the capacity and catch-up rows (a stream renewal would pause the
consumer mid-step) after a renewal that gives them a fresh stream; it is started again at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

from bench import BenchOptions, percentile
from bench.freshness import PROBE_TIMEOUT, Probes, probe, steady_load
from bench.ingest import all_stats, machine_times, process_tree
from kernel.auth import issue_dev_token
from tagbus import generations, lifecycle, stack
from tagbus import settings as settings_mod
from tailer import slot_status

LADDER = (500.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0, 4_000.0, 6_000.0)
LADDER_QUICK = (100.0, 200.0)
STEP_SECONDS = 60.0
CONFIRM_SECONDS = 300.0
WARMUP = 10.0
#: A step keeps up when its slot lag grew less than this over its second half.
LAG_GROWTH_BOUND = 4 * 1024 * 1024
#: … and its probes' freshness p99 stayed under this.
FRESH_BOUND = 5.0
OUTAGE_SECONDS = 120.0
WEAR_EVENTS = 2_000_000
#: Events of the burst timed end to end on a fresh and on a worn stream.
BURST_EVENTS = 100_000
PROBERS = 3
KEYS = 200
TAG = "tenantconfig"


@dataclass
class Sampler:
    """Slot lag every second, in a thread, with the time of each sample."""

    database_url: str
    slot: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self._stop.is_set():
                status = slot_status(conn, self.slot)
                self.samples.append((time.monotonic(), status.lag_bytes if status else 0))
                self._stop.wait(1.0)

    def lag_between(self, start: float, end: float) -> list[int]:
        return [lag for at, lag in self.samples if start <= at <= end]


@dataclass
class PartCpu:
    """Cores each part of the stack used between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int]
    _before: dict[int, tuple[int, str, float]] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)
    _t0: float = 0.0

    def start(self) -> None:
        self._before = all_stats()
        self._machine = machine_times()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        after = all_stats()
        elapsed = max(1e-9, time.monotonic() - self._t0)
        total, idle = machine_times()
        cores: dict[str, float] = {}
        for part, pid in self.pids.items():
            tree = process_tree(after, pid)
            spent = sum(after[p][2] - (self._before[p][2] if p in self._before else 0.0) for p in tree)
            cores[part] = round(spent / elapsed, 2)
        cores["machine_busy"] = round(1 - (idle - self._machine[1]) / max(1.0, total - self._machine[0]), 2)
        return cores


@dataclass
class Step:
    """One rate held for a while: what was sent, how fresh, how the slot lag moved, who used the CPU."""

    rate: float
    seconds: float
    sent: int
    failed: int
    fresh_p50_ms: float
    fresh_p99_ms: float
    late: int
    lag_first_mb: float
    lag_last_mb: float
    lag_max_mb: float
    cores: dict[str, float]
    keeps_up: bool

    @property
    def busiest(self) -> str:
        parts = {k: v for k, v in self.cores.items() if k != "machine_busy"}
        return max(parts, key=lambda k: parts[k])


def _token(settings: settings_mod.Settings) -> str:
    assert settings.auth.jwt_secret, "the stack has no JWT secret"
    return issue_dev_token(
        settings.auth.jwt_secret,
        tenant=f"cap-{uuid.uuid4().hex[:6]}",
        tier="enterprise",
        scope="events:write config:read",
        now=time.time(),
    )


def _pids() -> dict[str, int]:
    """Each running part's pid, and this process's (the load generator and the probes)."""
    pids = {name: part.pid for name, part in stack.status().items() if part.pid is not None and name != "keeper"}
    return pids | {"load generator": os.getpid()}


async def _hold(client: httpx.AsyncClient, rate: float, seconds: float, probes: Probes, counts: dict[str, int]) -> None:
    await asyncio.gather(
        steady_load(client, rate, WARMUP + seconds, TAG, keys=KEYS, counts=counts),
        *(probe(client, seconds, TAG, probes, delay=WARMUP + 0.2 * i / PROBERS) for i in range(PROBERS)),
    )


def hold_rate(
    settings: settings_mod.Settings, sampler: Sampler, rate: float, seconds: float, *, judged_from: float = 0.5
) -> Step:
    """Hold ``rate`` for ``WARMUP + seconds``; judge the probed time from ``judged_from`` of it on
    (the second half by default, the steady state; ``0.0``: all of it)."""
    counts = {"sent": 0, "failed": 0}
    probes = Probes()
    cpu = PartCpu(_pids())
    started = time.monotonic()
    cpu.start()

    async def go() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=settings.base_url,
            headers={"Authorization": f"Bearer {_token(settings)}"},
            limits=limits,
            timeout=30,
        ) as client:
            await _hold(client, rate, seconds, probes, counts)

    asyncio.run(go())
    cores = cpu.stop()
    ended = time.monotonic()
    half = started + WARMUP + seconds * judged_from
    second_half = [s for s, at in zip(probes.samples, probes.at, strict=True) if at >= half]
    lags = sampler.lag_between(half, ended)
    first = lags[:10] or [0]
    last = lags[-10:] or [0]
    growth = statistics.fmean(last) - statistics.fmean(first)
    p99 = percentile(second_half, 99) if second_half else PROBE_TIMEOUT
    late = sum(1 for s in second_half if s >= PROBE_TIMEOUT)
    keeps_up = growth < LAG_GROWTH_BOUND and p99 < FRESH_BOUND and late == 0 and counts["failed"] == 0
    return Step(
        rate=rate,
        seconds=WARMUP + seconds,
        sent=counts["sent"],
        failed=counts["failed"],
        fresh_p50_ms=1000 * percentile(second_half, 50) if second_half else float("nan"),
        fresh_p99_ms=1000 * p99,
        late=late,
        lag_first_mb=statistics.fmean(first) / 2**20,
        lag_last_mb=statistics.fmean(last) / 2**20,
        lag_max_mb=max(lags or [0]) / 2**20,
        cores=cores,
        keeps_up=keeps_up,
    )


def settle(sampler: Sampler, *, timeout: float = 300.0) -> float:
    """Wait until the slot lag is near zero again; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if sampler.samples and sampler.samples[-1][1] < 1024 * 1024:
            return time.monotonic() - started
        time.sleep(1.0)
    return float("inf")


def capacity(settings: settings_mod.Settings, sampler: Sampler, quick: bool) -> dict[str, Any]:
    ladder = LADDER_QUICK if quick else LADDER
    seconds = 15.0 if quick else STEP_SECONDS
    steps: list[Step] = []
    for rate in ladder:
        step = hold_rate(settings, sampler, rate, seconds)
        steps.append(step)
        _say(step)
        settle(sampler)
        if not step.keeps_up:
            break
    passing = [s for s in steps if s.keeps_up]
    failing = next((s for s in steps if not s.keeps_up), None)
    confirmed: Step | None = None
    if passing:
        confirmed = hold_rate(settings, sampler, passing[-1].rate, 20.0 if quick else CONFIRM_SECONDS)
        _say(confirmed, "confirm")
        settle(sampler)
        if not confirmed.keeps_up and len(passing) > 1:
            confirmed = hold_rate(settings, sampler, passing[-2].rate, 20.0 if quick else CONFIRM_SECONDS)
            _say(confirmed, "confirm")
            settle(sampler)
    return {
        "steps": [_row(s) for s in steps],
        "confirmed": _row(confirmed) if confirmed else None,
        "capacity": confirmed.rate if confirmed and confirmed.keeps_up else 0.0,
        "saturates_first": failing.busiest if failing else None,
    }


def catchup(settings: settings_mod.Settings, sampler: Sampler, rate: float, quick: bool) -> dict[str, Any]:
    """Load at ``rate``; the tailer is down for an outage in the middle; how fast does it all catch up?"""
    outage = 20.0 if quick else OUTAGE_SECONDS
    before, after = (10.0, 60.0) if quick else (30.0, 240.0)
    counts = {"sent": 0, "failed": 0}
    probes = Probes()
    marks: dict[str, float] = {}
    published: dict[str, float] = {}

    def outage_then_restart() -> None:
        time.sleep(WARMUP + before)
        marks["stop"] = time.monotonic()
        stack.down(parts=["tailer"])
        time.sleep(outage)
        marks["restart"] = time.monotonic()
        lifecycle.up(parts=["tailer"])
        marks["started"] = time.monotonic()
        published["start"] = _published(settings)

    async def go() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=settings.base_url,
            headers={"Authorization": f"Bearer {_token(settings)}"},
            limits=limits,
            timeout=30,
        ) as client:
            await _hold(client, rate, before + outage + after, probes, counts)

    worker = threading.Thread(target=outage_then_restart)
    worker.start()
    asyncio.run(go())
    worker.join()
    lag_after = [(at, lag) for at, lag in sampler.samples if at >= marks["started"]]
    drained_at = next((at for at, lag in lag_after if lag < 1024 * 1024), None)
    backlog_events = rate * (marks["started"] - marks["stop"])
    fresh_again = _fresh_again(probes, marks["restart"])
    published_rate = None
    if drained_at is not None and "start" in published:
        published_rate = (_published(settings) - published["start"]) / max(1e-9, time.monotonic() - marks["started"])
    drain_seconds = drained_at - marks["started"] if drained_at else None
    return {
        "rate": rate,
        "outage_s": outage,
        "backlog_events": round(backlog_events),
        "backlog_mb": max((lag for at, lag in sampler.samples if at >= marks["stop"]), default=0) / 2**20,
        "tailer_drain_s": drain_seconds,
        "tailer_drain_rate": (backlog_events + rate * drain_seconds) / drain_seconds if drain_seconds else None,
        "published_rate_since_restart": published_rate,
        "fresh_again_s": fresh_again,
        "end_to_end_catchup_rate": (backlog_events + rate * fresh_again) / fresh_again if fresh_again else None,
        "failed": counts["failed"],
    }


def _fresh_again(probes: Probes, since: float) -> float | None:
    """Seconds from ``since`` until the probes' freshness is back under the bound for good."""
    after = [(at, s) for at, s in zip(probes.at, probes.samples, strict=True) if at >= since]
    last_bad = max((at for at, s in after if s >= FRESH_BOUND), default=None)
    if last_bad is None:
        return after[0][0] - since if after else None
    later = [at for at, s in after if at > last_bad]
    return later[0] - since if later else None


def _published(settings: settings_mod.Settings) -> float:
    port = settings.environ.get("TAGBUS_TAILER_METRICS_PORT", "9464")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("tagbus_tailer_events_published_total"):
            return float(line.split()[-1])
    return 0.0


def burst(settings: settings_mod.Settings, sampler: Sampler, events: int) -> dict[str, float]:
    """Post ``events`` as fast as the bus takes them; seconds until the last one is served."""
    counts = {"sent": 0, "failed": 0}

    async def go() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(
            base_url=settings.base_url,
            headers={"Authorization": f"Bearer {_token(settings)}"},
            limits=limits,
            timeout=60,
        ) as client:
            started = time.monotonic()
            await steady_load(client, 20_000.0, events / 20_000.0, TAG, keys=KEYS, counts=counts)
            marker = f"{TAG}:bench/burst/{uuid.uuid4().hex[:6]}"
            body = orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": str(uuid.uuid4()),
                    "source": "/bench/capacity",
                    "type": "config.set",
                    "data": {"key": marker, "value": 1},
                }
            )
            answer = await client.post(
                "/v1/events", content=body, headers={"Content-Type": "application/cloudevents+json"}
            )
            assert answer.status_code == 201, answer.text
            posted = time.monotonic()
            while True:
                got = await client.get(f"/v1/config/{marker}")
                if got.status_code == 200:
                    return (time.monotonic() - started, posted - started)
                await asyncio.sleep(0.1)

    total, posting = asyncio.run(go())
    return {
        "events": counts["sent"],
        "failed": counts["failed"],
        "seconds": total,
        "posting_s": posting,
        "end_to_end_rate": counts["sent"] / total,
    }


def wear(settings: settings_mod.Settings, sampler: Sampler, quick: bool) -> dict[str, Any]:
    burst_events = 5_000 if quick else BURST_EVENTS
    total = 50_000 if quick else WEAR_EVENTS
    fresh = burst(settings, sampler, burst_events)
    print(f"wear: fresh stream burst {fresh}", flush=True)
    lifecycle.up()  # the keeper renews the stream while the events flow
    pushed = 0
    started = time.monotonic()
    for _ in range(-(-total // burst_events)):
        chunk = burst(settings, sampler, burst_events)
        pushed += int(chunk["events"])
        print(f"wear: {pushed:,} events pushed in {time.monotonic() - started:,.0f}s", flush=True)
    time.sleep(45)  # an idle pause: when the keeper renews a full stream
    stack.down(parts=["keeper"])
    worn = burst(settings, sampler, burst_events)
    generation = generations.Generation.load(generations.generation_file(stack.StackConfig.from_env()))
    return {
        "events": pushed,
        "seconds": time.monotonic() - started,
        "fresh_burst": fresh,
        "worn_burst": worn,
        "ratio": worn["end_to_end_rate"] / fresh["end_to_end_rate"],
        "kinesis_rss_mb": _rss_mb(stack.status()["kinesis"].pid),
        "generation": asdict(generation) if generation else None,
    }


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _row(step: Step) -> dict[str, Any]:
    row = asdict(step)
    row["busiest"] = step.busiest
    return row


def _say(step: Step, what: str = "step") -> None:
    print(
        f"{what} {step.rate:,.0f}/s: sent {step.sent:,} failed {step.failed}; fresh p50 {step.fresh_p50_ms:,.0f} ms "
        f"p99 {step.fresh_p99_ms:,.0f} ms late {step.late}; "
        f"slot lag {step.lag_first_mb:.1f} → {step.lag_last_mb:.1f} MB "
        f"(max {step.lag_max_mb:.1f}); busiest {step.busiest} {step.cores[step.busiest]:.2f} cores "
        f"(machine {step.cores['machine_busy']:.0%}); {'keeps up' if step.keeps_up else 'falls behind'}",
        flush=True,
    )


def run(quick: bool, rows: list[str], reports_dir: Path) -> dict[str, Any]:
    lifecycle.up()
    settings = settings_mod.load()
    cfg = stack.StackConfig.from_env()
    stack.down(cfg, ["keeper"])
    generations.rotate(cfg, settings, progress=print)  # a fresh stream for every row
    results: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with Sampler(settings.database_url, settings.tailer().slot_name) as sampler:
        if "capacity" in rows:
            results["capacity"] = capacity(settings, sampler, quick)
        if "catchup" in rows:
            rate = (results.get("capacity", {}).get("capacity") or (200.0 if quick else 1_000.0)) / 2
            results["catchup"] = catchup(settings, sampler, rate, quick)
            print(f"catchup: {results['catchup']}", flush=True)
            settle(sampler)
        if "wear" in rows:
            results["wear"] = wear(settings, sampler, quick)
            print(f"wear: {results['wear']}", flush=True)
    lifecycle.up()
    _report(results, reports_dir)
    return results


def _report(results: dict[str, Any], reports_dir: Path) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / "bench-capacity.json"
    previous = orjson.loads(path.read_bytes()) if path.is_file() else {}
    merged = {**previous, **results}
    path.write_bytes(orjson.dumps(merged, option=orjson.OPT_INDENT_2))
    lines = [f"# End-to-end capacity of the local stack\n\n`python -m bench.capacity` — {merged.get('started')}.\n"]
    cap = merged.get("capacity")
    if cap:
        lines += [
            "## Capacity (steady rate, every part real)\n",
            "| rate | sent | failed | fresh p50 / p99 ms (late) | slot lag MB first → last 10 s (max) "
            "| busiest part (cores) | machine busy | keeps up |",
            "|---:|---:|---:|---|---|---|---:|---|",
        ]
        for row in [*cap["steps"], *([cap["confirmed"]] if cap["confirmed"] else [])]:
            lines.append(
                f"| {row['rate']:,.0f}/s ({row['seconds']:.0f} s) | {row['sent']:,} | {row['failed']} "
                f"| {row['fresh_p50_ms']:,.0f} / {row['fresh_p99_ms']:,.0f} ({row['late']}) "
                f"| {row['lag_first_mb']:.1f} → {row['lag_last_mb']:.1f} ({row['lag_max_mb']:.1f}) "
                f"| {row['busiest']} ({row['cores'][row['busiest']]:.2f}) | {row['cores']['machine_busy']:.0%} "
                f"| {'yes' if row['keeps_up'] else 'no'} |"
            )
        lines.append(
            f"\nConfirmed end-to-end capacity: **{cap['capacity']:,.0f} events/s** (the last row, held "
            f"{CONFIRM_SECONDS:.0f} s in a full run); the part that saturates first: **{cap['saturates_first']}**. "
            f"Cores per part in the first row that fell behind: "
            + ", ".join(
                f"{k} {v:.2f}" for k, v in next((r["cores"] for r in cap["steps"] if not r["keeps_up"]), {}).items()
            )
            + ". The bus alone takes far more: `reports/bench-ingest.md`.\n"
        )
    catch = merged.get("catchup")
    if catch:
        lines += [
            "## Catch-up after a tailer outage\n",
            f"Load {catch['rate']:,.0f} events/s; the tailer stopped for {catch['outage_s']:.0f} s "
            f"(backlog ≈ {catch['backlog_events']:,} events, {catch['backlog_mb']:.1f} MB of WAL).\n",
            f"- the tailer drained it in {_fmt(catch['tailer_drain_s'], 's')}: "
            f"{_fmt(catch['tailer_drain_rate'], 'events/s')} (the steady rate is {catch['rate']:,.0f})",
            f"- probe freshness back under {FRESH_BOUND:g} s {_fmt(catch['fresh_again_s'], 's')} after the restart: "
            f"end to end {_fmt(catch['end_to_end_catchup_rate'], 'events/s')} while catching up\n",
        ]
    worn = merged.get("wear")
    if worn:
        lines += [
            "## After wear\n",
            f"{worn['events']:,} events through the stack in {worn['seconds']:,.0f} s with the keeper renewing the "
            f"stream. A burst of {worn['fresh_burst']['events']:,} events end to end: "
            f"{worn['fresh_burst']['end_to_end_rate']:,.0f} events/s on a fresh stream, "
            f"{worn['worn_burst']['end_to_end_rate']:,.0f} events/s after (×{worn['ratio']:.2f}); "
            f"kinesis-mock RSS {_fmt(worn['kinesis_rss_mb'], 'MB')}.\n",
        ]
    (reports_dir / "bench-capacity.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _fmt(value: float | None, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value is not None else f"never (no {unit})"


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    run(options.quick, ["capacity", "catchup"], options.reports_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short ladder and outage (a smoke run)")
    parser.add_argument("--rows", nargs="+", default=["capacity", "catchup"], choices=["capacity", "catchup", "wear"])
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where the report goes")
    args = parser.parse_args(argv)
    run(args.quick, args.rows, args.reports_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
