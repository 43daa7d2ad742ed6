"""A blocking-world cache of a tenant's config: list + watch in a daemon thread, reads from memory.

::

    with ConfigCache("config:50051", token=token, prefixes=["tenantconfig:"]) as cache:
        cache.wait_ready(10)
        flags = cache.get("tenantconfig:features/beta")

``get`` never touches the network. The stream runs in a daemon thread, and ``on_change`` runs
on that thread, one change at a time, in commit order: a slow callback delays the changes
behind it (and, past the server's buffer, earns a resync), so hand heavy work to a queue.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, cast

import grpc

from config_api.v1 import config_pb2, config_pb2_grpc
from config_client._backoff import Backoff
from config_client._state import CacheReads, ChangeEvent, State, TokenSource, WatchCore, bearer, check_prefixes
from config_client.errors import (
    CacheClosed,
    Disconnected,
    NotReady,
    ProtocolError,
    Stalled,
    TokenUnavailable,
    WatchRejected,
    from_rpc_error,
)

log = logging.getLogger("config_client")


class _WatchCall(Protocol):
    """What a sync Watch call is (``grpc.Call`` and an iterator; the stubs leave ``cancel`` untyped)."""

    def __iter__(self) -> Iterator[config_pb2.WatchResponse]: ...

    def cancel(self) -> bool: ...


class ConfigCache(CacheReads):
    """A local, always-readable copy of the config under some prefixes, kept current by Watch.

    ``state`` says how current it is (:class:`State`), ``age`` how many seconds since the
    server last confirmed it. Disconnects are retried with full-jitter exponential backoff
    (``backoff_base`` doubling up to ``backoff_cap``, reset after a stream stayed up
    ``stable_after`` seconds) and resume from ``position``; a clean end of the stream (the
    server's lifetime cap) is ridden through at once. A stream silent for ``max_silence``
    seconds (keep it above the server's progress interval, 30 s) is cut and retried.

    A refused watch (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) puts the cache in
    ``ERROR`` and is not retried in a loop: with a fixed token string, only :meth:`set_token`
    tries again; with a token callable, an authentication or permission failure is also tried
    again after ``auth_retry_after`` seconds, in case the callable has a fresh token by then.
    Invalid prefixes are never retried. Meanwhile the last known values are served.

    ``on_change`` is called once per applied change: for every key of the first snapshot, then
    for each change whose version is above the one held (repeats are dropped), and for the
    keys a later snapshot (after a resync) sets, changes or no longer holds.

    ``rand`` and ``clock`` drive the backoff's jitter and the ``age`` (tests inject them).
    """

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource,
        prefixes: Sequence[str],
        on_change: Callable[[ChangeEvent], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, int | str]] = (),
        backoff_base: float = 0.25,
        backoff_cap: float = 30.0,
        stable_after: float = 30.0,
        max_silence: float = 75.0,
        auth_retry_after: float = 60.0,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._token = token
        self._on_change = on_change
        self._credentials = credentials
        self._channel_options = tuple(channel_options)
        self._max_silence = max_silence
        self._state_changed = threading.Condition()
        self._core = WatchCore(
            check_prefixes(prefixes),
            backoff=Backoff(base=backoff_base, cap=backoff_cap, stable_after=stable_after, rand=rand, clock=clock),
            max_silence=max_silence,
            auth_retry_after=auth_retry_after if callable(token) else None,
            clock=clock,
            on_state=self._notify,
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set to cut a wait short: close, or a new token.
        self._wake = threading.Event()
        self._call: _WatchCall | None = None
        self._call_opened = 0.0
        self._heard = 0.0
        self._stalled_call: _WatchCall | None = None
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<ConfigCache {self._target} {list(self._core.prefixes)} {self.state.value}>"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ConfigCache:
        """Start watching in a daemon thread; returns at once (see :meth:`wait_ready`)."""
        if self._stop.is_set():
            raise CacheClosed("the cache was closed")
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._run, name="config-cache-watch", daemon=True),
                threading.Thread(target=self._watch_silence, name="config-cache-silence", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop watching; ``get`` keeps answering from the last values. Safe from a callback."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._notify()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def __enter__(self) -> ConfigCache:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the cache is ``READY``.

        Raises the :class:`WatchRejected` that put it in ``ERROR``, :class:`NotReady` after
        ``timeout`` seconds, or :class:`CacheClosed`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_changed:
            while True:
                if self._stop.is_set():
                    raise CacheClosed("the cache was closed")
                state = self._core.state
                if state is State.READY:
                    return
                if state is State.ERROR and isinstance(self._core.last_error, WatchRejected):
                    raise self._core.last_error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NotReady(f"not ready after {timeout} s: {state.value}, last error: {self._core.last_error}")
                self._state_changed.wait(remaining)

    def set_token(self, token: TokenSource) -> None:
        """Use ``token`` from the next Watch call on; a cache in ``ERROR`` tries again at once."""
        self._token = token
        self._wake.set()

    # -- the stream thread -----------------------------------------------------------------

    def _notify(self) -> None:
        with self._state_changed:
            self._state_changed.notify_all()

    def _channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self._target, options=self._channel_options)
        return grpc.secure_channel(self._target, self._credentials, options=self._channel_options)

    def _run(self) -> None:
        channel: grpc.Channel | None = None
        try:
            while not self._stop.is_set():
                if channel is None:
                    channel = self._channel()
                try:
                    delay, fresh_channel = self._watch_once(config_pb2_grpc.ConfigServiceStub(channel))
                except Exception as e:
                    # Not a status nor a protocol breach (a library or SDK bug): the thread must
                    # not die silently while readers trust the cache, so it shows and retries.
                    log.exception("config watch of %s failed unexpectedly", self._target)
                    delay, fresh_channel = self._core.failed(Disconnected(None, f"unexpected {e!r}")), True
                if fresh_channel:
                    # A failed channel keeps its own reconnect backoff (up to minutes), which
                    # would hold back ours: the next attempt dials afresh.
                    channel.close()
                    channel = None
                self._pause(delay)
        finally:
            if channel is not None:
                channel.close()

    def _watch_once(self, stub: config_pb2_grpc.ConfigServiceStub) -> tuple[float | None, bool]:
        """One Watch call, to its end: the delay before the next, and whether to redial."""
        core = self._core
        request = core.request()
        try:
            metadata = bearer(self._token)
        except TokenUnavailable as e:
            return core.failed(e), False
        call = cast(_WatchCall, stub.Watch(request, metadata=metadata))
        with self._lock:
            self._call, self._call_opened = call, time.monotonic()
        if self._stop.is_set():
            call.cancel()
        try:
            for message in call:
                self._heard = time.monotonic()
                events, resync = core.receive(message)
                self._deliver(events)
                self._heard = time.monotonic()
                if resync:
                    return core.resynced(), False
            return core.ended(), False
        except grpc.RpcError as e:
            if self._stop.is_set():
                return None, False
            if self._stalled_call is call:
                return core.failed(Stalled(time.monotonic() - max(self._call_opened, self._heard))), True
            error = from_rpc_error(e)
            if isinstance(error, WatchRejected):
                log.warning("config watch of %s refused: %s", self._target, error)
            else:
                log.info("config watch of %s failed, retrying: %s", self._target, error)
            return core.failed(error), not isinstance(error, WatchRejected)
        except ProtocolError as e:
            log.warning("config watch of %s broke the protocol, retrying: %s", self._target, e)
            return core.failed(e), True
        finally:
            # Ends the call when we leave it early (a resync, a protocol error).
            call.cancel()
            with self._lock:
                self._call = None

    def _deliver(self, events: list[ChangeEvent]) -> None:
        if self._on_change is None:
            return
        for event in events:
            try:
                self._on_change(event)
            except Exception:
                # The change is applied either way; a failing callback must not stop the cache.
                self._core.count_callback_error()
                log.exception("on_change raised for %s", event.key)

    def _pause(self, delay: float | None) -> None:
        if self._stop.is_set():
            return
        if delay is None or delay > 0:
            self._wake.wait(delay)
        self._wake.clear()

    def _watch_silence(self) -> None:
        """Cut a stream that has been silent for ``max_silence`` (a stalled server or network)."""
        interval = max(0.01, min(1.0, self._max_silence / 4))
        while not self._stop.wait(interval):
            with self._lock:
                call = self._call
                if call is None or time.monotonic() - max(self._call_opened, self._heard) < self._max_silence:
                    continue
                self._stalled_call = call
            log.info("config watch of %s silent for %.1f s, reconnecting", self._target, self._max_silence)
            call.cancel()
