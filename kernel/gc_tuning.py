"""Garbage-collector settings for tagbus's long-running processes.

CPython frees almost everything by reference counting; its cyclic collector only finds
reference cycles. By default it runs a young collection every 700 net allocations of
container objects, and every tenth of those also scans the middle generation. A bus
answering thousands of requests a second allocates that many objects in a fraction of a
millisecond, so it collected hundreds of times a second, and the occasional full collection
walked every object the process had (the app, its routes and models, pydantic's schemas):
a pause that every request in progress waited out.

On the bus, :func:`quiet_collector` cut the p99 of single events sharply and raised their
throughput against the defaults (``docs/benchmarks.md``, Ingest). The thresholds alone give
most of it; the freeze adds a little.

Cycles are still collected, only in larger steps: garbage that lives in cycles waits up to
``YOUNG`` allocations instead of 700 before it is found. Memory stays bounded (the soak of
the reliability suite watches the bus's RSS).
"""

from __future__ import annotations

import gc

#: Net container allocations between young collections (CPython's default: 700).
YOUNG = 20_000
#: Young collections per middle one, and middle ones per full one (defaults: 10 and 10).
MIDDLE = 50
OLD = 100


def quiet_collector() -> None:
    """Collect once, move every object alive now out of the collector's sight (the process's
    code and configuration, which live as long as it does), and collect in larger steps.

    Call it once the process has started up, before it serves.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
