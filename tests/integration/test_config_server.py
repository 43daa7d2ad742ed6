"""The config server through its real ports: gRPC (Get, List, Watch, health, reflection) and HTTP (SSE).

Each test starts a :class:`ConfigServer` in-process on free ports, on an event loop of its
own thread, with a :class:`FeedSource` the test drives: what the test hands it reaches the
server's state from the source's thread, as a Kinesis or upstream source would. Clients are
the ordinary synchronous ``grpc`` channel and ``httpx``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from config_api.v1 import config_pb2 as pb
from config_api.v1 import config_pb2_grpc as pb_grpc
from config_server.server import ConfigServer
from config_server.settings import ConfigServerSettings
from kernel.auth import AuthSettings, TokenVerifier, issue_dev_token
from projections.model import ConfigChange, ConfigKey
from tests.fixtures.feed_source import FeedSource
from tests.fixtures.jwks import AUDIENCE, ISSUER, SigningKeys, claims, sign
from tests.fixtures.waiting import wait_for

SECRET = "config-server-test-secret-long-enough-for-hs256"
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
TAGS = frozenset({"tenantconfig", "paramconfig"})
AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SERVICE = "tagbus.config.v1.ConfigService"
T = TypeVar("T")
_ROOT = Path(__file__).resolve().parents[2]


def change(
    key: str, version: int, position: int, value: Any = "v", *, tenant: str = "acme", deleted: bool = False
) -> ConfigChange:
    return ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse(key),
        value=None if deleted else value,
        version=version,
        position=position,
        updated_at=AT,
        deleted=deleted,
    )


def token(tenant: str = "acme", *, scope: str = "config:read", **options: Any) -> str:
    return issue_dev_token(SECRET, tenant=tenant, scope=scope, now=time.time(), **options)


def bearer(value: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


@dataclass
class Running:
    """A config server under test, on its own loop's thread."""

    server: ConfigServer
    source: FeedSource
    loop: asyncio.AbstractEventLoop
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def on_loop(self, read: Callable[[], T]) -> T:
        """``read()`` on the server's loop (its state is not thread-safe)."""

        async def call() -> T:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def channel(self, *options: tuple[str, Any]) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}", options=list(options))
        self.channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.ConfigServiceStub:
        return pb_grpc.ConfigServiceStub(self.channel())

    def feed(self, *changes: ConfigChange) -> None:
        """Apply changes and wait until the server has them."""
        self.source.apply(*changes)
        top = max(c.position for c in changes)
        wait_for(lambda: self.on_loop(lambda: self.server.state.position) >= top, what=f"position {top}")

    def start_ready(self, *changes: ConfigChange, lag_ms: int = 0) -> None:
        self.source.load(*changes)
        self.source.caught_up(lag_ms)
        wait_for(lambda: self.on_loop(lambda: self.server.state.ready), what="ready")


@contextmanager
def running(verifier: TokenVerifier | None = None, **overrides: Any) -> Iterator[Running]:
    settings = ConfigServerSettings(grpc_port=0, http_port=0, **overrides)
    source = FeedSource()
    server = ConfigServer(
        settings, source=source, verifier=verifier or TokenVerifier(AuthSettings(jwt_secret=SECRET)), tags=TAGS
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="config-server-loop", daemon=True)
    thread.start()
    handle = Running(server, source, loop)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(15)
        yield handle
    finally:
        for channel in handle.channels:
            channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def config() -> Iterator[Running]:
    with running() as handle:
        yield handle


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def kind(message: pb.WatchResponse) -> str:
    return str(message.WhichOneof("kind"))


def watch(stub: pb_grpc.ConfigServiceStub, value: str, *prefixes: str, since: int | None = None) -> Any:
    request = pb.WatchRequest(prefixes=list(prefixes) or [""], since=since)
    return stub.Watch(request, metadata=bearer(value), timeout=30)


def snapshot_of(call: Any) -> tuple[list[pb.Entry], int]:
    """Read snapshot chunks until ``done``: the entries and their position."""
    entries: list[pb.Entry] = []
    while True:
        message = next(call)
        assert kind(message) == "snapshot"
        entries.extend(message.snapshot.entries)
        if message.snapshot.done:
            return entries, message.snapshot.position


def next_change(call: Any) -> pb.Change:
    """The next change, skipping progress messages."""
    while True:
        message: pb.WatchResponse = next(call)
        if kind(message) == "change":
            return message.change
        assert kind(message) == "progress", message


