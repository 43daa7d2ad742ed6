"""Settings objects of the event bus.

They are plain frozen dataclasses: the composition root (``tagbus.settings``) reads the
environment once and builds them; nothing in ``event_bus`` reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.auth import AuthSettings


@dataclass(frozen=True, slots=True)
class TierQuota:
    """Token-bucket parameters of one tenant tier; ``None`` rate means unlimited."""

    events_per_second: float | None
    burst: int


def default_tiers() -> dict[str, TierQuota]:
    return {
        "basic": TierQuota(events_per_second=100.0, burst=200),
        "premium": TierQuota(events_per_second=1_000.0, burst=2_000),
        "enterprise": TierQuota(events_per_second=None, burst=0),
    }


def default_shed_from() -> dict[str, float]:
    """Pressure (a fraction of the back pressure bound) from which each tier is shed."""
    return {"basic": 0.5, "premium": 0.75, "enterprise": 1.0}


@dataclass(frozen=True, slots=True)
class BusSettings:
    """Settings of the ingest HTTP app."""

    database_url: str
    auth: AuthSettings
    tiers: dict[str, TierQuota] = field(default_factory=default_tiers)
    pool_size: int = 16
    #: Group commit: transactions in flight at once, requests per transaction, and how many
    #: requests may wait for one before the bus answers 503.
    commit_workers: int = 4
    max_commit_group: int = 256
    max_waiting: int = 4_096
    #: A request that waited this long for its group is answered 503 + Retry-After unwritten,
    #: and while the queue runs that late new requests are refused at once: under overload
    #: clients get a fast "try later" instead of a timeout.
    max_queue_delay_seconds: float = 1.0
    #: Requests in progress at once (admission control, ``event_bus.admission``); past it the
    #: bus answers 503 + Retry-After before reading them, so a flood cannot starve the event
    #: loop into timeouts. Health and metrics are exempt.
    max_in_flight: int = 256
    max_event_bytes: int = 1_048_576
    max_batch_events: int = 500
    max_batch_bytes: int = 5 * 1_048_576
    #: Lag-aware back pressure (``event_bus.backpressure``): past a fraction of these bounds on
    #: the tailer's slot lag and on the pipeline's freshness, the bus refuses a tier's writes
    #: (503 + Retry-After), basic first. Off while both are ``None``. Keep the lag bound well
    #: below the server's ``max_slot_wal_keep_size``, and freshness well above the tailer's heartbeat.
    backpressure_lag_bytes: int | None = None
    backpressure_freshness_seconds: float | None = None
    #: The tailer's replication slot, and how often the bus samples it.
    backpressure_slot: str = "tagbus_tailer"
    backpressure_interval_seconds: float = 1.0
    backpressure_shed_from: dict[str, float] = field(default_factory=default_shed_from)
