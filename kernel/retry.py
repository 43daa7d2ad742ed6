"""Capped exponential backoff with jitter: the one retry delay every tagbus part uses.

``FULL`` jitter (a delay anywhere in ``[0, ceiling]``) spreads many clients retrying at once
the most, so reconnecting fleets and client SDKs use it; ``EQUAL`` jitter (``[ceiling/2,
ceiling]``) keeps a minimum pause, for a single worker backing off from a throttling service;
``NONE`` gives the ceiling itself.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass


class Jitter(enum.Enum):
    FULL = "full"
    EQUAL = "equal"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Backoff:
    """The delay before the retry that follows ``attempt`` failures (``attempt`` ≥ 1).

    The ceiling doubles from ``base`` with each failure, up to ``cap`` (a cap below the base
    keeps every delay under it: tests use that to retry at once).
    """

    base: float = 0.1
    cap: float = 10.0
    jitter: Jitter = Jitter.FULL

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap <= 0:
            raise ValueError(f"backoff needs a positive base and cap, not base={self.base} cap={self.cap}")

    def ceiling(self, attempt: int) -> float:
        # Capping the exponent keeps 2**attempt finite for a retry loop that runs for days.
        return float(min(self.cap, self.base * 2.0 ** min(max(attempt, 1) - 1, 62)))

    def delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        ceiling = self.ceiling(attempt)
        if self.jitter is Jitter.FULL:
            return rand() * ceiling
        if self.jitter is Jitter.EQUAL:
            return ceiling / 2 + rand() * ceiling / 2
        return ceiling
