"""The reader SDK against a real :class:`ConfigServer`: snapshot, changes, refusals, a restart.

Each test starts a config server in-process on free ports, on an event loop of its own thread,
fed by a :class:`FeedSource` the test drives from the source's thread (as the Kinesis source
would). The caches are the SDK's own, over real gRPC; nothing here needs the local stack.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from config_client import (
    AsyncConfigCache,
    ChangeEvent,
    ConfigCache,
    InvalidRequest,
    PermissionDenied,
    State,
    Unauthenticated,
)
from config_server.server import ConfigServer
from config_server.settings import ConfigServerSettings
from kernel.auth import AuthSettings, TokenVerifier, issue_dev_token
from projections.model import ConfigChange, ConfigKey
from tests.fixtures.feed_source import FeedSource
from tests.fixtures.waiting import wait_for, wait_for_async

SECRET = "config-client-live-test-secret-long-enough-for-hs256"
TAGS = frozenset({"tenantconfig", "paramconfig"})
AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PREFIX = "tenantconfig:"


def change(key: str, version: int, position: int, value: Any = "v", *, tenant: str = "acme") -> ConfigChange:
    return ConfigChange(
        tenant=tenant, key=ConfigKey.parse(PREFIX + key), value=value, version=version, position=position, updated_at=AT
    )


def deletion(key: str, version: int, position: int, *, tenant: str = "acme") -> ConfigChange:
    return ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse(PREFIX + key),
        value=None,
        version=version,
        position=position,
        updated_at=AT,
        deleted=True,
    )


def token(tenant: str = "acme", *, scope: str = "config:read", secret: str = SECRET) -> str:
    return issue_dev_token(secret, tenant=tenant, scope=scope, now=time.time())


#: A wait on the cache or the server; it polls often, for the changes come within milliseconds.
wait_until = functools.partial(wait_for, timeout=15.0, interval=0.005)


class LiveServer:
    """A :class:`ConfigServer` on its own loop's thread; stoppable and restartable on one port."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides
        self.port = 0
        self.source = FeedSource()
        self._server: ConfigServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *loaded: ConfigChange) -> None:
        """Serve on the same port as before (a free one at first), ready with ``loaded``."""
        settings = ConfigServerSettings(grpc_port=self.port, http_port=0, **self._overrides)
        self.source = FeedSource()
        server = ConfigServer(
            settings, source=self.source, verifier=TokenVerifier(AuthSettings(jwt_secret=SECRET)), tags=TAGS
        )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="config-server-loop", daemon=True)
        thread.start()
        self._server, self._loop, self._thread = server, loop, thread
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(15)
        self.port = server.grpc_port
        self.source.load(*loaded)
        self.source.caught_up()
        wait_until(lambda: self._on_loop(lambda: server.state.ready), "the server to be ready")

    def feed(self, *changes: ConfigChange) -> None:
        """Apply changes and wait until the server holds them."""
        assert self._server is not None
        server = self._server
        self.source.apply(*changes)
        top = max(c.position for c in changes)
        wait_until(lambda: self._on_loop(lambda: server.state.position) >= top, f"position {top}")

    def stop(self) -> None:
        if self._server is None or self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(1.0), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._server = self._loop = self._thread = None

    def _on_loop(self, read: Callable[[], Any]) -> Any:
        assert self._loop is not None

        async def call() -> Any:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)


@pytest.fixture
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.stop()


def values(cache: ConfigCache | AsyncConfigCache) -> dict[str, Any]:
    return {i.key.removeprefix(PREFIX): (i.value, i.version) for i in cache.items()}


def test_the_cache_lists_the_tenants_keys_then_applies_each_change_once(live: LiveServer) -> None:
    live.start(
        change("features/beta", 1, 101, {"cohort": "a", "ratio": 0.25}),
        change("features/dark-mode", 3, 103, True),
        change("features/dark-mode", 1, 104, False, tenant="globex"),
        deletion("features/gone", 2, 105),
    )
    events: list[ChangeEvent] = []
    with ConfigCache(live.target, token=token(), prefixes=[PREFIX + "features/"], on_change=events.append) as cache:
        cache.wait_ready(15)
        assert values(cache) == {"features/beta": ({"cohort": "a", "ratio": 0.25}, 1), "features/dark-mode": (True, 3)}
        assert cache.position is not None and cache.position >= 105

        live.feed(
            change("features/beta", 2, 110, {"cohort": "b"}),
            change("features/other", 1, 111, 1, tenant="globex"),  # another tenant: never sent
            change("elsewhere", 1, 112, "x"),  # outside the watched prefix
            deletion("features/dark-mode", 4, 113),
            change("features/new", 1, 114, [1, None, 2.5]),
        )
        wait_until(lambda: cache.position == 114 or cache.get(PREFIX + "features/new") is not None, "the changes")
        assert values(cache) == {"features/beta": ({"cohort": "b"}, 2), "features/new": ([1, None, 2.5], 1)}
        wait_until(lambda: len(events) == 5, "five callbacks")
        assert [(e.key.removeprefix(PREFIX), e.version, e.deleted) for e in events] == [
            ("features/beta", 1, False),
            ("features/dark-mode", 3, False),
            ("features/beta", 2, False),
            ("features/dark-mode", 4, True),
            ("features/new", 1, False),
        ]
        assert {e.tenant for e in events} == {"acme"}
        assert cache.state is State.READY


