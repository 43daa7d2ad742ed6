"""The reliability report: ``reports/reliability.md`` plus a latency / slot-lag plot (PNG).

Inputs: what the fault and overload tests of this run measured (:class:`Results`, also kept
as ``reports/reliability-results.json``) and, if present, the hostile-input suite's
``reports/reliability-hostile.json`` (``{"kinds": {kind: {"tried", "server_errors",
"cross_tenant_reads"}}}``), written by that suite.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.faults import FaultResult

REPORTS = Path(__file__).resolve().parents[2] / "reports"
MARKDOWN = "reliability.md"
PLOT = "reliability-latency.png"
RESULTS_JSON = "reliability-results.json"
HOSTILE_JSON = "reliability-hostile.json"


@dataclass
class DeliveryResult:
    """One config-delivery case's outcome, as the report shows it (``test_config_delivery.py``)."""

    case: str
    method: str
    watchers: int
    #: Config changes the bus acknowledged during the case.
    changes: int
    #: Watchers that missed a change or ended with a state other than the read models'.
    lost: int
    #: Changes a watcher saw after a higher version of the same key (within one stream).
    out_of_order: int
    recovery_seconds: float | None
    figures: str
    ok: bool


@dataclass
class Results:
    """Everything one run measured; ``overload`` is the soak/overload test's dict (see overload.py)."""

    mode: str
    faults: list[FaultResult] = field(default_factory=list)
    config: list[DeliveryResult] = field(default_factory=list)
    overload: dict[str, Any] | None = None
    #: The pipeline soak's figures (``test_pipeline_soak.py``).
    pipeline: dict[str, Any] | None = None
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    #: Tests of the run that failed, with the first line of their error: a report of a run that
    #: failed says so, whatever figures it still has.
    failed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "started": self.started,
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "config": [dataclasses.asdict(c) for c in self.config],
            "overload": self.overload,
            "pipeline": self.pipeline,
            "failed": self.failed,
        }


