"""The reader SDK against a scripted ConfigService: resume, resync, backoff, refusals, stalls.

The server here is a test double over real gRPC (port 0): each Watch call plays the next
script it was given (messages, a clean end, an abort, or holding the stream open for live
messages). Every scenario runs against both caches: the threaded one and the asyncio one
(driven from a loop in a thread of its own).
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config_api.v1 import config_pb2, config_pb2_grpc
from config_client import (
    AsyncConfigCache,
    Backoff,
    CacheClosed,
    ChangeEvent,
    ConfigCache,
    InvalidRequest,
    NotReady,
    PermissionDenied,
    Stalled,
    State,
    Unauthenticated,
    WatchRejected,
)
from config_client._state import Replica
from tests.fixtures.waiting import wait_for, wait_for_async

PREFIX = "tenantconfig:"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# -- messages --------------------------------------------------------------------------


def entry(key: str, value: Any, version: int, position: int) -> config_pb2.Entry:
    e = config_pb2.Entry(
        key=PREFIX + key, value_json=orjson.dumps(value).decode(), version=version, position=position, tenant="acme"
    )
    e.updated_at.FromDatetime(T0)
    return e


def snapshot(position: int, *entries: config_pb2.Entry, done: bool = True) -> config_pb2.WatchResponse:
    return config_pb2.WatchResponse(snapshot=config_pb2.Snapshot(entries=entries, position=position, done=done))


def set_(key: str, value: Any, version: int, position: int) -> config_pb2.WatchResponse:
    change = config_pb2.Change(
        kind=config_pb2.Change.SET,
        key=PREFIX + key,
        value_json=orjson.dumps(value).decode(),
        version=version,
        position=position,
        tenant="acme",
    )
    change.updated_at.FromDatetime(T0)
    return config_pb2.WatchResponse(change=change)


def delete(key: str, version: int, position: int) -> config_pb2.WatchResponse:
    change = config_pb2.Change(
        kind=config_pb2.Change.DELETE, key=PREFIX + key, version=version, position=position, tenant="acme"
    )
    return config_pb2.WatchResponse(change=change)


def progress(position: int) -> config_pb2.WatchResponse:
    return config_pb2.WatchResponse(progress=config_pb2.Progress(position=position))


def resync() -> config_pb2.WatchResponse:
    return config_pb2.WatchResponse(
        resync=config_pb2.Resync(reason=config_pb2.Resync.HISTORY_TOO_SHORT, oldest_position=500)
    )


# -- the scripted server ---------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    code: grpc.StatusCode
    detail: str = "scripted"


class End:
    """The server returns: a clean end of the stream (status OK)."""


class Hold:
    """Keep the stream open, forwarding what :meth:`WatchCall.push` sends, until cancelled."""


_CANCELLED = object()
Step = config_pb2.WatchResponse | Abort | End | Hold


@dataclass
class WatchCall:
    """One Watch call the double received."""

    prefixes: list[str]
    since: int | None
    authorization: str | None
    live: queue.Queue[Any] = field(default_factory=queue.Queue)

    def push(self, *steps: config_pb2.WatchResponse | Abort | End) -> None:
        for step in steps:
            self.live.put(step)


class ScriptedConfigService(config_pb2_grpc.ConfigServiceServicer):
    """A ConfigService whose Watch calls play scripts given in advance (then hold the stream)."""

    def __init__(self) -> None:
        self.calls: list[WatchCall] = []
        self._scripts: queue.Queue[list[Step]] = queue.Queue()
        self._changed = threading.Condition()

    def script(self, *steps: Step) -> None:
        """What the next Watch call without a script yet does; without ``End``/``Abort`` it holds."""
        self._scripts.put(list(steps))

    def call(self, n: int, timeout: float = 10.0) -> WatchCall:
        """The ``n``th Watch call (from 1), once it arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.calls) >= n, timeout):
                raise AssertionError(f"expected Watch call {n}, got {len(self.calls)}")
            return self.calls[n - 1]

    def Get(self, request: config_pb2.GetRequest, context: grpc.ServicerContext) -> config_pb2.GetResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def List(self, request: config_pb2.ListRequest, context: grpc.ServicerContext) -> config_pb2.ListResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def Watch(
        self, request: config_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[config_pb2.WatchResponse]:
        metadata = dict(context.invocation_metadata())
        call = WatchCall(
            prefixes=list(request.prefixes),
            since=request.since if request.HasField("since") else None,
            authorization=metadata.get("authorization"),
        )
        context.add_callback(lambda: call.live.put(_CANCELLED))
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()
        try:
            steps = self._scripts.get_nowait()
        except queue.Empty:
            steps = []
        for step in [*steps, Hold()]:
            if isinstance(step, End):
                return
            if isinstance(step, Abort):
                context.abort(step.code, step.detail)
            if isinstance(step, Hold):
                while (live := call.live.get()) is not _CANCELLED:
                    if isinstance(live, End):
                        return
                    if isinstance(live, Abort):
                        context.abort(live.code, live.detail)
                    yield live
                return
            if isinstance(step, config_pb2.WatchResponse):
                yield step


class ScriptedServer:
    """The double served by a real gRPC server on a free port; restartable on the same port."""

    def __init__(self) -> None:
        self.service = ScriptedConfigService()
        self.port = 0
        self._server: grpc.Server | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        config_pb2_grpc.add_ConfigServiceServicer_to_server(self.service, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.stop()


# -- the two caches behind one face ----------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand (drives ``age`` and the backoff's stable period)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class AsyncDriven:
    """An :class:`AsyncConfigCache` on a loop in its own thread, with the sync cache's methods."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> AsyncConfigCache:
            return AsyncConfigCache(target, **kwargs)

        self.cache = self._run(make())

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> AsyncDriven:
        self._run(self.cache.start())
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        self._run(self.cache.wait_ready(timeout))

    def set_token(self, token: Any) -> None:
        self.loop.call_soon_threadsafe(self.cache.set_token, token)

    def close(self) -> None:
        self._run(self.cache.close())

    def shutdown(self) -> None:
        self.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


CacheFactory = Callable[..., Any]


@pytest.fixture(params=["threads", "asyncio"])
def make_cache(request: pytest.FixtureRequest, server: ScriptedServer) -> Iterator[CacheFactory]:
    """Build a started cache of the parametrized kind against ``server``; closed at teardown."""
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        options: dict[str, Any] = {"token": "t0", "prefixes": [PREFIX], "backoff_base": 0.01, "backoff_cap": 0.05}
        options.update(kwargs)
        cache: Any = (
            ConfigCache(server.target, **options)
            if request.param == "threads"
            else AsyncDriven(server.target, **options)
        )
        made.append(cache)
        return cache.start()

    yield make
    for cache in made:
        if isinstance(cache, AsyncDriven):
            cache.shutdown()
        else:
            cache.close()


#: A wait on the cache, which follows the scripted server within milliseconds: it polls often.
wait_until = functools.partial(wait_for, interval=0.002)


def values(cache: Any) -> dict[str, Any]:
    return {i.key.removeprefix(PREFIX): i.value for i in cache.items()}


def brief(events: list[ChangeEvent]) -> list[tuple[str, Any, int, bool]]:
    return [(e.key.removeprefix(PREFIX), e.value, e.version, e.deleted) for e in events]


# -- list, then watch ------------------------------------------------------------------


def test_a_snapshot_then_changes_are_served_from_memory_with_one_callback_per_applied_change(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    events: list[ChangeEvent] = []
    server.service.script(
        snapshot(10, entry("a", 1, 1, 5), done=False),
        snapshot(10, entry("b", {"x": [1, 2.5, None]}, 3, 9), done=True),
        set_("a", 2, 2, 11),
        set_("a", 2, 2, 11),  # a repeat: no second callback
        set_("b", "old", 2, 8),  # below what is held: ignored
        delete("b", 4, 12),
        set_("c", True, 1, 13),
    )
    cache = make_cache(on_change=events.append)
    cache.wait_ready(10)
    wait_until(lambda: cache.position == 13, "the last change")

    assert values(cache) == {"a": 2, "c": True}
    assert cache.get(PREFIX + "b") is None
    a = cache.get(PREFIX + "a")
    assert (a.version, a.position, a.tenant, a.updated_at) == (2, 11, "acme", T0)
    assert brief(events) == [
        ("a", 1, 1, False),
        ("b", {"x": [1, 2.5, None]}, 3, False),
        ("a", 2, 2, False),
        ("b", None, 4, True),
        ("c", True, 1, False),
    ]
    assert cache.stats().changes_applied == 5
    call = server.service.call(1)
    assert (call.prefixes, call.since, call.authorization) == ([PREFIX], None, "Bearer t0")


def test_a_callable_token_is_asked_for_every_watch(server: ScriptedServer, make_cache: CacheFactory) -> None:
    tokens = iter(["first", "second"])
    server.service.script(snapshot(10), End())
    make_cache(token=lambda: next(tokens))
    assert server.service.call(2).authorization == "Bearer second"
    assert server.service.call(1).authorization == "Bearer first"


# -- resume, resync, clean ends --------------------------------------------------------


def test_after_a_disconnect_the_watch_resumes_after_the_last_position(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), set_("a", 2, 2, 12), Abort(grpc.StatusCode.UNAVAILABLE))
    server.service.script(progress(40), Abort(grpc.StatusCode.INTERNAL))
    events: list[ChangeEvent] = []
    cache = make_cache(on_change=events.append)

    assert server.service.call(2).since == 12
    assert server.service.call(3).since == 40
    third = server.service.call(3)
    third.push(set_("a", 2, 2, 12), set_("a", 3, 3, 41), progress(41))  # an overlap, then news
    wait_until(lambda: cache.position == 41 and cache.state is State.READY, "the third stream to catch up")
    assert brief(events) == [("a", 1, 1, False), ("a", 2, 2, False), ("a", 3, 3, False)]
    assert cache.stats().reconnects == 2


def test_a_clean_end_is_ridden_through_at_once_without_leaving_ready(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    # Any backoff would be a full 30 s: the second call can only come at once.
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), progress(20), End())
    states: list[State] = []
    cache = make_cache(backoff_base=30.0, backoff_cap=30.0, rand=lambda: 1.0)
    cache.wait_ready(10)
    second = server.service.call(2)
    states.append(cache.state)
    second.push(progress(21))
    wait_until(lambda: cache.position == 21, "progress on the resumed stream")
    states.append(cache.state)

    assert second.since == 20
    assert states == [State.READY, State.READY]
    assert cache.stats().last_backoff == 0.0
    assert cache.stats().clean_ends == 1


def test_a_server_that_keeps_ending_streams_at_once_is_backed_off(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(snapshot(10), End())
    server.service.script(End())  # ends again before saying anything
    cache = make_cache(backoff_base=0.01, rand=lambda: 1.0)
    server.service.call(3)
    assert cache.stats().clean_ends == 2
    assert cache.stats().last_backoff == 0.01


def test_after_an_outage_a_resync_relists_at_once(server: ScriptedServer, make_cache: CacheFactory) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), End())
    for _ in range(5):
        server.service.script(Abort(grpc.StatusCode.UNAVAILABLE))
    server.service.script(resync())
    # Any backoff after five failures would be seconds long: the re-list can only come at once.
    cache = make_cache(backoff_base=1.0, backoff_cap=30.0, rand=lambda: 0.001)
    relist = server.service.call(8)
    assert relist.since is None
    assert cache.stats().last_backoff == 0.0
    relist.push(snapshot(900, entry("a", 2, 2, 800)))
    cache.wait_ready(10)


def test_a_resync_relists_and_deletes_what_vanished_keeping_old_values_until_the_snapshot_is_done(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5), entry("b", 1, 1, 6), entry("k", "same", 4, 7)), resync())
    events: list[ChangeEvent] = []
    cache = make_cache(on_change=events.append)
    second = server.service.call(2)
    assert second.since is None
    assert cache.state is State.STALE
    assert cache.stats().resyncs == 1

    messages = cache.stats().messages
    second.push(snapshot(600, entry("a", 2, 2, 550), entry("k", "same", 4, 7), done=False))
    wait_until(lambda: cache.stats().messages == messages + 1, "the first chunk")
    assert values(cache) == {"a": 1, "b": 1, "k": "same"}  # the old copy, until `done`
    assert cache.state is State.STALE

    del events[:]
    second.push(snapshot(600, entry("c", 3, 1, 590), done=True))
    cache.wait_ready(10)
    assert values(cache) == {"a": 2, "c": 3, "k": "same"}
    assert sorted(brief(events)) == [("a", 2, 2, False), ("b", None, 1, True), ("c", 3, 1, False)]
    assert cache.position == 600


def test_a_snapshot_cut_off_before_done_is_dropped_and_the_old_copy_kept(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), resync())
    server.service.script(snapshot(700, entry("z", 9, 1, 650), done=False), Abort(grpc.StatusCode.UNAVAILABLE))
    cache = make_cache()
    third = server.service.call(3)
    assert third.since is None  # still owes a complete snapshot
    assert values(cache) == {"a": 1}
    third.push(snapshot(710, entry("y", 8, 1, 705)))
    cache.wait_ready(10)
    assert values(cache) == {"y": 8}


# -- failures: backoff, stale service, refusals, stalls --------------------------------


def test_while_disconnected_it_serves_the_last_values_stale_with_a_growing_age(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    clock = FakeClock()
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), progress(15))
    cache = make_cache(clock=clock)
    cache.wait_ready(10)
    wait_until(lambda: cache.position == 15, "progress")
    assert cache.age == 0.0

    server.stop()
    wait_until(lambda: cache.state is State.STALE, "the cache to notice")
    clock.advance(42.5)
    assert cache.age == 42.5
    assert cache.get(PREFIX + "a").value == 1
    assert cache.last_error is not None
    with pytest.raises(NotReady):
        cache.wait_ready(0.05)

    server.start()  # same port
    call = server.service.call(2)
    call.push(progress(16))
    cache.wait_ready(10)
    assert call.since == 15
    assert cache.age == 0.0
    assert cache.last_error is None
    assert cache.stats().failures >= 1


def test_the_backoff_grows_while_failing_and_resets_after_a_stable_stream(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    clock = FakeClock()
    for _ in range(3):
        server.service.script(Abort(grpc.StatusCode.UNAVAILABLE))
    cache = make_cache(clock=clock, rand=lambda: 1.0, backoff_base=0.01, backoff_cap=1.0, stable_after=30.0)
    fourth = server.service.call(4)
    assert cache.stats().last_backoff == pytest.approx(0.04)  # 0.01, 0.02, 0.04
    fourth.push(snapshot(10))
    cache.wait_ready(10)

    clock.advance(29.0)  # not yet stable: the next failure continues the series
    fourth.push(Abort(grpc.StatusCode.RESOURCE_EXHAUSTED))
    fifth = server.service.call(5)
    assert cache.stats().last_backoff == pytest.approx(0.08)

    fifth.push(progress(11))
    cache.wait_ready(10)
    clock.advance(30.0)
    fifth.push(Abort(grpc.StatusCode.UNAVAILABLE))
    server.service.call(6)
    assert cache.stats().last_backoff == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
    ],
)
def test_a_refused_watch_is_not_retried_until_a_new_token(
    server: ScriptedServer, make_cache: CacheFactory, code: grpc.StatusCode, error: type[WatchRejected]
) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), Abort(grpc.StatusCode.UNAVAILABLE))
    server.service.script(Abort(code, "no"))
    cache = make_cache(rand=lambda: 0.0)  # a retry loop would spin at once
    wait_until(lambda: cache.state is State.ERROR, "the refusal")
    with pytest.raises(error) as refused:
        cache.wait_ready(10)
    assert refused.value.code is code

    assert cache.get(PREFIX + "a").value == 1  # still served
    with server.service._changed:
        assert not server.service._changed.wait_for(lambda: len(server.service.calls) > 2, 0.3)

    cache.set_token("t1")
    third = server.service.call(3)
    assert third.authorization == "Bearer t1"
    assert third.since == 10
    third.push(progress(11))
    cache.wait_ready(10)
    assert len(server.service.calls) == 3
    assert cache.stats().rejections == 1


def test_with_a_token_callable_an_auth_failure_is_retried_after_the_long_delay(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(Abort(grpc.StatusCode.UNAUTHENTICATED, "expired"))
    asked: list[str] = []

    def token() -> str:
        asked.append("t")
        return f"t{len(asked)}"

    cache = make_cache(token=token, auth_retry_after=0.2, rand=lambda: 0.0)
    second = server.service.call(2)
    assert cache.stats().last_backoff == 0.2
    assert (server.service.call(1).authorization, second.authorization) == ("Bearer t1", "Bearer t2")
    second.push(snapshot(10))
    cache.wait_ready(10)


def test_invalid_prefixes_are_never_retried_even_with_a_token_callable(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(Abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prefix"))
    cache = make_cache(token=lambda: "t", auth_retry_after=0.01)
    with pytest.raises(InvalidRequest):
        cache.wait_ready(10)
    with server.service._changed:
        assert not server.service._changed.wait_for(lambda: len(server.service.calls) > 1, 0.3)
    assert cache.state is State.ERROR


def test_a_silent_stream_is_cut_and_the_watch_resumed(server: ScriptedServer, make_cache: CacheFactory) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)))  # then holds, saying nothing
    cache = make_cache(max_silence=0.5)
    cache.wait_ready(10)
    second = server.service.call(2)  # silent too: the cache stays stale
    assert second.since == 10
    assert cache.stats().stalls >= 1
    assert isinstance(cache.last_error, Stalled)
    assert cache.state is State.STALE
    assert cache.get(PREFIX + "a").value == 1


def test_the_state_turns_stale_when_the_data_is_older_than_max_silence(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    clock = FakeClock()
    server.service.script(snapshot(10, entry("a", 1, 1, 5)))
    cache = make_cache(clock=clock, max_silence=60.0)
    cache.wait_ready(10)
    clock.advance(61.0)
    assert cache.state is State.STALE


def test_a_failing_callback_is_counted_and_the_cache_goes_on(server: ScriptedServer, make_cache: CacheFactory) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), set_("a", 2, 2, 11))

    def boom(event: ChangeEvent) -> None:
        raise RuntimeError("callback bug")

    cache = make_cache(on_change=boom)
    wait_until(lambda: cache.position == 11, "the change")
    assert cache.get(PREFIX + "a").value == 2
    assert cache.stats().callback_errors == 2


def test_a_change_inside_a_snapshot_is_a_protocol_error_and_the_watch_starts_over(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5), done=False), set_("a", 2, 2, 11))
    cache = make_cache()
    second = server.service.call(2)
    assert second.since is None
    second.push(snapshot(12, entry("a", 2, 2, 11)))
    cache.wait_ready(10)
    assert cache.stats().failures == 1


def test_a_value_or_timestamp_the_sdk_cannot_decode_is_a_protocol_error_and_retried(
    server: ScriptedServer, make_cache: CacheFactory
) -> None:
    bad_time = set_("t", 1, 1, 12)
    bad_time.change.updated_at.seconds = 10**15
    bad_json = set_("j", 1, 1, 13)
    bad_json.change.value_json = "{not json"
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), bad_time)
    server.service.script(bad_json)
    cache = make_cache()
    third = server.service.call(3)
    assert (server.service.call(2).since, third.since) == (10, 10)
    assert cache.stats().failures == 2
    assert cache.get(PREFIX + "t") is None
    third.push(set_("t", 1, 1, 12), progress(14))
    cache.wait_ready(10)
    assert values(cache) == {"a": 1, "t": 1}


def test_an_unexpected_error_in_the_sdk_is_shown_and_retried_not_fatal(
    server: ScriptedServer, make_cache: CacheFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Replica.progress
    raised: list[int] = []

    def progress_once(self: Replica, position: int) -> None:
        if not raised:
            raised.append(position)
            raise RuntimeError("an SDK bug")
        original(self, position)

    monkeypatch.setattr(Replica, "progress", progress_once)
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), progress(11))
    cache = make_cache()
    second = server.service.call(2)
    assert second.since == 10
    assert "RuntimeError" in str(cache.last_error)
    second.push(progress(12))
    cache.wait_ready(10)
    assert cache.position == 12


def test_close_stops_watching_and_keeps_the_values(server: ScriptedServer, make_cache: CacheFactory) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)))
    cache = make_cache()
    cache.wait_ready(10)
    cache.close()
    assert cache.get(PREFIX + "a").value == 1
    with pytest.raises(CacheClosed):
        cache.wait_ready(1)


# -- the sync cache's own surface ------------------------------------------------------


def test_the_context_manager_starts_and_closes_and_callbacks_run_on_the_watch_thread(server: ScriptedServer) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)))
    threads: list[str] = []
    with ConfigCache(
        server.target, token="t", prefixes=[PREFIX], on_change=lambda e: threads.append(threading.current_thread().name)
    ) as cache:
        cache.wait_ready(10)
        assert threads == ["config-cache-watch"]
        assert repr(cache).endswith("ready>")
    assert not any(t.name.startswith("config-cache") for t in threading.enumerate())


def test_the_token_never_appears_in_the_repr_or_errors(server: ScriptedServer) -> None:
    secret = "s3cr3t-token-value"
    server.service.script(Abort(grpc.StatusCode.UNAUTHENTICATED, "bad token"))
    with ConfigCache(server.target, token=secret, prefixes=[PREFIX]) as cache:
        with pytest.raises(Unauthenticated) as refused:
            cache.wait_ready(10)
        assert secret not in repr(cache) + str(refused.value) + repr(cache.stats())


def test_prefixes_must_be_a_non_empty_sequence_of_strings() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ConfigCache("localhost:1", token="t", prefixes=[])
    with pytest.raises(ValueError, match="not one string"):
        ConfigCache("localhost:1", token="t", prefixes="tenantconfig:")


def test_the_async_cache_awaits_a_coroutine_callback(server: ScriptedServer) -> None:
    server.service.script(snapshot(10, entry("a", 1, 1, 5)), set_("a", 2, 2, 11))
    seen: list[int] = []

    async def scenario() -> None:
        async def on_change(event: ChangeEvent) -> None:
            await asyncio.sleep(0)  # a callback that really suspends: only an awaited one gets past it
            seen.append(event.version)

        async with AsyncConfigCache(server.target, token="t", prefixes=[PREFIX], on_change=on_change) as cache:
            await cache.wait_ready(10)
            await wait_for_async(lambda: cache.position == 11, "position 11", interval=0.002)
            assert cache.get(PREFIX + "a").value == 2

    asyncio.run(scenario())
    assert seen == [1, 2]


# -- the backoff, alone ----------------------------------------------------------------


def test_the_backoff_window_doubles_to_the_cap_and_the_delay_is_drawn_inside_it() -> None:
    clock = FakeClock()
    full = Backoff(base=0.1, cap=1.0, stable_after=30.0, rand=lambda: 1.0, clock=clock)
    assert [round(full.after_failure(), 6) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    half = Backoff(base=0.1, cap=1.0, rand=lambda: 0.5, clock=clock)
    assert [round(half.after_failure(), 6) for _ in range(3)] == [0.05, 0.1, 0.2]
    long_outage = Backoff(base=0.1, cap=30.0, rand=lambda: 1.0, clock=clock)
    assert [long_outage.after_failure() for _ in range(2000)][-1] == 30.0


def test_the_backoff_resets_only_after_a_stream_stayed_healthy_for_the_stable_period() -> None:
    clock = FakeClock()
    b = Backoff(base=0.1, cap=10.0, stable_after=30.0, rand=lambda: 1.0, clock=clock)
    b.after_failure(), b.after_failure()
    b.healthy()
    clock.advance(29.9)
    assert b.after_failure() == pytest.approx(0.4)
    b.healthy()
    clock.advance(30.0)
    assert b.after_failure() == pytest.approx(0.1)
    assert b.failures == 1


def test_clean_ends_and_resyncs_restart_at_once_after_failures_but_not_in_an_endless_row() -> None:
    clock = FakeClock()
    b = Backoff(base=0.1, cap=10.0, stable_after=30.0, rand=lambda: 1.0, clock=clock)
    assert b.after_end() == pytest.approx(0.1)  # the stream said nothing: a failure
    for _ in range(4):
        b.after_failure()
    b.healthy()  # back after an outage, and the server answers resync: re-list at once
    assert b.after_end() == 0.0
    b.healthy()
    assert b.after_end() == 0.0
    b.healthy()
    assert b.after_end() == 0.0
    b.healthy()
    clock.advance(5.0)
    assert b.after_end() == pytest.approx(3.2)  # a fourth in a row, none stable: backed off
    b.healthy()
    clock.advance(30.0)
    assert b.after_end() == 0.0  # a stable stream resets both
    assert b.failures == 0


# -- the replica, alone ----------------------------------------------------------------


def _change(key: str, version: int, position: int, deleted: bool) -> config_pb2.Change:
    if deleted:
        return delete(key, version, position).change
    return set_(key, version, version, position).change


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 6), st.booleans()),
        max_size=40,
    )
)
def test_changes_in_any_order_with_repeats_converge_to_each_keys_highest_version(
    changes: list[tuple[str, int, bool]],
) -> None:
    replica = Replica()
    replica.add_chunk(snapshot(0).snapshot)
    applied: dict[str, list[int]] = {}
    for key, version, deleted in changes:
        event = replica.apply_change(_change(key, version, version * 10, deleted))
        if event is not None:
            applied.setdefault(key, []).append(event.version)

    expected: dict[str, int] = {}
    highest: dict[str, tuple[int, bool]] = {}
    for key, version, deleted in changes:
        if key not in highest or version > highest[key][0]:
            highest[key] = (version, deleted)
    for key, (version, deleted) in highest.items():
        if not deleted:
            expected[PREFIX + key] = version
    assert {i.key: i.value for i in replica.items()} == expected
    for versions in applied.values():
        assert versions == sorted(set(versions))  # each key's versions only go up


def test_a_snapshot_older_than_the_copy_neither_rolls_back_nor_resurrects_keys() -> None:
    replica = Replica()
    replica.add_chunk(snapshot(10, entry("a", 1, 1, 5), entry("b", 1, 1, 6)).snapshot)
    replica.apply_change(set_("a", 3, 3, 30).change)
    replica.apply_change(delete("b", 2, 31).change)
    replica.apply_change(set_("n", 1, 1, 32).change)
    # A server lagging behind the last one re-lists at 20: it knows a@2 and b, not n.
    events = replica.add_chunk(snapshot(20, entry("a", 2, 2, 20), entry("b", 1, 1, 6)).snapshot)
    assert events == []
    assert {i.key: i.version for i in replica.items()} == {PREFIX + "a": 3, PREFIX + "n": 1}
    assert replica.position == 20


# -- importable without the server's dependencies --------------------------------------


def test_the_sdk_imports_with_the_servers_dependencies_blocked() -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        BLOCKED = {"kernel", "projections", "event_bus", "config_server", "tagbus", "tailer",
                   "consumers", "producers", "boto3", "botocore", "psycopg", "psycopg_pool",
                   "sqlalchemy", "fastapi", "starlette", "jwt", "httpx", "uvicorn",
                   # Installed beside grpcio here (grpc imports them if present), not needed.
                   "grpc_health", "grpc_reflection", "grpc_tools"}

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Refuse())
        import config_client
        from config_client import AsyncConfigCache, ConfigCache, ChangeEvent, Item, State
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], check=False, cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