def test_the_async_cache_follows_the_same_server(live: LiveServer) -> None:
    live.start(change("a", 1, 101, "one"))

    async def scenario() -> dict[str, Any]:
        async with AsyncConfigCache(live.target, token=token(), prefixes=[PREFIX]) as cache:
            await cache.wait_ready(15)
            await asyncio.to_thread(live.feed, change("a", 2, 102, "two"), change("b", 1, 103, "bee"))
            await wait_for_async(lambda: cache.get(PREFIX + "b") is not None, "b", 15, interval=0.005)
            return values(cache)

    assert asyncio.run(scenario()) == {"a": ("two", 2), "b": ("bee", 1)}


@pytest.mark.parametrize(
    ("cache_token", "prefix", "error"),
    [
        (lambda: token(secret="another-secret-that-is-long-enough-for-hs256"), PREFIX, Unauthenticated),
        (lambda: token(scope="events:read"), PREFIX, PermissionDenied),
        (token, "nosuchtag:", InvalidRequest),
    ],
    ids=["bad-signature", "no-config-read", "unknown-tag"],
)
def test_a_refused_watch_surfaces_its_error_and_is_not_retried(
    live: LiveServer, cache_token: Callable[[], str], prefix: str, error: type[Exception]
) -> None:
    live.start(change("a", 1, 101))
    with ConfigCache(live.target, token=cache_token(), prefixes=[prefix], backoff_base=0.01) as cache:
        with pytest.raises(error):
            cache.wait_ready(15)
        assert cache.state is State.ERROR
        assert cache.stats().watches == 1


def test_the_cache_rides_the_servers_stream_lifetime_cap_without_a_gap() -> None:
    live = LiveServer(stream_lifetime_seconds=0.3, stream_lifetime_jitter=0.0)
    live.start(change("n", 1, 100, 0))
    seen: list[int] = []
    try:
        with ConfigCache(
            live.target, token=token(), prefixes=[PREFIX], stable_after=0.1, on_change=lambda e: seen.append(e.version)
        ) as cache:
            cache.wait_ready(15)
            version = 1
            while cache.stats().clean_ends < 3:
                version += 1
                live.feed(change("n", version, 100 + version, version))
                wait_until(lambda v=version: cache.get(PREFIX + "n").version == v, f"version {version}")
            assert seen == list(range(1, version + 1))
            assert cache.stats().resyncs == 0
            assert cache.stats().failures == 0
    finally:
        live.stop()


def test_a_server_restart_is_ridden_through_serving_the_last_values_then_converging(live: LiveServer) -> None:
    live.start(change("keep", 1, 101, "k1"), change("drop", 1, 102, "d1"), change("edit", 1, 103, "e1"))
    events: list[ChangeEvent] = []
    with ConfigCache(live.target, token=token(), prefixes=[PREFIX], on_change=events.append) as cache:
        cache.wait_ready(15)
        live.feed(change("edit", 2, 110, "e2"))
        wait_until(lambda: cache.get(PREFIX + "edit").version == 2, "the edit")

        live.stop()
        wait_until(lambda: cache.state is State.STALE, "the cache to notice the server is gone")
        assert values(cache) == {"keep": ("k1", 1), "drop": ("d1", 1), "edit": ("e2", 2)}

        # While it was down: "drop" deleted, "edit" changed again, "added" created.
        live.start(
            change("keep", 1, 101, "k1"),
            deletion("drop", 2, 120),
            change("edit", 3, 121, "e3"),
            change("added", 1, 122, "a1"),
        )
        cache.wait_ready(30)
        assert values(cache) == {"keep": ("k1", 1), "edit": ("e3", 3), "added": ("a1", 1)}
        live.feed(change("added", 2, 130, "a2"))
        wait_until(lambda: cache.get(PREFIX + "added").version == 2, "a change after the restart")

    by_key: dict[str, list[int]] = {}
    for event in events:
        by_key.setdefault(event.key.removeprefix(PREFIX), []).append(event.version)
    # The delete is seen as such, or as a key the re-listed snapshot no longer has.
    assert [e.deleted for e in events if e.key == PREFIX + "drop"] == [False, True]
    del by_key["drop"]
    assert by_key == {"keep": [1], "edit": [1, 2, 3], "added": [1, 2]}
    assert cache.stats().reconnects >= 1


def test_a_reader_too_slow_for_the_server_is_cut_relists_and_converges() -> None:
    """A callback that holds the stream's thread lets the server's queue for it fill."""
    live = LiveServer(watcher_queue_size=8, cut_grace_seconds=1.0)
    live.start(change("k0", 1, 100, "x"))
    release = threading.Event()
    versions: dict[str, list[int]] = {}

    def slow(event: ChangeEvent) -> None:
        release.wait(30)
        versions.setdefault(event.key, []).append(event.version)

    blob = "x" * 4096
    try:
        with ConfigCache(live.target, token=token(), prefixes=[PREFIX], on_change=slow) as cache:
            release.set()
            cache.wait_ready(15)
            release.clear()
            live.feed(change("k0", 2, 101, blob))  # the callback now holds the stream's thread
            live.feed(*(change(f"k{i % 50}", 2 + i // 50 + (i % 50 == 0), 102 + i, blob) for i in range(3000)))
            release.set()
            wait_until(lambda: cache.stats().resyncs >= 1, "the server to cut the stream with a resync")
            wait_until(lambda: cache.position is not None and cache.position >= 3101, "convergence", timeout=60)
            cache.wait_ready(30)
            held = {i.key: i.version for i in cache.items()}
        assert held == {
            PREFIX + f"k{k}": max(2 + i // 50 + (i % 50 == 0) for i in range(k, 3000, 50)) for k in range(50)
        }
        for seen in versions.values():
            assert seen == sorted(set(seen))
    finally:
        live.stop()