def write_report(results: Results, directory: Path = REPORTS) -> Path:
    """Write the JSON results, the plot (when there is a series) and the markdown; the markdown's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULTS_JSON).write_text(json.dumps(results.to_json(), indent=1) + "\n")
    plotted = plot_series(results.overload, directory / PLOT) if results.overload else False
    hostile = _read_hostile(directory / HOSTILE_JSON)
    path = directory / MARKDOWN
    path.write_text(render_markdown(results, hostile, plot=PLOT if plotted else None))
    return path


def _read_hostile(path: Path) -> dict[str, dict[str, int]] | None:
    try:
        kinds = json.loads(path.read_text())["kinds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {
        str(k): {n: int(v.get(n, 0)) for n in ("tried", "server_errors", "cross_tenant_reads")}
        for k, v in kinds.items()
    }


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def render_markdown(results: Results, hostile: dict[str, dict[str, int]] | None, *, plot: str | None) -> str:
    lines = [
        "# Reliability report",
        "",
        f"Run: `{results.mode}` ({'`make reliability`' if results.mode == 'full' else 'short version, as in CI'}),"
        f" started {results.started} on {platform.machine()} ({_cpus()} CPUs), against the real local stack"
        " (PostgreSQL, kinesis-mock, DynamoDB Local, moto, KCL MultiLangDaemon, uvicorn).",
        "",
    ]
    if results.failed:
        lines += [
            f"**{len(results.failed)} test(s) of this run failed**; their rows or figures may be missing below:",
            "",
        ]
        lines += [f"- {failure}" for failure in results.failed]
        lines.append("")
    lines += [
        "## Faults under steady load",
        "",
        "Each row: load from the ledger's driver (config sets/deletes and domain events over 5 fresh tenants),"
        " the fault injected the given number of times, then the ledger check (every acknowledged event stored"
        " exactly once, on the stream in version order, and each read-model key at its last version)."
        " *Duplicated* counts events stored more than once (an effect); *resent* counts records the tailer"
        " published again after a fault (at-least-once, no effect: projections apply by version)."
        " *Recovery* is the time until an event posted right after the fault was readable from its read"
        " model, counted from the kill (kills, PostgreSQL restarts: the restart is part of it) or from the"
        " resume (outages); the worst of the injections. For throttling the throttle lasts the whole row.",
        "",
        "| fault | injected | acked | unacked | lost | duplicated | resent | recovery s | how |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for f in results.faults:
        how = f.method + ("; " + "; ".join(f.notes) if f.notes else "")
        lines.append(
            f"| {f.kind} | {f.injected} | {f.acked} | {f.unacked} | {f.lost} | {f.duplicated} |"
            f" {f.resent_on_stream} | {_seconds(f.recovery_seconds)} | {how} |"
        )
    total_lost = sum(f.lost for f in results.faults)
    total_dup = sum(f.duplicated for f in results.faults)
    lines += [
        "",
        f"Totals: {sum(f.injected for f in results.faults)} faults injected, {sum(f.acked for f in results.faults)}"
        f" events acknowledged, {total_lost} lost, {total_dup} duplicated,"
        f" {sum(f.mismatches for f in results.faults)} mismatches.",
        "",
    ]
    lines += _config_section(results.config)
    lines += [
        "## Hostile input",
        "",
    ]
    if hostile:
        lines += ["| kind | tried | server errors | cross-tenant reads |", "|---|---:|---:|---:|"]
        for kind, row in sorted(hostile.items()):
            lines.append(f"| {kind} | {row['tried']} | {row['server_errors']} | {row['cross_tenant_reads']} |")
        lines.append(
            f"| **total** | {sum(r['tried'] for r in hostile.values())} |"
            f" {sum(r['server_errors'] for r in hostile.values())} |"
            f" {sum(r['cross_tenant_reads'] for r in hostile.values())} |"
        )
    else:
        lines.append(f"(`reports/{HOSTILE_JSON}` not present: the hostile-input suite did not run before this report.)")
    lines += ["", "## Soak and overload", ""]
    lines += _overload_section(results.overload, plot)
    lines += ["", "## The pipeline under a soak", ""]
    lines += _pipeline_section(results.pipeline)
    return "\n".join(lines) + "\n"


def _pipeline_section(pipeline: dict[str, Any] | None) -> list[str]:
    if not pipeline:
        return ["(not run)"]
    step = pipeline["step"]
    lag = pipeline.get("consumer_lag_ms") or {}
    consumer = f"{lag['p50']:.0f} / {lag['p99']:.0f} ms" if lag else "no window logged"
    cores = ", ".join(f"{k} {v:.2f}" for k, v in step["cores"].items() if k != "machine_busy")
    return [
        f"{step['rate']:,.0f} events/s for {step['seconds']:.0f} s: 80% of the end-to-end capacity"
        f" ({pipeline['capacity']:,.0f} events/s, from {pipeline['capacity_from']}), through every part.",
        "",
        "| sent | failed | slot lag MB, first → last 10 s (max) | consumer lag p50 / p99 (commit → applied)"
        " | freshness p50 / p99 (POST → served) | late probes |",
        "|---:|---:|---|---|---|---:|",
        f"| {step['sent']:,} | {step['failed']} | {step['lag_first_mb']:.1f} → {step['lag_last_mb']:.1f}"
        f" ({step['lag_max_mb']:.1f}) | {consumer} | {step['fresh_p50_ms']:,.0f} / {step['fresh_p99_ms']:,.0f} ms"
        f" | {step['late']} |",
        "",
        f"Cores per part: {cores} (machine {step['cores']['machine_busy']:.0%} busy).",
    ]


def _config_section(rows: list[DeliveryResult]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Config delivery",
        "",
        "The config server (gRPC Watch, SSE) and the reader SDK (`ConfigCache`, `AsyncConfigCache`) under faults,"
        " with watchers connected. *Lost* counts watchers that missed an acknowledged change or ended with another"
        " state than the read models (`GET /v1/config`'s source); *out of order* counts changes a watcher received"
        " after a higher version of the same key. *Recovery* is the case's own measure, named in its figures.",
        "",
        "| case | watchers | changes | lost | out of order | recovery s | figures | how |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.watchers} | {r.changes} | {r.lost} | {r.out_of_order} |"
            f" {_seconds(r.recovery_seconds)} | {r.figures} | {r.method} |"
        )
    lines.append("")
    return lines


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _overload_section(overload: dict[str, Any] | None, plot: str | None) -> list[str]:
    if not overload:
        return ["(not run)"]
    cap = overload["capacity"]
    soak = overload["soak"]
    over = overload["overload"]
    after = overload["recovery"]
    lines = [
        f"Capacity, measured first: {cap['events_per_second']:.0f} events/s acknowledged (wrk,"
        f" {cap['clients']} connections, closed loop, {cap['seconds']:.0f} s; p50 {cap['p50_ms']:.1f} ms,"
        f" p99 {cap['p99_ms']:.1f} ms).",
        "",
        f"Soak: {soak['seconds']:.0f} s at {soak['target_rate']:.0f} events/s"
        f" (80%; achieved {soak['achieved_rate']:.0f}/s).",
        "",
        "| process | RSS start MiB | RSS end MiB | growth after warm-up |",
        "|---|---:|---:|---:|",
    ]
    for name, mem in soak["memory"].items():
        lines.append(
            f"| {name} | {mem['start'] / 2**20:.1f} | {mem['end'] / 2**20:.1f} | {mem['growth_percent']:+.1f}% |"
        )
    lines += [
        "",
        "| phase | offered /s | 2xx | 429 | 503 | other | timeouts / conn. errors"
        " | Retry-After on 429/503 | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("soak 80%", soak), ("overload 3×", over), ("after overload 80%", after)]
    rows += [(f"{label}: probes", phase["probes"]) for label, phase in rows if "probes" in phase]
    for label, phase in rows:
        st = phase["statuses"]
        lines.append(
            f"| {label} ({phase['seconds']:.0f} s) | {phase['achieved_rate']:.0f} | {st.get('2xx', 0)} |"
            f" {st.get('429', 0)} | {st.get('503', 0)} | {st.get('other', 0)} | {st.get('timeout', 0)} |"
            f" {phase['retry_after']}/{st.get('429', 0) + st.get('503', 0)} |"
            f" {phase['p50_ms']:.1f} | {phase['p99_ms']:.1f} |"
        )
    if "generator" in over:
        lines += [
            "",
            f"Each phase's load comes from wrk ({soak.get('generator', '?')} for the soak and after it;"
            f" {over['generator']} for the 3× phase), whose p50/p99 are of all its answers (wrk does not"
            " split them by status). The 3× phase offers"
            f" {over['target_rate']:.0f} posts/s, 3× the capacity measured again right before it"
            f" ({cap.get('events_per_second_before_3x', 0):.0f}/s); the bus acknowledged at least"
            f" {over['acked_per_second_min']} posts in every whole second of it. The probes are single posts"
            " from Python workers at 20/s alongside the soak and the phase after the overload; their"
            " p50/p99 are of the acknowledged ones, and they are what the plot shows.",
        ]
    recovered = after.get("recovered_after_s")
    lines += [
        "",
        "Recovery: "
        + (
            f"from {recovered:.0f} s into the phase after the overload, every second's posts were acknowledged (≥ 99%)."
            if recovered is not None
            else "the phase after the overload ended before every second's posts were acknowledged again."
        ),
    ]
    for note in overload.get("notes", []):
        lines += ["", note]
    if plot:
        lines += ["", f"![latency and slot lag]({plot})"]
    return lines


def plot_series(overload: dict[str, Any], path: Path) -> bool:
    """Latency p50/p99 per second and slot lag over the soak, overload and recovery; False if no series."""
    series = overload.get("series") or []
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in series]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(t, [s["p50_ms"] for s in series], label="p50", linewidth=1)
    top.plot(t, [s["p99_ms"] for s in series], label="p99", linewidth=1)
    top.set_yscale("symlog", linthresh=10)
    top.set_ylabel("POST latency ms")
    top.legend(loc="upper left")
    bottom.plot(t, [s["slot_lag_bytes"] / 2**20 for s in series], color="tab:red", linewidth=1)
    bottom.set_ylabel("slot lag MiB")
    bottom.set_xlabel("seconds")
    for marker in overload.get("phases", []):
        for axis in (top, bottom):
            axis.axvline(marker["t"], color="grey", linestyle=":", linewidth=0.8)
        top.annotate(marker["label"], (marker["t"], 1), textcoords="offset points", xytext=(2, 2), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