# -- Get and List ------------------------------------------------------------------------


def test_get_and_list_answer_from_memory_with_the_http_apis_rules(config: Running) -> None:
    config.start_ready(
        change("tenantconfig:features/dark-mode", 3, 103, True),
        change("tenantconfig:features/beta", 1, 101, {"cohort": "a", "ratio": 0.25}),
        change("tenantconfig:features/gone", 2, 104, deleted=True),
        change("paramconfig:limits/seats", 1, 102, 10),
        change("tenantconfig:features/dark-mode", 1, 105, False, tenant="globex"),
    )
    stub = config.stub()
    acme = bearer(token("acme"))

    got = stub.Get(pb.GetRequest(key="tenantconfig:features/beta"), metadata=acme)
    assert json.loads(got.entry.value_json) == {"cohort": "a", "ratio": 0.25}
    assert (got.entry.version, got.entry.position, got.entry.tenant) == (1, 101, "acme")
    assert got.entry.updated_at.ToDatetime(tzinfo=UTC) == AT
    assert got.position == 105

    assert code_of(lambda: stub.Get(pb.GetRequest(key="tenantconfig:features/gone"), metadata=acme)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: stub.Get(pb.GetRequest(key="tenantconfig:nothing"), metadata=acme)) == (
        grpc.StatusCode.NOT_FOUND
    )
    # Another tenant's key is as absent as any other.
    globex_only = bearer(token("initech"))
    assert code_of(lambda: stub.Get(pb.GetRequest(key="tenantconfig:features/dark-mode"), metadata=globex_only)) == (
        grpc.StatusCode.NOT_FOUND
    )

    listed = stub.List(pb.ListRequest(prefix=""), metadata=acme)
    assert [e.key for e in listed.entries] == [
        "paramconfig:limits/seats",
        "tenantconfig:features/beta",
        "tenantconfig:features/dark-mode",
    ]
    assert json.loads(listed.entries[2].value_json) is True
    assert listed.next_page_token == "" and listed.position == 105

    first = stub.List(pb.ListRequest(prefix="tenantconfig:features/", page_size=1), metadata=acme)
    assert [e.key for e in first.entries] == ["tenantconfig:features/beta"]
    second = stub.List(
        pb.ListRequest(prefix="tenantconfig:features/", page_size=1, page_token=first.next_page_token), metadata=acme
    )
    assert [e.key for e in second.entries] == ["tenantconfig:features/dark-mode"]
    assert second.next_page_token == ""

    globex = stub.List(pb.ListRequest(prefix="tenant"), metadata=bearer(token("globex")))
    assert [(e.key, e.value_json, e.tenant) for e in globex.entries] == [
        ("tenantconfig:features/dark-mode", "false", "globex")
    ]


def test_not_ready_until_the_source_catches_up(config: Running) -> None:
    stub = config.stub()
    health = health_pb2_grpc.HealthStub(config.channel())
    acme = bearer(token())

    assert code_of(lambda: stub.Get(pb.GetRequest(key="tenantconfig:a"), metadata=acme)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: stub.List(pb.ListRequest(), metadata=acme)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: next(watch(stub, token()))) == grpc.StatusCode.UNAVAILABLE
    for service in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    not_ready = httpx.get(f"{config.http}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{config.http}/healthz").status_code == 200

    config.start_ready(change("tenantconfig:a", 1, 7, "x"))

    def serving(service: str) -> bool:
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    for service in ("", SERVICE):
        assert wait_for(functools.partial(serving, service), what=f"{service!r} SERVING")
    assert httpx.get(f"{config.http}/readyz").json() == {"status": "ready", "position": 7}
    assert stub.Get(pb.GetRequest(key="tenantconfig:a"), metadata=acme).entry.value_json == '"x"'


def test_reflection_lists_and_describes_the_service(config: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(config.channel())
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))

    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


# -- Watch -------------------------------------------------------------------------------


