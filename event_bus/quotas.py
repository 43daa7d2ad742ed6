"""Per-tenant token buckets: the bus's back pressure against a tenant over its quota."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from event_bus.problems import Problem, too_large
from event_bus.settings import TierQuota
from kernel.auth import Principal


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: int
    tokens: float
    stamp: float


class QuotaGate:
    """Admits events per tenant at the rate of its tier (or its token's ``quota`` claim)."""

    def __init__(self, tiers: Mapping[str, TierQuota], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._tiers = tiers
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, principal: Principal, cost: int = 1) -> None:
        """Take ``cost`` tokens from the tenant's bucket or raise a 429 problem.

        ``cost=0`` takes nothing but still refuses a tenant whose bucket is empty.
        """
        rate, burst = self._limits(principal)
        if rate is None:
            return
        now = self._clock()
        bucket = self._buckets.get(principal.tenant)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[principal.tenant] = _Bucket(rate, burst, float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if cost > burst:
            # Never admissible, however long the client waits: a 429 would have it retry
            # forever (the SDK honours Retry-After). The batch is over this tenant's limit.
            raise too_large(f"a batch of {cost} events exceeds the tenant's burst of {burst}; send at most {burst}")
        if bucket.tokens < max(cost, 1):
            wait = math.ceil((cost - bucket.tokens) / rate)
            raise Problem(
                429,
                "quota-exceeded",
                "Too many events",
                f"tenant over its quota of {rate:g} events/s",
                headers=_headers(burst, int(bucket.tokens), wait),
            )
        bucket.tokens -= cost

    def _limits(self, principal: Principal) -> tuple[float | None, int]:
        if principal.quota is not None:
            return principal.quota.events_per_second, principal.quota.burst
        tier = self._tiers.get(principal.tier) or self._tiers["basic"]
        return tier.events_per_second, tier.burst


def _headers(limit: int, remaining: int, reset: int) -> dict[str, str]:
    reset = max(1, reset)
    return {
        "Retry-After": str(reset),
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(reset),
    }
