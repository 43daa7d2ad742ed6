"""Percentiles, one way everywhere: :func:`statistics.quantiles` with the inclusive method."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in 0–100, e.g. 99.9) of ``values``; NaN when empty.

    Linear interpolation between the closest ranks (the inclusive method: the 0th is the
    minimum and the 100th the maximum, whatever the sample size).
    """
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, not {q}")
    if not values:
        return math.nan
    if len(values) == 1 or q == 0:
        return float(min(values))
    if q == 100:
        return float(max(values))
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[min(len(cuts) - 1, max(0, round(q * 10) - 1))]
