"""The keeper: reviving dead parts, renewing the stream when it is due, reading the tailer's counters.

The stack is not touched: ``stack.status`` and ``lifecycle.up`` are replaced by fakes that
keep the parts' state in a dict, the clocks are fakes, and the stack's state lives in
``tmp_path`` (pid files included).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from devtools.ports import free_port
from tagbus import generations, keeper, lifecycle, stack, stack_lock
from tagbus.generations import Generation, RenewalError, RotationPolicy
from tagbus.keeper import Keeper, KeeperSettings, TailerReading, read_tailer
from tagbus.settings import Settings, load
from tailer.metrics import TailerMetrics

REVIVE_AFTER = 10.0


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeStack:
    """Which parts run; ``up`` starts them (or fails, as told) and records when it was asked."""

    def __init__(self, cfg: stack.StackConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.running = dict.fromkeys(stack.ALL_PARTS, True)
        self.failing: set[str] = set()
        self.started: list[tuple[float, list[str]]] = []

    def status(self, config: stack.StackConfig | None = None) -> dict[str, stack.PartStatus]:
        assert config == self.cfg
        return {
            name: stack.PartStatus(name=name, running=up, pid=4242 if up else None, log=self.cfg.log_file(name))
            for name, up in self.running.items()
        }

    def up(
        self, config: stack.StackConfig | None = None, parts: Sequence[str] | None = None
    ) -> dict[str, stack.PartStatus]:
        assert config == self.cfg and parts is not None
        self.started.append((self.clock.now, list(parts)))
        for name in parts:
            if name in self.failing:
                raise stack.PartStartError(name, self.cfg.log_file(name), "exited during start")
            self.running[name] = True
        return self.status(config)

    def die(self, name: str) -> None:
        """The part's process is gone and its pid file left behind, as after a crash."""
        self.running[name] = False
        self.cfg.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        self.cfg.pid_file(name).write_text("4242\n")

    def stop(self, name: str) -> None:
        """Stopped by ``tagbus down``: no process, no pid file."""
        self.running[name] = False
        self.cfg.pid_file(name).unlink(missing_ok=True)


@pytest.fixture
def cfg(tmp_path: Path) -> stack.StackConfig:
    return stack.StackConfig(root=tmp_path)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load({}, home=tmp_path / "home")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake_stack(monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, clock: Clock) -> FakeStack:
    fake = FakeStack(cfg, clock)
    monkeypatch.setattr(stack, "status", fake.status)
    monkeypatch.setattr(lifecycle, "up", fake.up)
    return fake


def make_keeper(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, wall: Clock | None = None, **options: Any
) -> Keeper:
    return Keeper(
        cfg, settings, KeeperSettings(revive_after=REVIVE_AFTER, **options), clock=clock, wall_clock=wall or clock
    )


def revive_until(k: Keeper, clock: Clock, until: float, step: float = 0.5) -> None:
    while clock.now <= until:
        k.revive()
        clock.now += step


# -- revive ----------------------------------------------------------------------------------


def test_a_dead_part_is_started_again_once_dead_for_revive_after(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    clock.now = 100.0
    fake_stack.die("tailer")
    assert k.revive() == []  # first seen dead now
    clock.now = 100.0 + REVIVE_AFTER - 0.1
    assert k.revive() == []
    assert fake_stack.started == []
    clock.now = 100.0 + REVIVE_AFTER
    assert k.revive() == ["tailer"]
    assert fake_stack.started == [(100.0 + REVIVE_AFTER, ["tailer"])]
    clock.now += 60.0
    assert k.revive() == []  # running again: left alone


def test_a_part_stopped_by_tagbus_down_is_never_started(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    fake_stack.stop("consumer")
    fake_stack.stop("bus")
    revive_until(k, clock, 30 * REVIVE_AFTER)
    assert fake_stack.started == []


def test_the_keeper_never_revives_itself(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    fake_stack.die("keeper")
    fake_stack.die("config")
    revive_until(k, clock, 30 * REVIVE_AFTER)
    assert [parts for _, parts in fake_stack.started] == [["config"]]


def test_a_part_back_before_revive_after_is_left_alone_and_its_next_death_waits_again(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    fake_stack.die("consumer")
    k.revive()
    clock.now = REVIVE_AFTER / 2
    fake_stack.running["consumer"] = True  # an operator's `tagbus up` went first
    assert k.revive() == []
    clock.now = REVIVE_AFTER
    fake_stack.die("consumer")
    assert k.revive() == []  # dead since now, not since the first death
    clock.now = 2 * REVIVE_AFTER
    assert k.revive() == ["consumer"]


def test_a_part_that_does_not_start_is_tried_again_with_growing_delays(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    fake_stack.die("bus")
    fake_stack.failing.add("bus")
    revive_until(k, clock, 8 * REVIVE_AFTER)
    attempts = [at for at, _ in fake_stack.started]
    # Dead for revive_after, then attempts the backoff spaces by revive_after, doubling.
    assert attempts == [REVIVE_AFTER, 2 * REVIVE_AFTER, 4 * REVIVE_AFTER, 8 * REVIVE_AFTER]

    fake_stack.failing.clear()
    clock.now = 16 * REVIVE_AFTER - 0.5
    assert k.revive() == []
    clock.now = 16 * REVIVE_AFTER
    assert k.revive() == ["bus"]
    clock.now += 1
    assert k.revive() == []  # seen running
    # A later death is counted from when it is seen, not from the first one.
    clock.now = 100 * REVIVE_AFTER
    fake_stack.die("bus")
    assert k.revive() == []
    clock.now += REVIVE_AFTER
    assert k.revive() == ["bus"]


def test_a_round_is_skipped_while_another_holds_the_stack_lock(
    cfg: stack.StackConfig, settings: Settings, clock: Clock, fake_stack: FakeStack
) -> None:
    k = make_keeper(cfg, settings, clock)
    fake_stack.die("tailer")
    clock.now = 10 * REVIVE_AFTER
    k.revive()  # seen dead long ago
    clock.now = 20 * REVIVE_AFTER
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:  # another thread is another holder, as `tagbus up` would be
        with stack_lock.held(cfg.run_dir):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(30)
        k.tick()
        assert fake_stack.started == []
    finally:
        release.set()
        holder.join(30)
    k.tick()
    assert [parts for _, parts in fake_stack.started] == [["tailer"]]


# -- renew_if_due ------------------------------------------------------------------------------

STREAM = "tagbus-events"
POLICY = RotationPolicy(max_records=1000, max_bytes=0)
IDLE = 30.0
NOW = 1_714_564_800.0


class Tailer:
    """What ``read_tailer`` answers, in turn; records the calls."""

    def __init__(self, *readings: TailerReading | None) -> None:
        self.readings = list(readings)
        self.calls: list[tuple[str, str]] = []

    def __call__(self, url: str, stream: str, *, timeout: float = 3.0) -> TailerReading | None:
        self.calls.append((url, stream))
        return self.readings.pop(0)


@pytest.fixture
def rotations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The calls to ``generations.rotate`` (which does nothing here)."""
    calls: list[dict[str, Any]] = []

    def rotate(cfg: stack.StackConfig, settings: Settings, **options: Any) -> Generation:
        calls.append({"cfg": cfg, "settings": settings, **options})
        return Generation()

    monkeypatch.setattr(generations, "rotate", rotate)
    return calls


def stream_keeper(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, tailer: Tailer
) -> Keeper:
    monkeypatch.setattr(keeper, "read_tailer", tailer)
    generations.generation_file(cfg).parent.mkdir(parents=True)
    return Keeper(
        cfg,
        settings,
        KeeperSettings(idle_before_rotation=IDLE, hard_factor=4.0, policy=POLICY),
        clock=Clock(),
        wall_clock=Clock(NOW),
    )


def saved(cfg: stack.StackConfig) -> Generation | None:
    return Generation.load(generations.generation_file(cfg))


def busy(records: float, size: float = 0.0) -> TailerReading:
    return TailerReading(records=records, bytes=size, last_publish=NOW - 1.0)


def test_renewal_counts_what_the_tailer_acknowledged_across_its_restarts(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, rotations: list[dict[str, Any]]
) -> None:
    tailer = Tailer(busy(100, 10_000), busy(250, 25_000), None, busy(40, 4_000))
    k = stream_keeper(monkeypatch, cfg, settings, tailer)
    for _ in range(4):
        assert k.renew_if_due() is False
    generation = saved(cfg)
    assert generation is not None
    # 250 before the restart, 40 after it; the round the tailer did not answer counted nothing.
    assert (generation.records, generation.bytes) == (290, 29_000)
    assert tailer.calls == [("http://127.0.0.1:9464/metrics", STREAM)] * 4
    assert rotations == []


def test_renewal_reads_the_tailer_on_its_metrics_port(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, tmp_path: Path, rotations: list[dict[str, Any]]
) -> None:
    settings = load({"TAGBUS_TAILER_METRICS_PORT": "19464", "TAGBUS_STREAM_NAME": "s"}, home=tmp_path / "home")
    tailer = Tailer(busy(1))
    stream_keeper(monkeypatch, cfg, settings, tailer).renew_if_due()
    assert tailer.calls == [("http://127.0.0.1:19464/metrics", "s")]


def test_renewal_does_nothing_without_kinesis_data(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, rotations: list[dict[str, Any]]
) -> None:
    tailer = Tailer(TailerReading(records=10**9, bytes=0.0, last_publish=0.0))
    monkeypatch.setattr(keeper, "read_tailer", tailer)
    k = Keeper(cfg, settings, KeeperSettings(policy=POLICY), clock=Clock(), wall_clock=Clock(NOW))
    assert k.renew_if_due() is False
    assert tailer.calls == [] and rotations == []
    assert not generations.generation_file(cfg).parent.exists()


def test_a_due_stream_is_renewed_once_the_tailer_is_idle(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, rotations: list[dict[str, Any]]
) -> None:
    quiet_since = NOW - IDLE
    tailer = Tailer(
        TailerReading(records=1000, bytes=0.0, last_publish=quiet_since + 0.5),  # idle, not long enough
        TailerReading(records=1000, bytes=0.0, last_publish=quiet_since),
    )
    k = stream_keeper(monkeypatch, cfg, settings, tailer)
    assert k.renew_if_due() is False
    assert rotations == []
    assert k.renew_if_due() is True
    assert [(call["cfg"], call["settings"]) for call in rotations] == [(cfg, settings)]


def test_a_stream_below_the_policy_is_not_renewed_however_idle(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, rotations: list[dict[str, Any]]
) -> None:
    tailer = Tailer(TailerReading(records=999, bytes=10**12, last_publish=0.0))
    k = stream_keeper(monkeypatch, cfg, settings, tailer)
    assert k.renew_if_due() is False
    assert rotations == []


def test_a_due_stream_waits_for_a_busy_tailer_until_past_hard_factor_times_the_policy(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings, rotations: list[dict[str, Any]]
) -> None:
    tailer = Tailer(busy(1000), busy(3999), busy(4000))
    k = stream_keeper(monkeypatch, cfg, settings, tailer)
    assert k.renew_if_due() is False
    assert k.renew_if_due() is False
    assert rotations == []
    assert k.renew_if_due() is True
    assert len(rotations) == 1


def test_a_renewal_that_fails_is_reported_and_left_for_later(
    monkeypatch: pytest.MonkeyPatch, cfg: stack.StackConfig, settings: Settings
) -> None:
    def rotate(cfg: stack.StackConfig, settings: Settings, **options: Any) -> Generation:
        raise RenewalError("the consumer did not reach the end of shardId-000000000000")

    monkeypatch.setattr(generations, "rotate", rotate)
    k = stream_keeper(monkeypatch, cfg, settings, Tailer(TailerReading(records=2000, bytes=0.0, last_publish=0.0)))
    assert k.renew_if_due() is False
    generation = saved(cfg)
    assert generation is not None and generation.records == 2000  # the count is kept for next time


# -- read_tailer -----------------------------------------------------------------------------


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """An HTTP server answering every GET with the next ``(status, body)`` of its list; its URL and the list."""
    answers: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_read_tailer_parses_the_tailers_own_metrics(metrics_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, answers = metrics_server
    registry = CollectorRegistry()
    metrics = TailerMetrics.for_registry(registry)
    metrics.kinesis_records.labels(stream=STREAM).inc(12)
    metrics.kinesis_bytes.labels(stream=STREAM).inc(3456)
    metrics.kinesis_records.labels(stream="another-stream").inc(999)
    metrics.kinesis_bytes.labels(stream="another-stream").inc(999_999)
    metrics.last_publish_time.set(NOW + 0.25)
    answers.append((200, generate_latest(registry)))
    assert read_tailer(url, STREAM) == TailerReading(records=12.0, bytes=3456.0, last_publish=NOW + 0.25)


def test_read_tailer_reads_zeros_from_a_tailer_that_published_nothing(
    metrics_server: tuple[str, list[tuple[int, bytes]]],
) -> None:
    url, answers = metrics_server
    registry = CollectorRegistry()
    TailerMetrics.for_registry(registry)
    answers.append((200, generate_latest(registry)))
    assert read_tailer(url, STREAM) == TailerReading(records=0.0, bytes=0.0, last_publish=0.0)


def test_read_tailer_is_none_for_an_error_answer(metrics_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, answers = metrics_server
    answers.append((500, b"oops"))
    assert read_tailer(url, STREAM) is None


def test_read_tailer_is_none_when_nothing_answers() -> None:
    assert read_tailer(f"http://127.0.0.1:{free_port()}/metrics", STREAM, timeout=5.0) is None