def test_watch_sends_a_chunked_snapshot_then_live_changes_of_its_tenant_and_prefixes() -> None:
    with running(snapshot_chunk_size=2) as config:
        config.start_ready(*(change(f"tenantconfig:features/f{i}", 1, 10 + i, i) for i in range(5)))
        stub = config.stub()
        call = watch(stub, token(), "tenantconfig:features/")

        chunks = [next(call) for _ in range(3)]
        assert [len(m.snapshot.entries) for m in chunks] == [2, 2, 1]
        assert [m.snapshot.done for m in chunks] == [False, False, True]
        assert {m.snapshot.position for m in chunks} == {14}
        assert [e.key for m in chunks for e in m.snapshot.entries] == [f"tenantconfig:features/f{i}" for i in range(5)]

        config.feed(
            change("tenantconfig:features/f9", 1, 20, {"on": True}, tenant="globex"),
            change("tenantconfig:limits/seats", 1, 21, 5),
            change("tenantconfig:features/f1", 2, 22, "two"),
            change("tenantconfig:features/f0", 2, 23, deleted=True),
        )
        set_ = next_change(call)
        assert (set_.kind, set_.key, set_.value_json, set_.version, set_.position) == (
            pb.Change.SET,
            "tenantconfig:features/f1",
            '"two"',
            2,
            22,
        )
        delete = next_change(call)
        assert (delete.kind, delete.key, delete.value_json, delete.version, delete.position) == (
            pb.Change.DELETE,
            "tenantconfig:features/f0",
            "",
            2,
            23,
        )
        call.cancel()
        wait_for(lambda: config.on_loop(lambda: config.server.state.watcher_count() == 0), what="watcher closed")


def test_snapshot_chunks_stay_small_in_bytes_too() -> None:
    with running(snapshot_chunk_size=100, snapshot_chunk_bytes=1_000) as config:
        values = ["x" * 400] * 4 + ["y" * 5_000]
        config.start_ready(*(change(f"tenantconfig:features/f{i}", 1, 10 + i, v) for i, v in enumerate(values)))
        call = watch(config.stub(), token())

        chunks = [next(call).snapshot for _ in range(3)]
        # Two entries of about 500 bytes fit in 1,000; a larger one goes alone.
        assert [len(c.entries) for c in chunks] == [2, 2, 1]
        assert [c.done for c in chunks] == [False, False, True]
        assert len(chunks[2].entries[0].value_json) == 5_002
        call.cancel()


def test_watch_resumes_after_since_and_then_reports_progress(config: Running) -> None:
    config.start_ready(change("tenantconfig:a", 1, 10))
    stub = config.stub()
    first = watch(stub, token())
    _, position = snapshot_of(first)
    config.feed(change("tenantconfig:a", 2, 11))
    seen = next_change(first)
    first.cancel()

    # Changes while the watcher is away, one of another tenant.
    config.feed(change("tenantconfig:b", 1, 12), change("tenantconfig:c", 1, 13, tenant="globex"))
    config.feed(change("tenantconfig:a", 3, 14))

    resumed = watch(stub, token(), since=seen.position)
    received = [next(resumed) for _ in range(4)]
    assert [kind(m) for m in received] == ["change", "change", "change", "progress"]
    # The change at since itself comes again (harmless), then what the watcher missed.
    assert [(m.change.key, m.change.version) for m in received[:3]] == [
        ("tenantconfig:a", 2),
        ("tenantconfig:b", 1),
        ("tenantconfig:a", 3),
    ]
    assert received[3].progress.position == 14
    assert position == 10
    config.feed(change("tenantconfig:d", 1, 15))
    assert next_change(resumed).key == "tenantconfig:d"
    resumed.cancel()


def test_since_older_than_the_history_gets_a_resync_and_the_stream_ends() -> None:
    with running(history_size=3) as config:
        config.start_ready(change("tenantconfig:a", 1, 5))
        config.feed(*(change(f"tenantconfig:k{i}", 1, 10 + i) for i in range(6)))
        call = watch(config.stub(), token(), since=6)

        message = next(call)
        assert kind(message) == "resync"
        assert message.resync.reason == pb.Resync.HISTORY_TOO_SHORT
        assert message.resync.oldest_position == 13
        with pytest.raises(StopIteration):
            next(call)
        assert call.code() == grpc.StatusCode.OK

        resumed = watch(config.stub(), token(), since=13)
        assert [next_change(resumed).position for _ in range(3)] == [13, 14, 15]
        resumed.cancel()


