"""What the sync and asyncio caches share: the local copy and the watch's decisions, without I/O.

:class:`Replica` is the list + watch merge (snapshot chunks, then changes, per key by version).
:class:`WatchCore` decides what each stream event means: which request to send next (resume
with ``since`` or re-list), what state the cache is in, how long to wait before watching again.
The drivers (:mod:`config_client.cache`, :mod:`config_client.aio`) only move messages.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from config_api.v1 import config_pb2
from config_client._backoff import Backoff
from config_client.errors import (
    ConfigClientError,
    InvalidRequest,
    ProtocolError,
    Stalled,
    TokenUnavailable,
    WatchRejected,
)

#: A token, or a callable asked for one before every Watch call (so a refreshed token is used).
TokenSource = str | Callable[[], str]


def check_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes as a tuple; ``ValueError`` unless there is at least one and all are strings."""
    if isinstance(prefixes, str):
        raise ValueError("prefixes is a sequence of prefixes, not one string")
    checked = tuple(prefixes)
    if not checked or not all(isinstance(p, str) for p in checked):
        raise ValueError("watch at least one prefix (a '<tag>:…' string, or '' for every key)")
    return checked


def bearer(token: TokenSource) -> tuple[tuple[str, str]]:
    """The call metadata for ``token``; :class:`TokenUnavailable` if the callable fails."""
    if callable(token):
        try:
            token = token()
        except Exception as e:
            raise TokenUnavailable(f"the token callable raised {type(e).__name__}") from e
    return (("authorization", f"Bearer {token}"),)


class State(enum.Enum):
    """How current a cache's data is."""

    #: No complete snapshot yet: ``get`` answers ``None`` for every key.
    CONNECTING = "connecting"
    #: Caught up with the server, and heard from it within ``max_silence``.
    READY = "ready"
    #: Serving the last known values while it reconnects, catches up or re-lists.
    STALE = "stale"
    #: The server refused the watch (see ``last_error``); serving the last known values.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Item:
    """The current value of one key, as the cache holds it."""

    key: str
    #: The value decoded from its JSON text.
    value: Any
    version: int
    #: The position of the change that set it.
    position: int
    updated_at: datetime | None
    tenant: str


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change the cache applied, as passed to ``on_change``.

    A key that vanished from a new snapshot is reported as a delete with the version the
    cache held and the snapshot's position (the delete itself was not seen).
    """

    key: str
    tenant: str
    #: The new value; ``None`` on a delete.
    value: Any
    version: int
    position: int
    deleted: bool
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the cache started."""

    #: Watch calls opened.
    watches: int = 0
    #: Watch calls after the first.
    reconnects: int = 0
    #: Resync answers received (each followed by a new snapshot).
    resyncs: int = 0
    #: Complete snapshots applied.
    snapshots: int = 0
    #: Changes applied (each passed once to ``on_change``), snapshot differences included.
    changes_applied: int = 0
    #: Messages received.
    messages: int = 0
    #: Streams the server ended cleanly.
    clean_ends: int = 0
    #: Streams that failed with a retryable status, a stall or a protocol error.
    failures: int = 0
    #: Streams cut because nothing arrived within ``max_silence``.
    stalls: int = 0
    #: Watches the server refused (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT).
    rejections: int = 0
    #: ``on_change`` calls that raised.
    callback_errors: int = 0
    #: The delay chosen before the latest watch attempt, in seconds.
    last_backoff: float = 0.0


def _timestamp(message: config_pb2.Entry | config_pb2.Change) -> datetime | None:
    if not message.HasField("updated_at"):
        return None
    try:
        return message.updated_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as e:
        raise ProtocolError(f"key {message.key!r}: updated_at is not a valid timestamp") from e


def _decode(key: str, value_json: str) -> Any:
    try:
        return orjson.loads(value_json)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"key {key!r}: value_json is not JSON") from e


def _item(entry: config_pb2.Entry) -> Item:
    return Item(
        key=entry.key,
        value=_decode(entry.key, entry.value_json),
        version=entry.version,
        position=entry.position,
        updated_at=_timestamp(entry),
        tenant=entry.tenant,
    )


def _set_event(item: Item) -> ChangeEvent:
    return ChangeEvent(
        key=item.key,
        tenant=item.tenant,
        value=item.value,
        version=item.version,
        position=item.position,
        deleted=False,
        updated_at=item.updated_at,
    )


