"""The asyncio cache: the same list + watch as :class:`config_client.ConfigCache`, on ``grpc.aio``.

::

    async with AsyncConfigCache("config:50051", token=token, prefixes=["tenantconfig:"]) as cache:
        await cache.wait_ready(10)
        flags = cache.get("tenantconfig:features/beta")

The stream runs in a task of the loop that called :meth:`AsyncConfigCache.start`; every method
but the memory reads (``get``, ``items``, ``state``, …) belongs to that loop. ``on_change`` is
called in the task, one change at a time, in commit order; it may be a coroutine function.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import grpc
import grpc.aio

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


class AsyncConfigCache(CacheReads):
    """The asyncio twin of :class:`config_client.ConfigCache`: same arguments, same behaviour.

    ``start``, ``close`` and ``wait_ready`` are coroutines; ``on_change`` may return an
    awaitable, which is awaited before the next change is applied.
    """

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource,
        prefixes: Sequence[str],
        on_change: Callable[[ChangeEvent], Awaitable[None] | None] | None = None,
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
        self._core = WatchCore(
            check_prefixes(prefixes),
            backoff=Backoff(base=backoff_base, cap=backoff_cap, stable_after=stable_after, rand=rand, clock=clock),
            max_silence=max_silence,
            auth_retry_after=auth_retry_after if callable(token) else None,
            clock=clock,
            on_state=self._notify,
        )
        self._state_changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncConfigCache {self._target} {list(self._core.prefixes)} {self.state.value}>"

    async def start(self) -> AsyncConfigCache:
        """Start watching in a task of the running loop; returns at once (see :meth:`wait_ready`)."""
        if self._closed:
            raise CacheClosed("the cache was closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="config-cache-watch")
        return self

    async def close(self) -> None:
        """Stop watching; ``get`` keeps answering from the last values."""
        self._closed = True
        self._notify()
        task, self._task = self._task, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def __aenter__(self) -> AsyncConfigCache:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the cache is ``READY``.

        Raises the :class:`WatchRejected` that put it in ``ERROR``, :class:`NotReady` after
        ``timeout`` seconds, or :class:`CacheClosed`.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise CacheClosed("the cache was closed")
            state = self._core.state
            if state is State.READY:
                return
            if state is State.ERROR and isinstance(self._core.last_error, WatchRejected):
                raise self._core.last_error
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise NotReady(f"not ready after {timeout} s: {state.value}, last error: {self._core.last_error}")
            changed = self._state_changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                continue

    def set_token(self, token: TokenSource) -> None:
        """Use ``token`` from the next Watch call on; a cache in ``ERROR`` tries again at once."""
        self._token = token
        self._wake.set()

    # -- the stream task -------------------------------------------------------------------

    def _notify(self) -> None:
        # One event per state change: every waiter wakes, later waiters wait on a new one.
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    def _channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self._target, options=self._channel_options)
        return grpc.aio.secure_channel(self._target, self._credentials, options=self._channel_options)

    async def _run(self) -> None:
        channel: grpc.aio.Channel | None = None
        try:
            while not self._closed:
                if channel is None:
                    channel = self._channel()
                try:
                    delay, fresh_channel = await self._watch_once(config_pb2_grpc.ConfigServiceStub(channel))
                except Exception as e:
                    # Not a status nor a protocol breach (a library or SDK bug): the task must
                    # not die silently while readers trust the cache, so it shows and retries.
                    log.exception("config watch of %s failed unexpectedly", self._target)
                    delay, fresh_channel = self._core.failed(Disconnected(None, f"unexpected {e!r}")), True
                if fresh_channel:
                    # A failed channel keeps its own reconnect backoff (up to minutes), which
                    # would hold back ours: the next attempt dials afresh.
                    await channel.close(None)
                    channel = None
                await self._pause(delay)
        finally:
            if channel is not None:
                await channel.close(None)

    async def _watch_once(self, stub: config_pb2_grpc.ConfigServiceAsyncStub) -> tuple[float | None, bool]:
        """One Watch call, to its end: the delay before the next, and whether to redial."""
        core = self._core
        request = core.request()
        try:
            metadata = bearer(self._token)
        except TokenUnavailable as e:
            return core.failed(e), False
        call = stub.Watch(request, metadata=metadata)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._max_silence) as silence:
                while True:
                    message = await call.read()
                    if not isinstance(message, config_pb2.WatchResponse):  # grpc.aio.EOF
                        return core.ended(), False
                    events, resync = core.receive(message)
                    await self._deliver(events)
                    if self._closed:
                        return None, False
                    if resync:
                        return core.resynced(), False
                    silence.reschedule(loop.time() + self._max_silence)
        except TimeoutError:
            log.info("config watch of %s silent for %.1f s, reconnecting", self._target, self._max_silence)
            return core.failed(Stalled(self._max_silence)), True
        except grpc.aio.AioRpcError as e:
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
            # Ends the call when we leave it early (a resync, a stall, a protocol error).
            call.cancel()

    async def _deliver(self, events: list[ChangeEvent]) -> None:
        if self._on_change is None:
            return
        for event in events:
            try:
                result = self._on_change(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # The change is applied either way; a failing callback must not stop the cache.
                self._core.count_callback_error()
                log.exception("on_change raised for %s", event.key)

    async def _pause(self, delay: float | None) -> None:
        if self._closed:
            return
        if delay is None or delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()
