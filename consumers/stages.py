"""Where a batch's time went between the events table and the read model, logged periodically.

One :class:`BatchTimes` per ``processRecords`` call, from timestamps the processor already has:

* ``commit_to_arrival``: the oldest event's ``recorded_at`` (commit) to its Kinesis record's
  ``ApproximateArrivalTimestamp`` — the tailer's share (WAL read, ``PutRecords``);
* ``arrival_to_receive``: that arrival to the moment the processor got the batch — the KCL's
  share (the polling interval, ``GetRecords``, the batch waiting behind the one before it);
* ``queued``: received to the start of its apply (0 unless the processor is pipelined and
  the batch waited for the one being applied);
* ``apply``: the read models' writes (batches queued together are applied together);
* ``commit_to_applied``: the oldest event's commit to the batch being in the read model, the
  worst staleness of the batch as the consumer sees it;
* ``millis_behind_latest``: the KCL's own lag figure for the ``GetRecords`` behind the batch.

Checkpoints are timed on their own (``checkpoint``): they are not taken for every batch.
:class:`StageRecorder` keeps what happened in the last ``interval`` seconds and logs one line
``stage timings {json}`` with the counts and the p50/p99/max of each stage in milliseconds
(``bench.freshness`` reads these lines back from the consumer's log). Clocks are the host's
wall clock on both sides, so the figures hold on one machine, not across hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import orjson

from kernel.stats import percentile

log = logging.getLogger(__name__)

#: The log line's prefix; the JSON object follows it.
STAGE_LINE = "stage timings "
#: Seconds between the production processor's stage lines.
STAGE_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Seconds each stage took for one batch (see the module docstring)."""

    commit_to_arrival: float
    arrival_to_receive: float
    queued: float
    apply: float
    commit_to_applied: float
    millis_behind_latest: float


STAGES = tuple(f.name for f in fields(BatchTimes))


class StageRecorder:
    """Collects :class:`BatchTimes` and checkpoint durations; logs percentiles every ``interval`` s.

    Thread-safe: a pipelined processor observes batches from its applier thread and
    checkpoints from the KCL's.
    """

    def __init__(
        self,
        *,
        interval: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.interval = interval
        self._monotonic = monotonic
        self._emit = emit or (lambda line: log.info("%s", line))
        self._lock = threading.Lock()
        self._batches: list[BatchTimes] = []
        self._checkpoints: list[float] = []
        self._started = monotonic()

    def observe(self, times: BatchTimes) -> None:
        with self._lock:
            self._batches.append(times)
        self._maybe_flush()

    def observe_checkpoint(self, seconds: float) -> None:
        with self._lock:
            self._checkpoints.append(seconds)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.interval > 0 and self._monotonic() - self._started >= self.interval:
            self.flush()

    def flush(self) -> dict[str, Any] | None:
        """Log (and return) the summary of the batches since the last one; ``None`` if there were none."""
        with self._lock:
            self._started = self._monotonic()
            batches, self._batches = self._batches, []
            checkpoints, self._checkpoints = self._checkpoints, []
        if not batches:
            return None
        summary: dict[str, Any] = {"batches": len(batches), "checkpoints": len(checkpoints)}
        for stage in STAGES:
            scale = 1.0 if stage == "millis_behind_latest" else 1000.0
            summary[stage] = summarize([getattr(b, stage) for b in batches], scale=scale)
        if checkpoints:
            summary["checkpoint"] = summarize(checkpoints)
        self._emit(STAGE_LINE + orjson.dumps(summary).decode())
        return summary


def summarize(values: list[float], *, scale: float = 1000.0) -> dict[str, float]:
    """p50, p99 and max of ``values`` times ``scale`` (seconds to milliseconds by default)."""
    return {q: round(scale * percentile(values, n), 1) for q, n in (("p50", 50), ("p99", 99), ("max", 100))}


def parse_stage_line(line: str) -> dict[str, Any] | None:
    """The summary in a log line written by :class:`StageRecorder`, else ``None``."""
    at = line.find(STAGE_LINE)
    if at < 0:
        return None
    try:
        body = orjson.loads(line[at + len(STAGE_LINE) :].strip())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) and "batches" in body else None
