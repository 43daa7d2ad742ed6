"""How long a cache waits before watching again: full-jitter exponential backoff.

The window doubles with each failure in a row, from ``base`` up to ``cap``, and the delay is
drawn uniformly inside it (full jitter), so a fleet of caches cut off at once comes back spread
over the window instead of in one wave. A stream that stayed healthy for ``stable_after``
seconds resets the window: one later failure does not inherit the delays of an old outage.

A clean end of a stream that delivered something (the server caps stream lifetime, or stops)
and a resync are not failures: the next watch starts at once, whatever the failures before.
Only :attr:`Backoff.quick_limit` such immediate restarts in a row are allowed without a stream
staying up for ``stable_after``; past them (a server that keeps ending streams right away, or
keeps answering resync) the restarts are backed off like failures. A clean end of a stream
that delivered nothing is a failure.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Delays between watch attempts; ``rand`` and ``clock`` are injectable for tests."""

    #: Immediate restarts (clean ends, resyncs) in a row before they are backed off.
    quick_limit = 3

    def __init__(
        self,
        *,
        base: float = 0.25,
        cap: float = 30.0,
        stable_after: float = 30.0,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base, self.cap, self.stable_after = base, cap, stable_after
        self._rand, self._clock = rand, clock
        self._failures = 0
        self._healthy_since: float | None = None
        self._quick = 0

    @property
    def failures(self) -> int:
        """Failures in a row counted towards the window (0 after a reset)."""
        return self._failures

    def healthy(self) -> None:
        """A stream is delivering: start counting its stable period (first call per stream)."""
        if self._healthy_since is None:
            self._healthy_since = self._clock()

    def after_failure(self) -> float:
        """The delay before the next attempt, after a failed or stalled stream."""
        self._settle()
        # The exponent stops growing once the window is capped (a float overflows past 2**1023).
        window = min(self.cap, self.base * 2.0 ** min(self._failures, 64))
        self._failures += 1
        return self._rand() * window

    def after_end(self) -> float:
        """The delay after a clean end or a resync: none, unless it keeps happening."""
        was_healthy = self._healthy_since is not None
        self._settle()
        if was_healthy and self._quick < self.quick_limit:
            self._quick += 1
            return 0.0
        return self.after_failure()

    def _settle(self) -> None:
        """End the current stream's healthy period, resetting the window if it was long enough."""
        if self._healthy_since is not None and self._clock() - self._healthy_since >= self.stable_after:
            self._failures = 0
            self._quick = 0
        self._healthy_since = None
