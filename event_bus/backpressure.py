"""Lag-aware back pressure: the bus sheds ingest by tier while the pipeline behind it is behind.

The bus answers ``201`` once the events table has committed; the tailer publishes the WAL to
Kinesis at its own pace. When it falls behind, every event accepted makes two things worse:
the slot holds back more WAL (past ``max_slot_wal_keep_size`` PostgreSQL invalidates it), and
config takes longer to reach the read models. So the bus watches the tailer's slot and, past
a configured bound, refuses ingest with ``503`` + ``Retry-After`` — the tiers that pay least
first — until the pipeline has caught up.

Two signals, sampled by :class:`PipelineLag` once per interval:

- *slot lag*: ``pg_current_wal_lsn() - confirmed_flush_lsn`` of the tailer's slot, the WAL the
  tailer has not confirmed, i.e. not yet acknowledged by Kinesis.
- *freshness*: the age of the oldest WAL the slot has not confirmed (:class:`FreshnessTracker`).
  Each sample notes when the server's WAL had reached which position; the oldest noted position
  past the slot's confirmed one says since when unpublished WAL has existed. This was chosen
  over "time since the slot's confirmed position last moved" because that proxy reads near zero
  for a tailer that keeps moving but falls behind — the failure seen in issue 20, where the
  tailer drained steadily while its backlog grew in a straight line. Its resolution is one
  interval. On a quiet server it can read up to the tailer's heartbeat (the slot moves past
  WAL that holds no events only on heartbeats and keepalives), so a freshness bound must be
  well above that.

The sample is one catalog query on a connection of the watcher's own: never one of the
request pool's, so a slow sample cannot delay a commit and a saturated pool cannot blind the
watcher. The cost is one idle connection per bus.

The policy (:class:`ShedPolicy`) folds both signals into one *pressure*: the larger of
lag / lag bound and freshness / freshness bound (1.0 = at a bound). Each tier is shed from a
fraction of it — basic from 0.5, premium from 0.75, enterprise from 1.0 — and readmitted once
the pressure is below ``release`` (0.8) of that fraction, so a pressure hovering at a
threshold does not flap. ``Retry-After`` grows with how far the pressure is past the tier's
threshold. A request is checked after its token and before its quota and body, with one dict
lookup against what the watcher last decided.

When the signal cannot be read (the database unreachable, the slot missing) nothing is shed:
the store answers ``503`` by itself when the database is down, and a watcher that cannot see
the pipeline should not refuse writes on an old picture of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Gauge

from event_bus.problems import Problem
from event_bus.settings import BusSettings, default_shed_from

log = logging.getLogger("tagbus.backpressure")

# Both positions as byte offsets, so nothing here parses the ``X/Y`` text form of an LSN.
_SAMPLE = (
    "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint"
    " FROM pg_replication_slots WHERE slot_name = %s"
)
_KEEP_SIZE = "SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'"


@dataclass(frozen=True, slots=True)
class SlotPosition:
    """One reading of the tailer's slot: where the server's WAL is, and how far the slot confirmed."""

    wal_lsn: int
    confirmed_lsn: int


@dataclass(frozen=True, slots=True)
class Lag:
    """How far the pipeline behind the bus is behind, as last measured."""

    slot_lag_bytes: int
    freshness_seconds: float


class FreshnessTracker:
    """The age of the oldest WAL the slot has not confirmed, from the positions seen over time.

    It keeps marks ``(time, WAL position)``, one per sample in which the WAL moved; a mark is
    dropped once the slot has confirmed past it. The first mark left is the first time WAL
    beyond the confirmed position was seen. At ``max_marks`` every other mark is dropped
    (never the oldest): a long backlog costs resolution, not memory, and not the estimate.
    """

    def __init__(self, *, max_marks: int = 1024) -> None:
        if max_marks < 2:
            raise ValueError(f"max_marks must be at least 2, not {max_marks}")
        self._max_marks = max_marks
        self._marks: deque[tuple[float, int]] = deque()

    def observe(self, now: float, position: SlotPosition) -> Lag:
        marks = self._marks
        while marks and marks[0][1] <= position.confirmed_lsn:
            marks.popleft()
        lag = position.wal_lsn - position.confirmed_lsn
        if lag <= 0:
            marks.clear()
            return Lag(0, 0.0)
        if not marks or marks[-1][1] < position.wal_lsn:
            if len(marks) >= self._max_marks:
                self._marks = marks = deque(itertools.islice(marks, 0, None, 2))
            marks.append((now, position.wal_lsn))
        return Lag(lag, max(0.0, now - marks[0][0]))


@dataclass(frozen=True, slots=True)
class _Shed:
    """Why a tier is refused now, rendered into a fresh problem per refused request."""

    detail: str
    retry_after: int


class ShedPolicy:
    """Which tiers are refused at the measured lag, with hysteresis, and what they are told.

    ``lag_bound_bytes`` and ``freshness_bound_seconds`` are the bounds (either may be ``None``,
    not both); ``shed_from`` maps each tier to the pressure it is shed from (a tier it does
    not name is treated as the lowest one); a tier is readmitted below ``release`` times that.
    ``Retry-After`` is ``retry_base_seconds`` times the pressure over the tier's threshold
    (at least one second, at most ``max_retry_seconds``): the further past it, the longer
    to wait, and lower tiers, which are readmitted last, wait longer.
    """

    def __init__(
        self,
        *,
        lag_bound_bytes: int | None,
        freshness_bound_seconds: float | None,
        shed_from: Mapping[str, float] | None = None,
        release: float = 0.8,
        retry_base_seconds: float = 2.0,
        max_retry_seconds: int = 60,
    ) -> None:
        if lag_bound_bytes is None and freshness_bound_seconds is None:
            raise ValueError("back pressure needs a lag bound, a freshness bound or both")
        if lag_bound_bytes is not None and lag_bound_bytes <= 0:
            raise ValueError(f"the lag bound must be positive, not {lag_bound_bytes}")
        if freshness_bound_seconds is not None and freshness_bound_seconds <= 0:
            raise ValueError(f"the freshness bound must be positive, not {freshness_bound_seconds}")
        shed_from = default_shed_from() if shed_from is None else shed_from
        if not shed_from or any(f <= 0 for f in shed_from.values()):
            raise ValueError("every tier needs a positive threshold")
        if not 0 < release < 1:
            raise ValueError(f"release must be between 0 and 1, not {release}")
        self.lag_bound_bytes = lag_bound_bytes
        self.freshness_bound_seconds = freshness_bound_seconds
        self.shed_from = dict(shed_from)
        self._lowest = min(self.shed_from, key=self.shed_from.__getitem__)
        self._release = release
        self._retry_base = retry_base_seconds
        self._max_retry = max_retry_seconds
        self._shed: dict[str, _Shed] = {}

    def pressure(self, lag: Lag) -> float:
        """How close the pipeline is to its bounds: 1.0 at the nearer one, past it above."""
        ratios = [0.0]
        if self.lag_bound_bytes is not None:
            ratios.append(lag.slot_lag_bytes / self.lag_bound_bytes)
        if self.freshness_bound_seconds is not None:
            ratios.append(lag.freshness_seconds / self.freshness_bound_seconds)
        return max(ratios)

    def update(self, lag: Lag | None) -> None:
        """Decide again from a new measurement; ``None`` (unknown) sheds nothing."""
        if lag is None:
            self._shed = {}
            return
        pressure = self.pressure(lag)
        shed: dict[str, _Shed] = {}
        for tier, threshold in self.shed_from.items():
            held = tier in self._shed and pressure >= threshold * self._release
            if pressure >= threshold or held:
                retry = min(self._max_retry, max(1, math.ceil(self._retry_base * pressure / threshold)))
                detail = (
                    f"the pipeline is behind (slot lag {lag.slot_lag_bytes:,} bytes, freshness "
                    f"{lag.freshness_seconds:.0f} s): writes of the {tier} tier are paused until it catches up"
                )
                shed[tier] = _Shed(detail, retry)
        # One assignment: a request reads either the old decision or the new one.
        self._shed = shed

    @property
    def shedding(self) -> frozenset[str]:
        """The tiers refused now."""
        return frozenset(self._shed)

    def check(self, tier: str) -> None:
        """Raise the ``503`` problem when ``tier`` is refused now; per request, so cheap."""
        shed = self._shed
        if not shed:
            return
        refused = shed.get(tier if tier in self.shed_from else self._lowest)
        if refused is not None:
            # A fresh problem per request: raising one instance again grows its traceback.
            raise Problem(
                503,
                "pipeline-behind",
                "Service unavailable",
                refused.detail,
                headers={"Retry-After": str(refused.retry_after)},
                extra={"tier": tier},
            )


class _Metrics:
    def __init__(self, registry: CollectorRegistry, policy: ShedPolicy) -> None:
        self.shedding = Gauge(
            "tagbus_backpressure_shedding", "1 while the tier's writes are refused (503)", ["tier"], registry=registry
        )
        for tier in policy.shed_from:
            self.shedding.labels(tier).set(0)
        self.slot_lag = Gauge(
            "tagbus_pipeline_slot_lag_bytes",
            "WAL bytes the tailer's slot has not confirmed (NaN when unknown)",
            registry=registry,
        )
        self.freshness = Gauge(
            "tagbus_pipeline_freshness_seconds",
            "Age of the oldest WAL the tailer's slot has not confirmed (NaN when unknown)",
            registry=registry,
        )
        # The bounds are exported so that alert rules need not repeat the configuration.
        if policy.lag_bound_bytes is not None:
            Gauge("tagbus_backpressure_lag_bound_bytes", "Slot lag at which every tier is shed", registry=registry).set(
                policy.lag_bound_bytes
            )
        if policy.freshness_bound_seconds is not None:
            Gauge(
                "tagbus_backpressure_freshness_bound_seconds",
                "Freshness at which every tier is shed",
                registry=registry,
            ).set(policy.freshness_bound_seconds)
        self.slot_lag.set(math.nan)
        self.freshness.set(math.nan)


def pipeline_lag(settings: BusSettings, registry: CollectorRegistry) -> PipelineLag | None:
    """The bus's watcher of the pipeline, or ``None`` when back pressure is off (no bound set)."""
    if settings.backpressure_lag_bytes is None and settings.backpressure_freshness_seconds is None:
        return None
    policy = ShedPolicy(
        lag_bound_bytes=settings.backpressure_lag_bytes,
        freshness_bound_seconds=settings.backpressure_freshness_seconds,
        shed_from=settings.backpressure_shed_from,
    )
    return PipelineLag(
        settings.database_url,
        settings.backpressure_slot,
        policy,
        registry=registry,
        interval_seconds=settings.backpressure_interval_seconds,
    )


