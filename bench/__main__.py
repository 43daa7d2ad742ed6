"""``python -m bench [--quick] [--only NAME …] [--database-url URL]``: run every benchmark here.

Every module with ``run_benchmark(options)`` runs in this process, in turn.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import time
from collections.abc import Callable
from typing import cast

import psycopg

import bench
from bench import BenchOptions

STACK_URL = "postgresql://tagbus:tagbus@127.0.0.1:55432/tagbus"
ENV_URL = "TAGBUS_BENCH_DATABASE_URL"


def discover() -> list[str]:
    """Benchmark module names of this package, in name order (``ingest`` first).

    A module named ``<name>_<part>`` beside a module ``<name>`` is one of that benchmark's
    helpers (``config_watch_watchers`` of ``config_watch``), not a benchmark of its own.
    """
    every = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    names = sorted(n for n in every if not any(n.startswith(f"{other}_") for other in every))
    return sorted(names, key=lambda n: n != "ingest")


def server_url(explicit: str | None) -> str | None:
    """The server to use: explicit, else the local stack's PostgreSQL if it answers, else none."""
    if explicit:
        return explicit
    try:
        with psycopg.connect(STACK_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return None
    return STACK_URL


def run_module(name: str, options: BenchOptions) -> bool:
    module = importlib.import_module(f"bench.{name}")
    entry = getattr(module, "run_benchmark", None)
    if entry is None:
        print(f"bench.{name}: no run_benchmark(); skipped")
        return True
    cast(Callable[[BenchOptions], None], entry)(options)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run the tagbus benchmarks.")
    parser.add_argument("--quick", action="store_true", help="short smoke run (small counts, < 60 s)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these modules (repeatable)")
    parser.add_argument(
        "--database-url", default=os.environ.get(ENV_URL), help=f"admin URL of the server (default: ${ENV_URL})"
    )
    args = parser.parse_args(argv)
    options = BenchOptions(quick=args.quick, server_url=server_url(args.database_url))
    print(f"server: {options.server_url or 'throwaway cluster'}; {'quick' if options.quick else 'full'} run")
    failed: list[str] = []
    for name in discover():
        if args.only and name not in args.only:
            continue
        print(f"\n== bench.{name} ==", flush=True)
        started = time.monotonic()
        if not run_module(name, options):
            failed.append(name)
        print(f"== bench.{name}: {time.monotonic() - started:.1f}s ==", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
