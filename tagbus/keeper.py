"""The local stack's keeper (``tagbus keeper``, the ``keeper`` part): it keeps the stack running.

Every few seconds it

- **starts again a part that died**: one whose pid file is left but whose process is gone (a
  part stopped by ``tagbus down`` has no pid file and stays stopped). It waits
  ``revive_after`` seconds first, so an operator's own ``tagbus up`` goes first, and backs
  off between attempts on a part that keeps dying. A kinesis-mock found dead is repaired on the
  way (:func:`tagbus.generations.repair_after_crash`);
- **renews the Kinesis stream** before kinesis-mock wears out: it adds up the records and
  bytes the tailer reports as acknowledged (``tagbus_tailer_kinesis_records_total``,
  ``…_bytes_total``) and, past the :class:`~tagbus.generations.RotationPolicy`, rotates the
  stream (:func:`tagbus.generations.rotate`) once the tailer has been idle for
  ``idle_before_rotation`` seconds, or at once past ``hard_factor`` times the policy, so that
  a rotation does not pause the pipeline in the middle of a burst unless it must.

Each round holds the stack lock (:mod:`tagbus.stack_lock`) and skips itself while
``tagbus up`` or ``tagbus down`` holds it. The keeper is local-stack only: in production the
platform restarts processes and Kinesis trims itself.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kernel.retry import Backoff, Jitter
from tagbus import generations, lifecycle, stack, stack_lock
from tagbus.settings import Settings

log = logging.getLogger(__name__)

_RECORDS = "tagbus_tailer_kinesis_records_total"
_BYTES = "tagbus_tailer_kinesis_bytes_total"
_LAST_PUBLISH = "tagbus_tailer_last_publish_timestamp_seconds"


@dataclass(frozen=True, slots=True)
class KeeperSettings:
    """How often the keeper looks, and when it acts."""

    interval: float = 5.0
    revive_after: float = 10.0
    idle_before_rotation: float = 30.0
    hard_factor: float = 2.0
    policy: generations.RotationPolicy = field(default_factory=generations.RotationPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeeperSettings:
        return cls(policy=generations.RotationPolicy.from_env(env))


@dataclass(frozen=True, slots=True)
class TailerReading:
    """What the keeper needs from the tailer's ``/metrics``."""

    records: float
    bytes: float
    last_publish: float


def read_tailer(url: str, stream: str, *, timeout: float = 3.0) -> TailerReading | None:
    """The tailer's Kinesis counters for ``stream``; ``None`` when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (_RECORDS, _BYTES) and sample.labels.get("stream") != stream:
                continue
            values[sample.name] = sample.value
    return TailerReading(
        records=values.get(_RECORDS, 0.0), bytes=values.get(_BYTES, 0.0), last_publish=values.get(_LAST_PUBLISH, 0.0)
    )


class Keeper:
    """One round at a time (:meth:`tick`); :meth:`run` repeats it until stopped."""

    def __init__(
        self,
        cfg: stack.StackConfig,
        settings: Settings,
        keeper: KeeperSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        self._settings = settings
        self._keeper = keeper
        self._clock = clock
        self._wall_clock = wall_clock
        self._dead_since: dict[str, float] = {}
        self._attempts: dict[str, int] = {}
        self._next_attempt: dict[str, float] = {}
        self._backoff = Backoff(keeper.revive_after, 300.0, Jitter.NONE)
        port = settings.environ.get("TAGBUS_TAILER_METRICS_PORT", "9464")
        self._tailer_url = f"http://127.0.0.1:{port}/metrics"

    def run(self, stop: threading.Event) -> None:
        log.info("keeping the stack in %s", self._cfg.state)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a round that fails is tried again next round; the keeper stays up
                log.exception("keeper round failed")
            stop.wait(self._keeper.interval)

    def tick(self) -> None:
        with stack_lock.held(self._cfg.run_dir, blocking=False) as mine:
            if not mine:
                return
            self.revive()
            self.renew_if_due()

    # -- parts that died ---------------------------------------------------------------------

    def revive(self) -> list[str]:
        """Start again the parts found dead long enough; the ones started."""
        now = self._clock()
        statuses = stack.status(self._cfg)
        dead = [
            name
            for name, part in statuses.items()
            if name != "keeper" and not part.running and self._cfg.pid_file(name).exists()
        ]
        for name in list(self._dead_since):
            if name not in dead:
                del self._dead_since[name]
                if statuses[name].running:
                    self._attempts.pop(name, None)
                    self._next_attempt.pop(name, None)
        started: list[str] = []
        for name in dead:
            since = self._dead_since.setdefault(name, now)
            if now - since < self._keeper.revive_after or now < self._next_attempt.get(name, 0.0):
                continue
            attempt = self._attempts[name] = self._attempts.get(name, 0) + 1
            self._next_attempt[name] = now + self._backoff.delay(attempt)
            log.error("%s died (pid file left, no process): starting it again (attempt %d)", name, attempt)
            try:
                lifecycle.up(self._cfg, [name])
            except stack.StackError as e:
                log.error("%s did not start again: %s", name, e)
                continue
            started.append(name)
        return started

    # -- the stream ---------------------------------------------------------------------------

    def renew_if_due(self) -> bool:
        """Count what the tailer acknowledged; rotate the stream when due. ``True`` if it rotated."""
        path = generations.generation_file(self._cfg)
        if not path.parent.exists():
            return False
        reading = read_tailer(self._tailer_url, self._settings.stream_name)
        generation = generations.Generation.load(path) or generations.Generation()
        if reading is not None:
            generation = generation.counted(reading.records, reading.bytes)
            generation.save(path)
        policy = self._keeper.policy
        if not policy.due(generation):
            return False
        hard = generations.RotationPolicy(
            max_records=int(policy.max_records * self._keeper.hard_factor),
            max_bytes=int(policy.max_bytes * self._keeper.hard_factor),
        )
        idle = reading is None or self._wall_clock() - reading.last_publish >= self._keeper.idle_before_rotation
        if not idle and not hard.due(generation):
            return False
        log.warning(
            "stream %s holds %d records, %d bytes: renewing it",
            self._settings.stream_name,
            generation.records,
            generation.bytes,
        )
        try:
            generations.rotate(self._cfg, self._settings, progress=log.warning)
        except generations.RenewalError as e:
            log.error("stream not renewed: %s", e)
            return False
        return True