class Replica:
    """The local copy of the watched keys: snapshots and changes merged per key by version.

    Written by one thread (the stream's), read by any: ``get`` is a single dict lookup, and a
    snapshot swaps in a whole new dict, so readers never see half of one.
    """

    def __init__(self) -> None:
        self._items: dict[str, Item] = {}
        # Keys deleted by a change: (version, position). A snapshot taken before the delete
        # (from a server that lags behind the last one) must not bring the key back.
        self._gone: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, Item] | None = None
        self._lock = threading.Lock()
        #: Every change up to here is applied; ``None`` until the first complete snapshot.
        self.position: int | None = None

    def get(self, key: str) -> Item | None:
        return self._items.get(key)

    def items(self, prefix: str = "") -> list[Item]:
        with self._lock:
            held = list(self._items.values())
        return sorted((i for i in held if i.key.startswith(prefix)), key=lambda i: i.key)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def snapshot_pending(self) -> bool:
        """Snapshot chunks arrived, but not yet the one with ``done``."""
        return self._pending is not None

    def abandon_snapshot(self) -> None:
        """Drop the chunks of a snapshot whose stream ended before ``done``."""
        self._pending = None

    def add_chunk(self, chunk: config_pb2.Snapshot) -> list[ChangeEvent] | None:
        """Collect a snapshot chunk; on the last one, replace the copy and return what changed."""
        pending = self._pending if self._pending is not None else {}
        for entry in chunk.entries:
            item = _item(entry)
            held = pending.get(item.key)
            if held is None or item.version > held.version:
                pending[item.key] = item
        if not chunk.done:
            self._pending = pending
            return None
        self._pending = None
        return self._replace(pending, chunk.position)

    def _replace(self, fresh: dict[str, Item], position: int) -> list[ChangeEvent]:
        events: list[ChangeEvent] = []
        merged: dict[str, Item] = {}
        gone = dict(self._gone)
        for key, item in fresh.items():
            held = self._items.get(key)
            if held is not None and held.version >= item.version:
                merged[key] = held
                continue
            deleted = gone.get(key)
            if deleted is not None and deleted[0] >= item.version:
                continue
            gone.pop(key, None)
            merged[key] = item
            events.append(_set_event(item))
        for key, held in self._items.items():
            if key in fresh:
                continue
            if held.position > position:
                # Set after the snapshot was taken (the server lags the one seen before).
                merged[key] = held
                continue
            events.append(replace(_set_event(held), value=None, position=position, deleted=True, updated_at=None))
        with self._lock:
            self._items = merged
            # A delete the snapshot already reflects needs no guard any more.
            self._gone = {k: v for k, v in gone.items() if v[1] > position}
        self.position = position
        return events

    def apply_change(self, change: config_pb2.Change) -> ChangeEvent | None:
        """Apply one change if its version is above the key's; the event, or ``None`` if a repeat.

        A change that cannot be decoded raises :class:`ProtocolError` before anything moves,
        the position included, so the watch resumes before it rather than past it.
        """
        if change.kind not in (config_pb2.Change.SET, config_pb2.Change.DELETE):
            raise ProtocolError(f"key {change.key!r}: change of unspecified kind")
        key = change.key
        held = self._items.get(key)
        deleted = self._gone.get(key)
        event: ChangeEvent | None = None
        if (held is None or change.version > held.version) and (deleted is None or change.version > deleted[0]):
            event = self._apply(change, held)
        self.position = change.position if self.position is None else max(self.position, change.position)
        return event

    def _apply(self, change: config_pb2.Change, held: Item | None) -> ChangeEvent | None:
        key, updated_at = change.key, _timestamp(change)
        if change.kind == config_pb2.Change.DELETE:
            with self._lock:
                self._items.pop(key, None)
                self._gone[key] = (change.version, change.position)
            if held is None:
                return None
            return ChangeEvent(
                key=key,
                tenant=change.tenant,
                value=None,
                version=change.version,
                position=change.position,
                deleted=True,
                updated_at=updated_at,
            )
        item = Item(
            key=key,
            value=_decode(key, change.value_json),
            version=change.version,
            position=change.position,
            updated_at=updated_at,
            tenant=change.tenant,
        )
        with self._lock:
            self._items[key] = item
            self._gone.pop(key, None)
        return _set_event(item)

    def progress(self, position: int) -> None:
        if self.position is not None:
            self.position = max(self.position, position)