def test_progress_messages_carry_the_position_and_the_growing_source_lag() -> None:
    with running(progress_interval_seconds=0.2) as config:
        config.start_ready(change("tenantconfig:a", 1, 40), lag_ms=1_500)
        call = watch(config.stub(), token(), "paramconfig:")
        snapshot_of(call)
        config.feed(change("tenantconfig:b", 1, 41))

        progress = [next(call) for _ in range(3)]
        assert [kind(m) for m in progress] == ["progress"] * 3
        assert progress[-1].progress.position == 41
        lags = [m.progress.source_lag_ms for m in progress]
        assert lags[0] >= 1_500 and lags == sorted(lags)
        assert abs(progress[-1].progress.at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 60
        call.cancel()


def test_a_stream_ends_cleanly_at_its_lifetime_and_resumes_without_a_gap() -> None:
    with running(stream_lifetime_seconds=0.5, stream_lifetime_jitter=0.0) as config:
        config.start_ready(change("tenantconfig:a", 1, 50))
        stub = config.stub()
        call = watch(stub, token())
        snapshot_of(call)
        config.feed(change("tenantconfig:a", 2, 51))
        assert next_change(call).position == 51

        last = next(call)
        assert kind(last) == "progress" and last.progress.position == 51
        with pytest.raises(StopIteration):
            next(call)
        assert call.code() == grpc.StatusCode.OK

        config.feed(change("tenantconfig:b", 1, 52))
        resumed = watch(stub, token(), since=last.progress.position)
        assert [(c.key, c.position) for c in (next_change(resumed), next_change(resumed))] == [
            ("tenantconfig:a", 51),
            ("tenantconfig:b", 52),
        ]
        resumed.cancel()


def test_a_replicating_watch_spans_every_tenant_and_a_plain_one_its_own(config: Running) -> None:
    config.start_ready(change("tenantconfig:a", 1, 1, tenant="acme"), change("tenantconfig:a", 1, 2, tenant="globex"))
    stub = config.stub()
    replica = watch(stub, token("replicator", scope="config:replicate"), "tenantconfig:")
    plain = watch(stub, token("acme"), "tenantconfig:")

    entries, _ = snapshot_of(replica)
    assert sorted((e.tenant, e.key) for e in entries) == [("acme", "tenantconfig:a"), ("globex", "tenantconfig:a")]
    plain_entries, _ = snapshot_of(plain)
    assert [(e.tenant, e.key) for e in plain_entries] == [("acme", "tenantconfig:a")]

    config.feed(change("tenantconfig:b", 1, 3, tenant="globex"), change("tenantconfig:b", 1, 4, tenant="acme"))
    assert [(c.tenant, c.position) for c in (next_change(replica), next_change(replica))] == [
        ("globex", 3),
        ("acme", 4),
    ]
    assert (next_change(plain).tenant, 4) == ("acme", 4)

    # The replicate scope is for watching: reads still need config:read.
    denied = code_of(
        lambda: stub.Get(pb.GetRequest(key="tenantconfig:a"), metadata=bearer(token(scope="config:replicate")))
    )
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    replica.cancel()
    plain.cancel()


# -- slow watchers -----------------------------------------------------------------------

BIG = "x" * 60_000


def test_a_watcher_that_stops_reading_is_cut_with_a_resync_and_others_get_everything() -> None:
    with running(watcher_queue_size=5, cut_grace_seconds=60) as config:
        config.start_ready()
        # Its own connection, without BDP probing: a small receive window fills sooner.
        slow = watch(pb_grpc.ConfigServiceStub(config.channel(("grpc.http2.bdp_probe", 0))), token(), "tenantconfig:")
        snapshot_of(slow)
        fast = watch(config.stub(), token(), "tenantconfig:")
        snapshot_of(fast)
        received: list[int] = []

        def read_fast() -> None:
            with contextlib.suppress(grpc.RpcError):
                while True:
                    received.append(next_change(fast).position)

        reader = threading.Thread(target=read_fast)
        reader.start()

        def feed(position: int, value: str) -> None:
            config.feed(change(f"tenantconfig:k{position % 50}", position, position, value))
            # The fast watcher keeps up (its queue never fills), the slow one does not read.
            wait_for(lambda: received and received[-1] == position, what=f"fast watcher at {position}")

        position = 100
        while not config.on_loop(lambda: config.server.stats.cuts["grpc"]):
            position += 1
            feed(position, BIG)
            assert position < 2_000, "the slow watcher was never cut"
        # The cut watcher no longer queues anything: its memory is bounded.
        assert config.on_loop(config.server.state.watcher_count) == 1
        for _ in range(20):
            position += 1
            feed(position, "small")
        assert received == list(range(101, position + 1))

        # Once the slow client reads again it gets what was in flight, then the resync.
        messages = list(slow)
        assert kind(messages[-1]) == "resync"
        assert messages[-1].resync.reason == pb.Resync.TOO_SLOW
        assert all(kind(m) == "change" for m in messages[:-1])
        assert slow.code() == grpc.StatusCode.OK
        fast.cancel()
        reader.join(10)


def test_a_cut_watcher_that_never_reads_loses_its_stream_after_the_grace_period() -> None:
    with running(watcher_queue_size=5, cut_grace_seconds=0.3, max_streams_per_tenant=1) as config:
        config.start_ready()
        stub = config.stub()
        stuck = watch(pb_grpc.ConfigServiceStub(config.channel(("grpc.http2.bdp_probe", 0))), token(), "tenantconfig:")
        snapshot_of(stuck)

        position = 100
        while not config.on_loop(lambda: config.server.stats.cuts["grpc"]):
            position += 1
            config.feed(change(f"tenantconfig:k{position % 50}", position, position, BIG))
            assert position < 2_000, "the stuck watcher was never cut"
        wait_for(lambda: config.on_loop(lambda: config.server.stats.interrupted["grpc"]), what="interrupted")
        # Its slot is free again although the client never read.
        wait_for(lambda: config.on_loop(lambda: config.server.stats.open["grpc"]) == 0, what="stream closed")
        again = watch(stub, token(), "tenantconfig:")
        assert kind(next(again)) == "snapshot"
        again.cancel()

        with pytest.raises(grpc.RpcError) as ended:
            list(stuck)
        assert ended.value.code() == grpc.StatusCode.ABORTED


# -- hostile input -----------------------------------------------------------------------


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("Basic YWNtZTpwYXNz", grpc.StatusCode.UNAUTHENTICATED),
        ("Bearer ", grpc.StatusCode.UNAUTHENTICATED),
        ("Bearer not.a.jwt", grpc.StatusCode.UNAUTHENTICATED),
        (f"Bearer {token(ttl_seconds=-3_600)}", grpc.StatusCode.UNAUTHENTICATED),
        (
            f"Bearer {issue_dev_token(OTHER_SECRET, tenant='acme', scope='config:read', now=time.time())}",
            UNAUTHENTICATED,
        ),
        (f"Bearer {token(audience='someone-else')}", grpc.StatusCode.UNAUTHENTICATED),
        (
            "Bearer "
            + unsigned({"sub": "x", "tenant_id": "acme", "scope": "config:read", "aud": "tagbus", "exp": 2**40}),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (f"Bearer {token(scope='events:write')}", grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["missing", "not-bearer", "empty", "malformed", "expired", "bad-signature", "audience", "alg-none", "scope"],
)
def test_tokens_that_do_not_verify_are_refused_on_every_method(
    config: Running, authorization: str | None, expected: grpc.StatusCode
) -> None:
    config.start_ready(change("tenantconfig:a", 1, 1))
    stub = config.stub()
    metadata = (("authorization", authorization),) if authorization is not None else ()

    assert code_of(lambda: stub.Get(pb.GetRequest(key="tenantconfig:a"), metadata=metadata)) == expected
    assert code_of(lambda: stub.List(pb.ListRequest(), metadata=metadata)) == expected
    call = stub.Watch(pb.WatchRequest(prefixes=[""]), metadata=metadata, timeout=10)
    assert code_of(lambda: next(iter(call))) == expected
    # httpx refuses a header value with trailing whitespace: "Bearer" is the empty case there.
    headers = {"authorization": authorization.rstrip()} if authorization is not None else {}
    refused = httpx.get(f"{config.http}/v1/config:watch", headers=headers)
    assert refused.status_code == (401 if expected == grpc.StatusCode.UNAUTHENTICATED else 403)
    assert refused.headers["content-type"] == "application/problem+json"


def test_malformed_keys_prefixes_and_pages_are_invalid_arguments(config: Running) -> None:
    config.start_ready(change("tenantconfig:a", 1, 1))
    stub = config.stub()
    acme = bearer(token())

    def get(key: str) -> grpc.StatusCode:
        return code_of(lambda: stub.Get(pb.GetRequest(key=key), metadata=acme))

    def list_(**request: Any) -> grpc.StatusCode:
        return code_of(lambda: stub.List(pb.ListRequest(**request), metadata=acme))

    def watch_(*prefixes: str, since: int | None = None) -> grpc.StatusCode:
        call = stub.Watch(pb.WatchRequest(prefixes=list(prefixes), since=since), metadata=acme, timeout=10)
        return code_of(lambda: next(iter(call)))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for key in (
        "no-colon",
        "unknown:a",
        "tenantconfig:",
        "tenantconfig:a//b",
        "tenantconfig:\x00",
        "tenantconfig:" + "a" * 600,
    ):
        assert get(key) == invalid, key
    for prefix in ("unknown:", "tenantconfig:a b", "x" * 10_000, "tenantconfig:\n"):
        assert list_(prefix=prefix) == invalid, prefix
        assert watch_(prefix) == invalid, prefix
    assert list_(page_size=5_000) == invalid
    assert list_(page_token="not a key") == invalid
    assert watch_() == invalid
    assert watch_(*(f"tenantconfig:p{i}" for i in range(17))) == invalid
    with pytest.raises(grpc.RpcError) as raised:
        stub.List(pb.ListRequest(prefix="unknown:"), metadata=acme)
    assert "unknown:" in str(raised.value.details())
    # A request larger than any valid one is refused before it is parsed.
    assert get("tenantconfig:" + "a" * 300_000) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server still answers.
    assert stub.Get(pb.GetRequest(key="tenantconfig:a"), metadata=acme).entry.version == 1


def test_a_tenant_past_its_stream_limit_is_refused_and_others_are_not() -> None:
    with running(max_streams_per_tenant=2) as config:
        config.start_ready(change("tenantconfig:a", 1, 1), change("tenantconfig:a", 1, 2, tenant="globex"))
        stub = config.stub()
        open_ = [watch(stub, token("acme")) for _ in range(2)]
        for call in open_:
            snapshot_of(call)

        third = watch(stub, token("acme"))
        assert code_of(lambda: next(third)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        sse = httpx.get(f"{config.http}/v1/config:watch", headers={"authorization": f"Bearer {token('acme')}"})
        assert sse.status_code == 429 and sse.headers["content-type"] == "application/problem+json"

        other = watch(stub, token("globex"))
        entries, _ = snapshot_of(other)
        assert [e.tenant for e in entries] == ["globex"]
        config.feed(change("tenantconfig:b", 1, 3, tenant="globex"))
        assert next_change(other).position == 3

        open_[0].cancel()
        wait_for(lambda: config.on_loop(lambda: config.server.stats.open["grpc"]) == 2, what="slot released")
        again = watch(stub, token("acme"))
        snapshot_of(again)
        for call in (open_[1], other, again):
            call.cancel()


def test_keys_that_cannot_be_fetched_are_unavailable_not_unauthenticated() -> None:
    keys = SigningKeys()
    # Nothing listens on port 9 of the loopback: the JWKS fetch is refused.
    verifier = TokenVerifier(AuthSettings(jwks_url="http://127.0.0.1:9/jwks.json", issuer=ISSUER, audience=AUDIENCE))
    with running(verifier=verifier) as config:
        config.start_ready()
        rs256 = sign(claims("acme", scope="config:read"), keys.rsa, "RS256", keys.rsa_kid)
        stub = config.stub()
        assert code_of(lambda: stub.List(pb.ListRequest(), metadata=bearer(rs256))) == grpc.StatusCode.UNAVAILABLE
        refused = httpx.get(f"{config.http}/v1/config:watch", headers={"authorization": f"Bearer {rs256}"})
        assert refused.status_code == 503 and "retry-after" in refused.headers


# -- Server-Sent Events ------------------------------------------------------------------


@dataclass
class Event:
    name: str
    id: str | None
    data: Any


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """Events of a ``text/event-stream`` response; comments are skipped."""
    name, id_, data = "message", None, list[str]()
    for line in response.iter_lines():
        if line == "":
            if data:
                yield Event(name, id_, json.loads("\n".join(data)))
            name, id_, data = "message", None, list[str]()
        elif line.startswith(":"):
            continue
        else:
            field_, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field_ == "event":
                name = value
            elif field_ == "id":
                id_ = value
            elif field_ == "data":
                data.append(value)


@contextmanager
def sse_watch(
    config: Running, value: str, *, params: Any = None, headers: dict[str, str] | None = None
) -> Iterator[httpx.Response]:
    with (
        httpx.Client(timeout=httpx.Timeout(30, connect=5)) as client,
        client.stream(
            "GET",
            f"{config.http}/v1/config:watch",
            params=params,
            headers={"authorization": f"Bearer {value}", **(headers or {})},
        ) as response,
    ):
        yield response


def test_sse_streams_the_snapshot_and_changes_and_resumes_with_last_event_id(config: Running) -> None:
    config.start_ready(
        change("tenantconfig:features/a", 1, 10, {"n": 1}),
        change("tenantconfig:features/b", 1, 11, [1, 2]),
        change("tenantconfig:features/a", 1, 12, "other", tenant="globex"),
    )
    with sse_watch(config, token(), params={"prefix": "tenantconfig:features/"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        snapshot = next(events)
        assert (snapshot.name, snapshot.id) == ("snapshot", "12")
        assert snapshot.data["done"] is True and snapshot.data["position"] == 12
        assert [(e["key"], e["value"], e["tenant"]) for e in snapshot.data["entries"]] == [
            ("tenantconfig:features/a", {"n": 1}, "acme"),
            ("tenantconfig:features/b", [1, 2], "acme"),
        ]
        config.feed(change("tenantconfig:features/a", 2, 13, {"n": 2}))
        config.feed(change("tenantconfig:features/b", 2, 14, deleted=True))
        set_ = next(events)
        assert (set_.name, set_.id) == ("set", "13")
        assert set_.data == {
            "key": "tenantconfig:features/a",
            "value": {"n": 2},
            "version": 2,
            "position": 13,
            "updated_at": "2024-05-01T12:00:00Z",
            "tenant": "acme",
        }
        deleted = next(events)
        assert (deleted.name, deleted.id) == ("delete", "14")
        assert "value" not in deleted.data and deleted.data["version"] == 2
        last_id = deleted.id

    config.feed(change("tenantconfig:features/c", 1, 15, True), change("tenantconfig:other", 1, 16, 0))
    with sse_watch(
        config, token(), params={"prefix": "tenantconfig:features/"}, headers={"Last-Event-ID": str(last_id)}
    ) as response:
        events = sse_events(response)
        resumed = [next(events) for _ in range(3)]
        assert [(e.name, e.id) for e in resumed] == [("delete", "14"), ("set", "15"), ("progress", "16")]

    # ``since`` wins over Last-Event-ID.
    with sse_watch(config, token(), params={"since": "14"}, headers={"Last-Event-ID": "junk"}) as response:
        events = sse_events(response)
        assert [next(events).id for _ in range(4)] == ["14", "15", "16", "16"]


def test_sse_resync_clears_the_event_id_and_ends_the_stream() -> None:
    with running(history_size=2) as config:
        config.start_ready(change("tenantconfig:a", 1, 1))
        config.feed(*(change(f"tenantconfig:k{i}", 1, 10 + i) for i in range(4)))
        with sse_watch(config, token(), params={"since": "2"}) as response:
            body = response.read().decode()
        assert body.startswith("event: resync\nid:\ndata: ")
        data = json.loads(body.split("data: ", 1)[1])
        assert data["reason"] == "HISTORY_TOO_SHORT" and data["oldest_position"] == 12


def test_sse_sends_comment_keepalives_and_progress_on_a_quiet_stream() -> None:
    with running(sse_keepalive_seconds=0.1, progress_interval_seconds=0.5) as config:
        config.start_ready(change("tenantconfig:a", 1, 5))
        with sse_watch(config, token()) as response:
            lines = response.iter_lines()
            seen: list[str] = []
            while "event: progress" not in seen:
                seen.append(next(lines))
        assert ": keepalive" in seen


def test_an_sse_watcher_that_stops_reading_is_cut_and_its_connection_closed() -> None:
    with running(watcher_queue_size=5, cut_grace_seconds=0.3, max_streams_per_tenant=1) as config:
        config.start_ready()
        with sse_watch(config, token(), params={"prefix": "tenantconfig:"}) as stuck:
            events = sse_events(stuck)
            assert next(events).name == "snapshot"

            position = 100
            while not config.on_loop(lambda: config.server.stats.cuts["sse"]):
                position += 1
                config.feed(change(f"tenantconfig:k{position % 50}", position, position, BIG))
                assert position < 2_000, "the stuck watcher was never cut"
            wait_for(lambda: config.on_loop(lambda: config.server.stats.open["sse"]) == 0, what="stream closed")
            assert config.on_loop(lambda: config.server.stats.interrupted["sse"]) == 1
            # The tenant's one stream slot is free again.
            with sse_watch(config, token()) as again:
                assert again.status_code == 200

            # What was in flight arrives, then the connection ends without a clean end of stream.
            with pytest.raises(httpx.RemoteProtocolError):
                for event in events:
                    assert event.name == "set"


def test_sse_refusals_are_problem_details_before_the_stream(config: Running) -> None:
    url = f"{config.http}/v1/config:watch"
    auth = {"authorization": f"Bearer {token()}"}
    not_ready = httpx.get(url, headers=auth)
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
    config.start_ready()

    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["type"].endswith("/unauthorized")
    for params in (
        {"prefix": "unknown:"},
        {"since": "-1"},
        {"since": "1e3"},
        {"since": str(2**64)},
        {"prefix": "a" * 600},
    ):
        bad = httpx.get(url, params=params, headers=auth)
        assert bad.status_code == 422, params
        assert bad.headers["content-type"] == "application/problem+json"
    bad_id = httpx.get(url, headers={**auth, "Last-Event-ID": "abc"})
    assert bad_id.status_code == 422 and "Last-Event-ID" in bad_id.json()["detail"]


def test_metrics_count_streams_deliveries_and_resyncs(config: Running) -> None:
    config.start_ready(change("tenantconfig:a", 1, 1))
    call = watch(config.stub(), token())
    snapshot_of(call)
    config.feed(change("tenantconfig:a", 2, 2))
    next_change(call)

    text = httpx.get(f"{config.http}/metrics").text
    assert 'config_server_streams_open{protocol="grpc"} 1.0' in text
    assert 'config_server_deliveries_total{protocol="grpc"} 1.0' in text
    assert "config_server_position 2.0" in text
    assert "config_server_ready 1.0" in text
    call.cancel()


def test_stop_ends_open_streams_cleanly_after_a_progress() -> None:
    with running() as config:
        config.start_ready(change("tenantconfig:a", 1, 9))
        call = watch(config.stub(), token())
        snapshot_of(call)
        stopping: Future[None] = asyncio.run_coroutine_threadsafe(config.server.stop(5.0), config.loop)
        last = next(call)
        assert kind(last) == "progress" and last.progress.position == 9
        with pytest.raises(StopIteration):
            next(call)
        stopping.result(15)


# -- the process entry point ---------------------------------------------------------------

RUN_SCRIPT = """
import logging, sys
from config_server.server import run
from config_server.settings import ConfigServerSettings
from kernel.auth import AuthSettings, TokenVerifier

class Source:
    def run(self, sink, stop):
        sink.caught_up(lag_ms=0)
        if sys.argv[1] == "serve":
            stop.wait()

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
settings = ConfigServerSettings(grpc_port=0, http_port=0)
verifier = TokenVerifier(AuthSettings(jwt_secret="a-secret-only-this-child-process-knows"))
sys.exit(run(settings, source=Source(), verifier=verifier, tags={"tenantconfig"}))
"""


@contextmanager
def server_process(mode: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    """``run()`` in a child process with a source that catches up and then waits (``serve``) or returns."""
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, mode], stderr=subprocess.PIPE, text=True, cwd=str(_ROOT)
    ) as process:
        stderr = process.stderr
        assert stderr is not None

        def read() -> None:
            for line in stderr:
                lines.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield process, lines
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            reader.join(10)


def ports_of(lines: queue.Queue[str]) -> tuple[int, int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        found = re.search(r"gRPC on [^ ]+:(\d+), HTTP on [^ ]+:(\d+)", line)
        if found:
            return int(found[1]), int(found[2])
    raise AssertionError("the server did not log its ports")


def test_run_serves_until_sigterm_and_exits_cleanly() -> None:
    with server_process("serve") as (process, lines):
        grpc_port, http_port = ports_of(lines)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200, what="ready")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_run_exits_with_an_error_when_the_source_stops_on_its_own() -> None:
    with server_process("return") as (process, _):
        assert process.wait(30) == 1
