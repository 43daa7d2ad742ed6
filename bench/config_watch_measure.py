"""What the ``config_watch`` benchmark reads its figures with: percentiles, ``/proc``, ``/metrics``.

Percentiles are :func:`bench.percentile` (:func:`statistics.quantiles`, inclusive method: the
sample's own range), so a p99 of fewer than 100 samples is interpolated, never invented.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import percentile

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """``n``, ``p50_ms``, ``p99_ms`` and ``max_ms`` of durations given in seconds (NaN when empty)."""
    return {
        "n": len(seconds),
        "p50_ms": 1000 * percentile(seconds, 50),
        "p99_ms": 1000 * percentile(seconds, 99),
        "max_ms": 1000 * percentile(seconds, 100),
    }


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """A process's resident memory and CPU time at one moment (from ``/proc/<pid>``)."""

    rss_bytes: int
    cpu_seconds: float

    @classmethod
    def of(cls, pid: int) -> ProcessSample:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        # Fields after the command name (which may hold spaces, so split after its closing
        # parenthesis): utime and stime are the 14th and 15th fields of the whole line.
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(stat[11]) + int(stat[12])
        return cls(rss_kb * 1024, ticks / _CLOCK_TICKS)


def machine_cpu_seconds() -> float:
    """CPU seconds every core spent busy since boot (``/proc/stat``), to show how loaded the host was."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition as ``{(name, sorted labels): value}``."""
    samples: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(_LABEL.findall(labels or "")))
        try:
            samples[(name, pairs)] = float(value)
        except ValueError:
            continue
    return samples


def metric_sum(samples: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name`` over every label set that has ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= set(pairs))


def histogram_delta(before: Metrics, after: Metrics, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name`` (summed over its label sets) gained between two scrapes."""
    buckets: dict[float, float] = {}
    for (n, pairs), value in after.items():
        if n != f"{name}_bucket":
            continue
        le = dict(pairs).get("le")
        if le is None:
            continue
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get((n, pairs), 0.0)
    return dict(sorted(buckets.items()))


def histogram_quantile(buckets: Mapping[float, float], q: float) -> float:
    """The ``q``-quantile (0–1) of cumulative buckets, interpolated within a bucket as Prometheus does."""
    if not buckets:
        return math.nan
    total = max(buckets.values())
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets.items():
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower
