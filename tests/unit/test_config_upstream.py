"""The upstream change source (chaining) over real gRPC, against a scripted upstream in this process.

Each ``Watch`` the upstream receives is answered by the next script in its queue; the test
sees every request (``since``, prefixes) and the token it carried. No emulators.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from config_api.v1 import config_pb2 as pb
from config_api.v1 import config_pb2_grpc
from config_server.upstream import TokenUnavailable, UpstreamChangeSource, UpstreamRefused, UpstreamUnavailable
from kernel.retry import Backoff, Jitter
from projections.model import ConfigChange, ConfigKey
from tests.fixtures.change_sink import RecordingSink

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WAIT = 20.0

Script = Callable[[pb.WatchRequest, grpc.ServicerContext], Iterator[pb.WatchResponse]]


def stamp(seconds: int) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(T0 + timedelta(seconds=seconds))
    return t


def entry(tenant: str, key: str, version: int, value: Any, position: int) -> pb.Entry:
    return pb.Entry(
        tenant=tenant,
        key=key,
        value_json=orjson.dumps(value).decode(),
        version=version,
        position=position,
        updated_at=stamp(version),
    )


def snapshot(position: int, *entries: pb.Entry, done: bool = True) -> pb.WatchResponse:
    return pb.WatchResponse(snapshot=pb.Snapshot(entries=list(entries), position=position, done=done))


def set_change(tenant: str, key: str, version: int, value: Any, position: int) -> pb.WatchResponse:
    return pb.WatchResponse(
        change=pb.Change(
            kind=pb.Change.SET,
            tenant=tenant,
            key=key,
            value_json=orjson.dumps(value).decode(),
            version=version,
            position=position,
            updated_at=stamp(version),
        )
    )


def delete_change(tenant: str, key: str, version: int, position: int) -> pb.WatchResponse:
    return pb.WatchResponse(
        change=pb.Change(
            kind=pb.Change.DELETE, tenant=tenant, key=key, version=version, position=position, updated_at=stamp(version)
        )
    )


def progress(position: int, lag_ms: int) -> pb.WatchResponse:
    return pb.WatchResponse(progress=pb.Progress(position=position, at=stamp(0), source_lag_ms=lag_ms))


def resync() -> pb.WatchResponse:
    return pb.WatchResponse(resync=pb.Resync(reason=pb.Resync.HISTORY_TOO_SHORT, oldest_position=90, detail="gone"))


def change(tenant: str, key: str, version: int, value: Any, position: int, *, deleted: bool = False) -> ConfigChange:
    return ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse(key),
        value=None if deleted else value,
        version=version,
        position=position,
        updated_at=T0 + timedelta(seconds=version),
        deleted=deleted,
    )


def stream(*messages: pb.WatchResponse, then: str = "hold") -> Script:
    """Send ``messages``, then ``hold`` the stream open until the client leaves, ``end`` it
    cleanly, or fail it with UNAVAILABLE (``unavailable``)."""

    def script(request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        yield from messages
        if then == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "upstream going away")
        if then == "hold":
            left = threading.Event()
            context.add_callback(left.set)
            left.wait(WAIT)

    return script


def refuse(code: grpc.StatusCode) -> Script:
    def script(request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        context.abort(code, "no")
        yield from ()

    return script


@dataclass
class ScriptedUpstream(config_pb2_grpc.ConfigServiceServicer):
    scripts: queue.Queue[Script] = field(default_factory=queue.Queue)
    requests: list[tuple[pb.WatchRequest, str]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        metadata = dict(context.invocation_metadata())
        with self.arrived:
            self.requests.append((request, str(metadata.get("authorization", ""))))
            self.arrived.notify_all()
        try:
            script = self.scripts.get_nowait()
        except queue.Empty:
            script = stream(then="hold")
        yield from script(request, context)

    def Get(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    def List(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    def wait_requests(self, n: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= n, WAIT), (
                f"{len(self.requests)} watches, not {n}"
            )


@pytest.fixture
def upstream() -> Iterator[tuple[ScriptedUpstream, str]]:
    servicer = ScriptedUpstream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    config_pb2_grpc.add_ConfigServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


class RecordingStop(threading.Event):
    """The caller's stop event, noting how long the source asked to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.long_wait = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout > 1.0:
            self.waits.append(timeout)
            self.long_wait.set()
        return super().wait(timeout)


@dataclass
class Running:
    source: UpstreamChangeSource
    sink: RecordingSink
    stop: RecordingStop
    thread: threading.Thread


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    runs: list[Running] = []

    def begin(target: str, token: Callable[[], str] = lambda: "tok", **options: Any) -> Running:
        options.setdefault("backoff", Backoff(base=0.01, cap=0.05, jitter=Jitter.FULL))
        source = UpstreamChangeSource(target, token, **options)
        sink, stop = RecordingSink(), RecordingStop()
        thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
        thread.start()
        runs.append(Running(source, sink, stop, thread))
        return runs[-1]

    yield begin
    for run in runs:
        run.stop.set()
    for run in runs:
        run.thread.join(WAIT)
        assert not run.thread.is_alive(), "the source did not stop"


def test_snapshot_changes_and_progress_reach_the_sink(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    servicer.scripts.put(
        stream(
            snapshot(100, entry("acme", "tenantconfig:a", 1, "x", 50), done=False),
            snapshot(100, entry("globex", "paramconfig:p/q", 3, {"n": 1}, 100)),
            set_change("acme", "tenantconfig:a", 2, [1, 2.5], 110),
            delete_change("globex", "paramconfig:p/q", 4, 120),
            progress(120, 250),
        )
    )
    run = start(target)
    run.sink.wait_for(lambda s: len(s.caught_up_lags) >= 2, timeout=WAIT, what="snapshot and progress")
    assert run.sink.calls[:5] == ["load", "load", "caught_up", "apply", "apply"]
    assert run.sink.loads[0] == [change("acme", "tenantconfig:a", 1, "x", 50)]
    assert run.sink.applied == [
        [change("acme", "tenantconfig:a", 2, [1, 2.5], 110)],
        [change("globex", "paramconfig:p/q", 4, None, 120, deleted=True)],
    ]
    assert run.sink.caught_up_lags == [0, 250]
    request, authorization = servicer.requests[0]
    assert list(request.prefixes) == [""] and not request.HasField("since")
    assert authorization == "Bearer tok"
    assert run.source.position == 120


def test_a_disconnect_resumes_from_the_last_position_with_a_fresh_token(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    servicer.scripts.put(
        stream(
            snapshot(100, entry("acme", "tenantconfig:a", 1, "x", 100)),
            set_change("acme", "tenantconfig:a", 2, "y", 130),
            then="unavailable",
        )
    )
    servicer.scripts.put(stream(set_change("acme", "tenantconfig:a", 3, "z", 140), then="end"))
    servicer.scripts.put(stream(progress(150, 0)))
    tokens = iter(f"tok-{n}" for n in range(100))
    run = start(target, token=lambda: next(tokens), stable_after=60.0)
    run.sink.wait_for(lambda s: len(s.caught_up_lags) >= 2, timeout=WAIT, what="the third watch's progress")
    servicer.wait_requests(3)
    sinces = [r.since if r.HasField("since") else None for r, _ in servicer.requests]
    assert sinces == [None, 130, 140]
    assert [token for _, token in servicer.requests] == ["Bearer tok-0", "Bearer tok-1", "Bearer tok-2"]
    assert [type(e) for e in run.sink.failures] == [UpstreamUnavailable]
    assert run.sink.state[("acme", "tenantconfig:a")].value == "z"


def test_resync_watches_again_for_a_snapshot_and_infers_the_deletes_of_the_gap(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    servicer.scripts.put(
        stream(
            snapshot(
                100,
                entry("acme", "tenantconfig:kept", 1, "k", 60),
                entry("acme", "tenantconfig:gone", 4, "g", 70),
                entry("acme", "tenantconfig:updated", 1, "u", 80),
            ),
            set_change("acme", "tenantconfig:late", 1, "l", 300),
            then="unavailable",
        )
    )
    # Resumed past the history: resync. The next upstream is behind (snapshot at 200): it
    # lacks "late" (position 300) because it has not got there yet, not because it was deleted.
    servicer.scripts.put(stream(resync()))
    servicer.scripts.put(
        stream(
            snapshot(
                200,
                entry("acme", "tenantconfig:kept", 1, "k", 60),
                entry("acme", "tenantconfig:updated", 2, "u2", 150),
            )
        )
    )
    run = start(target)
    servicer.wait_requests(3)
    run.sink.wait_for(lambda s: len(s.caught_up_lags) >= 2, timeout=WAIT, what="the second snapshot")
    sinces = [r.since if r.HasField("since") else None for r, _ in servicer.requests]
    assert sinces == [None, 300, None]
    assert run.source.stats.resyncs == 1 and run.source.stats.inferred_deletes == 1
    state = run.sink.state
    assert state[("acme", "tenantconfig:gone")].deleted
    assert (state[("acme", "tenantconfig:gone")].version, state[("acme", "tenantconfig:gone")].position) == (5, 200)
    assert state[("acme", "tenantconfig:updated")].value == "u2"
    assert not state[("acme", "tenantconfig:late")].deleted
    assert not state[("acme", "tenantconfig:kept")].deleted


def test_a_refused_token_is_reported_and_backed_off_long_not_retried_in_a_loop(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    servicer.scripts.put(refuse(grpc.StatusCode.PERMISSION_DENIED))
    run = start(target, refused_backoff=300.0)
    run.sink.wait_for(lambda s: bool(s.failures), timeout=WAIT, what="the refusal")
    failure = run.sink.failures[0]
    assert isinstance(failure, UpstreamRefused) and failure.code is grpc.StatusCode.PERMISSION_DENIED
    # The source is now waiting on the caller's stop event for the long backoff, jittered.
    assert run.stop.long_wait.wait(WAIT)
    assert 150.0 <= run.stop.waits[0] <= 300.0
    assert len(servicer.requests) == 1 and run.source.stats.refusals == 1


def test_a_failing_token_callable_is_reported_and_retried(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    attempts = iter(range(100))

    def token() -> str:
        if next(attempts) < 2:
            raise OSError("token service down")
        return "tok"

    servicer.scripts.put(stream(snapshot(10)))
    run = start(target, token=token)
    run.sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=WAIT, what="the snapshot")
    assert [type(e) for e in run.sink.failures] == [TokenUnavailable, TokenUnavailable]
    assert len(servicer.requests) == 1


def test_a_silent_stream_is_cut_and_resumed(
    upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]
) -> None:
    servicer, target = upstream
    servicer.scripts.put(stream(snapshot(100, entry("acme", "tenantconfig:a", 1, "x", 100))))  # then silence
    servicer.scripts.put(stream(set_change("acme", "tenantconfig:a", 2, "y", 110)))
    run = start(target, idle_timeout=0.3)
    run.sink.wait_for(lambda s: bool(s.applied), timeout=WAIT, what="the change after reconnecting")
    assert isinstance(run.sink.failures[0], UpstreamUnavailable)
    assert "no message" in str(run.sink.failures[0])
    assert servicer.requests[1][0].since == 100


def test_an_unreachable_upstream_is_retried_and_stop_ends_the_source(start: Callable[..., Running]) -> None:
    from devtools.ports import free_port

    run = start(f"127.0.0.1:{free_port()}")
    run.sink.wait_for(lambda s: len(s.failures) >= 3, timeout=WAIT, what="three failed attempts")
    assert all(isinstance(e, UpstreamUnavailable) for e in run.sink.failures)
    run.stop.set()
    run.thread.join(WAIT)
    assert not run.thread.is_alive()


def test_stop_ends_a_stream_in_flight(upstream: tuple[ScriptedUpstream, str], start: Callable[..., Running]) -> None:
    servicer, target = upstream
    servicer.scripts.put(stream(snapshot(10)))  # held open by the upstream
    run = start(target)
    run.sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=WAIT, what="the snapshot")
    run.stop.set()
    run.thread.join(WAIT)
    assert not run.thread.is_alive()
    assert run.sink.failures == []
