"""A config server's changes taken from another config server's ``Watch`` (chaining).

How a fleet grows past Kinesis's read limits: a few servers read the stream
(:class:`config_server.kinesis.KinesisChangeSource`) and the rest watch one of them. The watch
carries a token with the scope ``config:replicate``, which makes it span every tenant (each
``Entry`` and ``Change`` names its tenant), under the prefix ``""`` (every key).

What the upstream sends becomes the sink's calls: snapshot chunks → ``sink.load``; the last
chunk (``done``) → ``sink.caught_up``; each change → ``sink.apply``; progress →
``sink.caught_up(lag_ms=…)`` with the upstream's own ``source_lag_ms``. The source remembers
the highest position it saw and, after a disconnect, watches again with ``since`` = that
position; on ``Resync`` (its position left the upstream's history, or it read too slowly) it
watches again without ``since``, for a new snapshot.

A snapshot lists live keys only. When one comes after the first (a resync), a key the source
holds live at a position the snapshot covers but that the snapshot lacks was deleted in the
gap; the source loads a tombstone for it, one version above the one it holds (the delete's
own version is at least that, and a later set of the key is above it), so the state ends equal
to the upstream's. A key held at a position beyond the snapshot's (an upstream behind the one
seen before) is left alone: its absence says nothing yet.

Failures: transport errors and other statuses are retried with full-jitter exponential
backoff (reset once a stream stayed up ``stable_after`` seconds; a clean end of a stream that
lasted that long, such as the upstream's stream lifetime cap, is ridden through at once), and
a stream silent for ``idle_timeout`` seconds (past the upstream's 30 s progress interval) is
cut and retried. ``UNAUTHENTICATED`` and ``PERMISSION_DENIED`` are not retried in a loop:
each is reported and followed by ``refused_backoff`` seconds (jittered) before the token
callable is asked again. Every failure goes to ``sink.source_failed``; the server keeps
serving what it has.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import grpc
import orjson

from config_api.v1 import config_pb2, config_pb2_grpc
from config_server.source import ChangeSink
from kernel.retry import Backoff, Jitter
from projections.errors import ProjectionError
from projections.model import ConfigChange, ConfigKey

log = logging.getLogger(__name__)

#: Backoff between failed watches: full jitter spreads a fleet reconnecting to one upstream.
BACKOFF = Backoff(base=0.5, cap=30.0, jitter=Jitter.FULL)
#: Channel options by default: snapshot chunks may exceed gRPC's 4 MiB receive limit.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)

_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

Slot = tuple[str, str]


class UpstreamError(Exception):
    """Watching the upstream failed; ``code`` is the gRPC status (``None`` for a local cause)."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, ended the stream with an error, or went silent."""


class UpstreamRefused(UpstreamError):
    """The upstream refused the token (UNAUTHENTICATED, PERMISSION_DENIED): an operator must act."""


class TokenUnavailable(UpstreamError):
    """The token callable raised."""


class _WatchCall(Protocol):
    """A sync server-streaming call: an iterator of messages that can be cancelled."""

    def __iter__(self) -> Iterator[config_pb2.WatchResponse]: ...

    def cancel(self) -> bool: ...


@dataclass
class UpstreamSourceStats:
    """Counters of a running source (written by the source's thread only)."""

    watches: int = 0
    snapshots: int = 0
    snapshot_entries: int = 0
    changes: int = 0
    progress: int = 0
    resyncs: int = 0
    #: Tombstones loaded for keys a later snapshot no longer held.
    inferred_deletes: int = 0
    #: Entries or changes that could not be turned into a change (logged).
    undecodable: int = 0
    failures: int = 0
    refusals: int = 0


@dataclass(slots=True)
class _Held:
    """What the source last fed the sink for a key (the sink's own rule: highest version wins)."""

    version: int
    position: int
    deleted: bool