class WatchCore:
    """The decisions of one cache's watch loop; its driver calls it from a single thread or task.

    Per stream: :meth:`request` when opening it, :meth:`receive` for each message, then one of
    :meth:`ended` (clean end), :meth:`resynced` (after a ``Resync`` message) or :meth:`failed`;
    each of those returns how long to wait before the next :meth:`request`, or ``None`` to
    wait for a new token.
    """

    def __init__(
        self,
        prefixes: Sequence[str],
        *,
        backoff: Backoff,
        max_silence: float,
        auth_retry_after: float | None,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        self.prefixes = tuple(prefixes)
        self.replica = Replica()
        self.backoff = backoff
        self.max_silence = max_silence
        self._auth_retry_after = auth_retry_after
        self._clock = clock
        self._on_state = on_state
        self._state = State.CONNECTING
        self._current_at: float | None = None
        # Start over with a snapshot: at first, and after a resync.
        self._relist = True
        self.last_error: ConfigClientError | None = None
        self._counts: dict[str, Any] = {f.name: f.default for f in fields(CacheStats)}

    @property
    def state(self) -> State:
        if self._state is State.READY and (self.age or 0.0) > self.max_silence:
            return State.STALE
        return self._state

    @property
    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    @property
    def age(self) -> float | None:
        """Seconds since the data was last known current; ``None`` before the first snapshot."""
        if self._current_at is None:
            return None
        return max(0.0, self._clock() - self._current_at)

    def request(self) -> config_pb2.WatchRequest:
        """The next Watch request: resume after the last position, or a fresh snapshot."""
        self._count(watches=1, reconnects=1 if self._counts["watches"] else 0)
        if self._state is State.ERROR:
            # Trying again (a new token): no longer refused, not yet current.
            self._set_state(self._unready())
        position = self.replica.position
        if self._relist or position is None:
            return config_pb2.WatchRequest(prefixes=self.prefixes)
        return config_pb2.WatchRequest(prefixes=self.prefixes, since=position)

    def receive(self, message: config_pb2.WatchResponse) -> tuple[list[ChangeEvent], bool]:
        """Apply one message: the events to pass to ``on_change``, and whether it was a resync.

        Raises :class:`ProtocolError` for a message the contract does not allow.
        """
        self._count(messages=1)
        self.backoff.healthy()
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            events = self.replica.add_chunk(message.snapshot)
            if events is None:
                return [], False
            self._relist = False
            self._count(snapshots=1, changes_applied=len(events))
            self._current()
            return events, False
        if kind == "change":
            if self.replica.snapshot_pending:
                raise ProtocolError("a change inside a snapshot")
            if self.replica.position is None:
                raise ProtocolError("a change before any snapshot on a fresh watch")
            event = self.replica.apply_change(message.change)
            if self._state is State.READY:
                self._current_at = self._clock()
            if event is None:
                return [], False
            self._count(changes_applied=1)
            return [event], False
        if kind == "progress":
            # Progress inside a snapshot says nothing about the copy being served.
            if not self.replica.snapshot_pending and self.replica.position is not None:
                self.replica.progress(message.progress.position)
                self._current()
            return [], False
        if kind == "resync":
            self._count(resyncs=1)
            self._relist = True
            self.replica.abandon_snapshot()
            self._set_state(self._unready())
            return [], True
        # A kind this SDK does not know (a newer server): nothing to apply.
        return [], False

    def ended(self) -> float:
        """The server ended the stream cleanly (its lifetime cap): ride through, at once."""
        self._count(clean_ends=1)
        self.replica.abandon_snapshot()
        return self._wait(self.backoff.after_end())

    def resynced(self) -> float:
        """After a ``Resync`` message: a new snapshot, at once."""
        return self._wait(self.backoff.after_end())

    def failed(self, error: ConfigClientError) -> float | None:
        """The stream failed: serve the last values and retry, or stop on a rejection."""
        self.last_error = error
        self.replica.abandon_snapshot()
        if isinstance(error, WatchRejected):
            self._count(rejections=1)
            self._set_state(State.ERROR)
            if isinstance(error, InvalidRequest) or self._auth_retry_after is None:
                return None
            return self._wait(self._auth_retry_after)
        self._count(failures=1, stalls=1 if isinstance(error, Stalled) else 0)
        self._set_state(self._unready())
        return self._wait(self.backoff.after_failure())

    def count_callback_error(self) -> None:
        self._count(callback_errors=1)

    def _current(self) -> None:
        self._current_at = self._clock()
        self.last_error = None
        self._set_state(State.READY)

    def _unready(self) -> State:
        return State.STALE if self.replica.position is not None else State.CONNECTING

    def _set_state(self, state: State) -> None:
        if state is not self._state:
            self._state = state
            self._on_state()

    def _wait(self, delay: float) -> float:
        self._counts["last_backoff"] = delay
        return delay

    def _count(self, **increments: int) -> None:
        for name, n in increments.items():
            self._counts[name] += n


class CacheReads:
    """The reads both caches answer from memory, never over the network."""

    _core: WatchCore

    def get(self, key: str) -> Item | None:
        """The key's current item, or ``None``: from memory, never a network call."""
        return self._core.replica.get(key)

    def items(self, prefix: str = "") -> list[Item]:
        """The items whose key starts with ``prefix``, ordered by key."""
        return self._core.replica.items(prefix)

    def __len__(self) -> int:
        return len(self._core.replica)

    @property
    def state(self) -> State:
        """How current the data is: ``CONNECTING``, ``READY``, ``STALE`` or ``ERROR``."""
        return self._core.state

    @property
    def age(self) -> float | None:
        """Seconds since the server last confirmed the data; ``None`` before the first snapshot."""
        return self._core.age

    @property
    def position(self) -> int | None:
        """The position every held change is applied up to (the resume point); ``None`` at first."""
        return self._core.replica.position

    @property
    def prefixes(self) -> tuple[str, ...]:
        return self._core.prefixes

    @property
    def last_error(self) -> ConfigClientError | None:
        """Why the cache is not ``READY`` (cleared once it is again)."""
        return self._core.last_error

    def stats(self) -> CacheStats:
        """Counters since the cache started (reconnects, resyncs, changes applied, …)."""
        return self._core.stats
