"""A reader SDK cache whose changes are stamped on arrival: ``tagbus config watch`` and the demo.

The SDK calls ``on_change`` for every key of its first snapshot too; here those arrivals are
told apart from live pushes, and each arrival carries the wall-clock delay from the change's
``updated_at`` (when the bus recorded it) to its delivery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from config_client import ChangeEvent, ConfigCache, NotReady, State, TokenSource


@dataclass(frozen=True, slots=True)
class Arrival:
    """One change as the watcher received it."""

    change: ChangeEvent
    #: Part of the first snapshot (the state when the watch began), not a live push.
    snapshot: bool
    #: Wall clock and monotonic clock when it was delivered.
    received_at: datetime
    received_monotonic: float

    @property
    def delay_ms(self) -> float | None:
        """``updated_at`` → delivered, in ms; ``None`` for snapshot entries (nothing was pushed)."""
        if self.snapshot or self.change.updated_at is None:
            return None
        return max(0.0, (self.received_at - self.change.updated_at).total_seconds() * 1000)

    def as_json(self) -> dict[str, Any]:
        c = self.change
        return {
            "event": "delete" if c.deleted else "set",
            "tenant": c.tenant,
            "key": c.key,
            "value": c.value,
            "version": c.version,
            "position": c.position,
            "updated_at": c.updated_at.isoformat().replace("+00:00", "Z") if c.updated_at else None,
            "delay_ms": None if self.delay_ms is None else round(self.delay_ms, 1),
            "snapshot": self.snapshot,
        }


class ServerUnreachable(RuntimeError):
    """No complete snapshot from the config server in time (down, or still catching up)."""


class StampedWatch:
    """A started :class:`ConfigCache` that hands each applied change to ``on_arrival``.

    ``on_arrival`` runs on the SDK's stream thread, in commit order. A change the bus recorded
    before the watch began is the starting state (it came in the first snapshot, or, from a
    server still catching up, just after it); everything recorded since is a live push.
    """

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource,
        prefixes: Sequence[str],
        on_arrival: Callable[[Arrival], None],
        **cache_options: Any,
    ) -> None:
        self._on_arrival = on_arrival
        self._began = datetime.now(UTC)
        self.cache = ConfigCache(target, token=token, prefixes=prefixes, on_change=self._changed, **cache_options)
        self.target = target

    def start(self, timeout: float) -> StampedWatch:
        """Start and wait for the first snapshot; raises the SDK's ``WatchRejected`` or ``ServerUnreachable``."""
        self._began = datetime.now(UTC)
        self.cache.start()
        try:
            self.cache.wait_ready(timeout)
        except NotReady as e:
            self.cache.close()
            raise ServerUnreachable(
                f"config server at {self.target} unreachable or not ready after {timeout:g}s"
                f" (last error: {self.cache.last_error or 'none'})"
            ) from e
        except BaseException:
            self.cache.close()
            raise
        return self

    def close(self) -> None:
        self.cache.close()

    def _changed(self, change: ChangeEvent) -> None:
        now, mono = datetime.now(UTC), time.monotonic()
        snapshot = change.updated_at is None or change.updated_at < self._began
        self._on_arrival(Arrival(change, snapshot, now, mono))


class WatchPrinter:
    """Prints a watch as lines, text or JSON: a ``ready`` line, then each change and state change.

    Starting-state entries are printed only with ``since``, and only those set after it. What
    arrives before :meth:`ready` is held back so the ``ready`` line comes first.
    """

    def __init__(self, out: TextIO, *, tenant: str, as_json: bool, since: int | None) -> None:
        self._out = out
        self._tenant = tenant
        self._json = as_json
        self._since = since
        self._lock = threading.Lock()
        self._held: list[str] | None = []
        self._state = State.READY

    def arrived(self, a: Arrival) -> None:
        if a.snapshot and (self._since is None or a.change.position <= self._since):
            return
        line = orjson.dumps(a.as_json()).decode() if self._json else _text(a)
        with self._lock:
            if self._held is not None:
                self._held.append(line)
                return
            self._write(line)

    def ready(self, prefixes: Sequence[str], *, keys: int, position: int | None) -> None:
        if self._json:
            line = self._event("ready", prefixes=list(prefixes), keys=keys, position=position)
        else:
            shown = " ".join(p or "(every key)" for p in prefixes)
            line = f"watching {self._tenant} {shown}: {keys} keys at position {position}; Ctrl-C stops"
        with self._lock:
            self._write(line)
            for held in self._held or ():
                self._write(held)
            self._held = None

    def state(self, state: State, *, position: int | None, error: Exception | None) -> None:
        """Print the cache's state when it changed (stale while reconnecting, ready again)."""
        if state is self._state:
            return
        self._state = state
        reason = str(error) if error else None
        if self._json:
            line = self._event(state.value, position=position, error=reason)
        else:
            line = f"{state.value} at position {position}" + (f": {reason}" if reason else "")
        with self._lock:
            self._write(line)

    def _event(self, name: str, **fields: Any) -> str:
        return orjson.dumps({"event": name, "tenant": self._tenant, **fields}).decode()

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()


def _text(a: Arrival) -> str:
    c = a.change
    value = "(deleted)" if c.deleted else orjson.dumps(c.value).decode()
    when = a.received_at.astimezone().strftime("%H:%M:%S.%f")[:-3]
    delay = "(current value)" if a.delay_ms is None else f"+{a.delay_ms:,.0f} ms"
    return f"{when}  {c.key} = {value}  v{c.version}  @{c.position}  {delay}"
