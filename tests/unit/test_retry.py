"""The shared backoff: ceilings double up to the cap, jitter stays inside its band."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.retry import Backoff, Jitter


def test_ceiling_doubles_from_base_up_to_cap() -> None:
    backoff = Backoff(base=0.5, cap=3.0)
    assert [backoff.ceiling(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.ceiling(10_000) == 3.0


@given(st.integers(1, 200), st.floats(0, 1, exclude_max=True), st.sampled_from(list(Jitter)))
def test_delay_stays_in_its_band(attempt: int, rand: float, jitter: Jitter) -> None:
    backoff = Backoff(base=0.1, cap=5.0, jitter=jitter)
    ceiling = backoff.ceiling(attempt)
    delay = backoff.delay(attempt, rand=lambda: rand)
    low = {Jitter.FULL: 0.0, Jitter.EQUAL: ceiling / 2, Jitter.NONE: ceiling}[jitter]
    assert low <= delay <= ceiling


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(base=1.0, cap=0.0)
