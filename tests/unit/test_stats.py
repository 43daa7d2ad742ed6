"""The one percentile function: statistics.quantiles, inclusive."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.stats import percentile


def test_known_points() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)


def test_empty_is_nan_and_bad_q_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=200), st.floats(0, 100))
def test_within_range_and_monotonic(values: list[float], q: float) -> None:
    low, high = percentile(values, q), percentile(values, min(100.0, q + 1))
    assert min(values) - 1e-6 <= low <= max(values) + 1e-6
    assert low <= high + 1e-6
