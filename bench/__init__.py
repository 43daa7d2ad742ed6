"""Benchmarks run by ``make bench`` (``python -m bench``); results go under ``reports/``.

A benchmark module exposes ``run_benchmark(options: BenchOptions) -> None``; the runner
(:mod:`bench.__main__`) finds every such module in this package and calls them in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kernel.stats import percentile

__all__ = ["REPO_ROOT", "BenchOptions", "percentile"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What every benchmark is told: how long to run, where the server is, where reports go."""

    quick: bool
    #: Admin URL of a PostgreSQL server (a role that may create databases); ``None`` starts a
    #: throwaway cluster.
    server_url: str | None
    reports_dir: Path = REPO_ROOT / "reports"