class PipelineLag:
    """Watches the tailer's slot from inside the bus and keeps :class:`ShedPolicy` up to date.

    :meth:`start` samples once before returning (the first request already sees the pipeline's
    state), then every ``interval_seconds`` in a background task until :meth:`stop`. Failures
    are logged when they start and end, never raised.
    """

    def __init__(
        self,
        database_url: str,
        slot_name: str,
        policy: ShedPolicy,
        *,
        registry: CollectorRegistry,
        interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        connect_timeout: int = 5,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"the interval must be positive, not {interval_seconds}")
        self.policy = policy
        self.slot_name = slot_name
        self._url = database_url
        self._interval = interval_seconds
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._freshness = FreshnessTracker()
        self._metrics = _Metrics(registry, policy)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None

    async def start(self) -> None:
        await self.sample_once()
        self._task = asyncio.create_task(self._loop(), name="pipeline-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def sample_once(self) -> Lag | None:
        """Read the slot, update the policy and the metrics; the lag, or ``None`` when unknown."""
        try:
            async with asyncio.timeout(max(self._interval, self._connect_timeout)):
                position = await self._read()
        except (psycopg.Error, TimeoutError, OSError) as e:
            await self._close()
            self._unknown(f"cannot read slot {self.slot_name!r}: {type(e).__name__}: {e}".strip())
            return None
        if position is None:
            self._unknown(f"no replication slot {self.slot_name!r} (or it has no confirmed position)")
            return None
        if self._failing is not None:
            log.info("pipeline lag readable again on slot %s", self.slot_name)
            self._failing = None
        lag = self._freshness.observe(self._clock(), position)
        self._apply(lag)
        return lag

    def _apply(self, lag: Lag | None) -> None:
        before = self.policy.shedding
        self.policy.update(lag)
        after = self.policy.shedding
        metrics = self._metrics
        metrics.slot_lag.set(math.nan if lag is None else lag.slot_lag_bytes)
        metrics.freshness.set(math.nan if lag is None else lag.freshness_seconds)
        for tier in self.policy.shed_from:
            metrics.shedding.labels(tier).set(1 if tier in after else 0)
        if after != before and lag is not None:
            tiers = ", ".join(sorted(after, key=self.policy.shed_from.__getitem__)) or "none"
            level = logging.WARNING if after - before else logging.INFO
            log.log(
                level,
                "back pressure: shedding %s (slot lag %d bytes, freshness %.1f s)",
                tiers,
                lag.slot_lag_bytes,
                lag.freshness_seconds,
            )

    def _unknown(self, reason: str) -> None:
        if reason != self._failing:
            log.warning("%s; back pressure sheds nothing until it is readable", reason)
            self._failing = reason
        self._apply(None)

    async def _read(self) -> SlotPosition | None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name="tagbus-bus-backpressure",
            )
            await self._check_bound(conn)
        row = await (await conn.execute(_SAMPLE, (self.slot_name,))).fetchone()
        if row is None or row[1] is None:
            return None
        return SlotPosition(wal_lsn=int(row[0]), confirmed_lsn=int(row[1]))

    async def _check_bound(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Warn when the lag bound leaves no room before the server invalidates the slot."""
        bound = self.policy.lag_bound_bytes
        row = await (await conn.execute(_KEEP_SIZE)).fetchone()
        if bound is None or row is None or int(row[0]) < 0:
            return
        keep = int(row[0]) * 1_048_576  # the setting is in MB
        if bound > keep // 2:
            log.warning(
                "the back pressure lag bound (%d bytes) is not well below max_slot_wal_keep_size (%d bytes): "
                "the slot may be invalidated before the bus sheds enterprise writes",
                bound,
                keep,
            )

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.sample_once()