class UpstreamChangeSource:
    """Feeds a config server's state from an upstream config server's ``Watch`` (see the module docstring).

    ``target`` is the upstream's ``host:port``; ``token`` returns a bearer token with the scope
    ``config:replicate`` and is called for every watch, so it may refresh. ``credentials``
    ``None`` dials in plain text (local); production passes ``grpc.ssl_channel_credentials()``.
    """

    def __init__(
        self,
        target: str,
        token: Callable[[], str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
        backoff: Backoff = BACKOFF,
        stable_after: float = 30.0,
        refused_backoff: float = 300.0,
        idle_timeout: float = 75.0,
        rand: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if idle_timeout <= 0 or refused_backoff <= 0:
            raise ValueError("idle_timeout and refused_backoff must be positive")
        self.target = target
        self._token = token
        self._credentials = credentials
        self._channel_options = tuple(channel_options)
        self._backoff = backoff
        self._stable_after = stable_after
        self._refused_backoff = refused_backoff
        self._idle_timeout = idle_timeout
        self._rand = rand
        self._monotonic = monotonic
        self._clock = clock
        self.stats = UpstreamSourceStats()
        #: The highest position seen: where a watch resumes (``None``: take a snapshot).
        self.position: int | None = None
        self._held: dict[Slot, _Held] = {}
        self._lag_ms = 0
        self._lock = threading.Lock()
        self._call: _WatchCall | None = None
        self._heard = 0.0
        self._silenced: _WatchCall | None = None

    # -- the ChangeSource port ------------------------------------------------------------

    def run(self, sink: ChangeSink, stop: threading.Event) -> None:
        """Watch the upstream until ``stop`` is set, reconnecting as the module docstring says."""
        done = threading.Event()
        watchdog = threading.Thread(target=self._watchdog, args=(stop, done), name="upstream-watchdog", daemon=True)
        watchdog.start()
        channel: grpc.Channel | None = None
        failures = resyncs = 0
        try:
            while not stop.is_set():
                if channel is None:
                    channel = self._channel()
                opened = self._monotonic()
                try:
                    self._watch(config_pb2_grpc.ConfigServiceStub(channel), sink, stop)
                except _Resync:
                    # At once the first time; an upstream that keeps answering resync (a
                    # history shorter than a snapshot takes to send) is backed off from.
                    failures = 0
                    resyncs = 1 if self._monotonic() - opened >= self._stable_after else resyncs + 1
                    if resyncs > 1:
                        stop.wait(self._backoff.delay(resyncs - 1, rand=self._rand))
                    continue
                except UpstreamError as e:
                    if stop.is_set():
                        return
                    resyncs = 0
                    if self._monotonic() - opened >= self._stable_after:
                        failures = 0
                    failures += 1
                    self.stats.failures += 1
                    sink.source_failed(e)
                    if isinstance(e, UpstreamRefused):
                        self.stats.refusals += 1
                        log.warning("upstream %s refused the watch: %s", self.target, e)
                        delay = self._refused_backoff * (0.5 + self._rand() / 2)
                    else:
                        log.info("upstream %s: %s; retrying", self.target, e)
                        delay = self._backoff.delay(failures, rand=self._rand)
                    if not isinstance(e, TokenUnavailable):
                        # A failed channel keeps its own reconnect backoff, which would hold
                        # back ours: the next attempt dials afresh.
                        channel.close()
                        channel = None
                    stop.wait(delay)
                    continue
                # The upstream ended the stream cleanly (its lifetime cap): resume at once if
                # it had lasted, else back off like a failure, so a server that closes every
                # stream at once is not hammered.
                resyncs = 0
                if self._monotonic() - opened >= self._stable_after:
                    failures = 0
                else:
                    failures += 1
                    stop.wait(self._backoff.delay(failures, rand=self._rand))
        finally:
            done.set()
            with self._lock:
                call = self._call
            if call is not None:
                call.cancel()
            if channel is not None:
                channel.close()
            watchdog.join(timeout=5)

    # -- one watch ----------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self._channel_options)
        return grpc.secure_channel(self.target, self._credentials, options=self._channel_options)

    def _watch(self, stub: config_pb2_grpc.ConfigServiceStub, sink: ChangeSink, stop: threading.Event) -> None:
        """One ``Watch`` call to its end; raises :class:`UpstreamError`, or :class:`_Resync`."""
        try:
            token = self._token()
        except Exception as e:
            raise TokenUnavailable(f"the token callable failed: {type(e).__name__}: {e}") from e
        request = config_pb2.WatchRequest(prefixes=[""])
        if self.position is not None:
            request.since = self.position
        self.stats.watches += 1
        call = cast(_WatchCall, stub.Watch(request, metadata=(("authorization", f"Bearer {token}"),)))
        with self._lock:
            self._call, self._heard = call, self._monotonic()
        if stop.is_set():
            call.cancel()
        snapshot: dict[Slot, ConfigChange] | None = None
        try:
            for message in call:
                self._heard = self._monotonic()
                kind = message.WhichOneof("kind")
                if kind == "snapshot":
                    snapshot = self._snapshot_chunk(message.snapshot, snapshot, sink)
                elif kind == "change":
                    change = self._change(message.change)
                    self._see(message.change.position)
                    if change is not None:
                        self.stats.changes += 1
                        self._hold([change])
                        sink.apply([change])
                elif kind == "progress":
                    self.stats.progress += 1
                    self._see(message.progress.position)
                    self._lag_ms = int(message.progress.source_lag_ms)
                    sink.caught_up(lag_ms=self._lag_ms)
                elif kind == "resync":
                    self.stats.resyncs += 1
                    log.info(
                        "upstream %s: resync (%s): %s; watching again for a snapshot",
                        self.target,
                        config_pb2.Resync.Reason.Name(message.resync.reason),
                        message.resync.detail,
                    )
                    self.position = None
                    raise _Resync
        except grpc.RpcError as e:
            if stop.is_set():
                return
            if self._silenced is call:
                raise UpstreamUnavailable(
                    f"no message from {self.target} for {self._idle_timeout:.0f} s", code=grpc.StatusCode.CANCELLED
                ) from e
            raise _translate(cast(grpc.Call, e), self.target) from e
        finally:
            call.cancel()
            with self._lock:
                self._call = None

    def _snapshot_chunk(
        self, chunk: config_pb2.Snapshot, snapshot: dict[Slot, ConfigChange] | None, sink: ChangeSink
    ) -> dict[Slot, ConfigChange] | None:
        """Load one chunk; on the last, load tombstones for keys deleted in a gap, then report."""
        if snapshot is None:
            snapshot = {}
        changes = [c for c in (self._entry(e) for e in chunk.entries) if c is not None]
        for change in changes:
            snapshot[(change.tenant, str(change.key))] = change
        self.stats.snapshot_entries += len(changes)
        self._hold(changes)
        sink.load(changes)
        if not chunk.done:
            return snapshot
        self.stats.snapshots += 1
        gone = self._deleted_since(snapshot, chunk.position)
        if gone:
            self.stats.inferred_deletes += len(gone)
            self._hold(gone)
            sink.load(gone)
        self._see(chunk.position)
        sink.caught_up(lag_ms=self._lag_ms)
        return None

    def _deleted_since(self, snapshot: dict[Slot, ConfigChange], position: int) -> list[ConfigChange]:
        now = self._clock()
        gone: list[ConfigChange] = []
        for (tenant, key), held in self._held.items():
            if held.deleted or held.position > position or (tenant, key) in snapshot:
                continue
            gone.append(
                ConfigChange(
                    tenant=tenant,
                    key=ConfigKey.parse(key),
                    value=None,
                    version=held.version + 1,
                    position=position,
                    updated_at=now,
                    deleted=True,
                )
            )
        return gone

    def _hold(self, changes: Sequence[ConfigChange]) -> None:
        for change in changes:
            slot = (change.tenant, str(change.key))
            held = self._held.get(slot)
            if held is None or held.version < change.version:
                self._held[slot] = _Held(change.version, change.position, change.deleted)

    def _see(self, position: int) -> None:
        if self.position is None or position > self.position:
            self.position = position

    def _entry(self, entry: config_pb2.Entry) -> ConfigChange | None:
        return self._decode(entry, deleted=False)

    def _change(self, change: config_pb2.Change) -> ConfigChange | None:
        return self._decode(change, deleted=change.kind == config_pb2.Change.DELETE)

    def _decode(self, message: config_pb2.Entry | config_pb2.Change, *, deleted: bool) -> ConfigChange | None:
        try:
            if not message.tenant:
                raise ValueError("no tenant: is the token's scope config:replicate?")
            return ConfigChange(
                tenant=message.tenant,
                key=ConfigKey.parse(message.key),
                value=None if deleted else orjson.loads(message.value_json),
                version=message.version,
                position=message.position,
                updated_at=message.updated_at.ToDatetime(tzinfo=UTC),
                deleted=deleted,
            )
        except (ValueError, ProjectionError) as e:
            self.stats.undecodable += 1
            log.warning(
                "upstream %s sent %s of %s (v%d) that cannot be applied: %s",
                self.target,
                message.key,
                message.tenant,
                message.version,
                e,
            )
            return None

    def _watchdog(self, stop: threading.Event, done: threading.Event) -> None:
        """Cancels the call in flight when ``stop`` is set, or when it stayed silent too long."""
        interval = max(0.01, min(0.5, self._idle_timeout / 4))
        while not done.is_set():
            stopping = stop.wait(interval)
            with self._lock:
                call = self._call
                silent = call is not None and self._monotonic() - self._heard >= self._idle_timeout
                if call is not None and silent and not stopping:
                    self._silenced = call
            if call is not None and (stopping or silent):
                call.cancel()
            if stopping:
                return


class _Resync(Exception):
    """The upstream sent ``Resync``: watch again without ``since``."""


def _translate(error: grpc.Call, target: str) -> UpstreamError:
    """Our error for a failed call, by status code."""
    code = error.code()
    message = f"watch of {target} failed: {code.name if code else 'unknown'}: {error.details()}"
    if code in _REFUSED:
        return UpstreamRefused(message, code=code)
    return UpstreamUnavailable(message, code=code)
