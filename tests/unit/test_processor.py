"""The KCL record processor, driven with amazon-kclpy's own message classes.

Messages are decoded the way ``KCLProcess`` decodes the daemon's lines, so records are
real ``amazon_kclpy.messages.Record`` objects (base64 data included).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from amazon_kclpy import dispatch
from amazon_kclpy.kcl import CheckpointError, KCLProcess
from moto import mock_aws

from consumers.deadletters import DeadLetter, DynamoDBDeadLetterSink, MemoryDeadLetterSink
from consumers.processor import EXIT_HALTED, ConfigProjectionProcessor
from consumers.stages import StageRecorder, parse_stage_line
from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from projections.errors import StoreMisconfigured, StoreThrottled, StoreUnavailable
from projections.model import ConfigChange
from projections.router import TagRouter
from projections.stores.base import ApplyResult, ChangeResult, Outcome
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.memory import MemoryConfigStore
from projections.stores.ssm import SSMConfigStore
from tagbus.compose import tag_router
from tests.fixtures.in_process_aws import in_process
from tests.fixtures.waiting import wait_for

SAMPLES = Path(__file__).parent.parent / "fixtures" / "sample_events"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def event_data(tenant: str, key: str, version: int, value: Any = None, *, deleted: bool = False) -> bytes:
    return StoredEvent(
        id=f"{tenant}:{key}:{version}",
        tenant=tenant,
        stream=key,
        version=version,
        type=CONFIG_DELETED if deleted else CONFIG_SET,
        source="/tests",
        recorded_at=T0,
        data={"key": key} if deleted else {"key": key, "value": value},
        position=version,
    ).to_record_data()


def record_json(data: bytes, sequence: int) -> dict[str, Any]:
    return {
        "action": "record",
        "data": base64.b64encode(data).decode(),
        "partitionKey": "pk",
        "sequenceNumber": f"4959{sequence:020d}",
        "subSequenceNumber": 0,
        "approximateArrivalTimestamp": 1714564800000,
    }


def message(body: dict[str, Any]) -> Any:
    """A daemon message decoded exactly as kclpy decodes a line from stdin."""
    return json.loads(json.dumps(body), object_hook=dispatch.message_decode)


def process_records(datas: Sequence[bytes], start: int = 1) -> Any:
    records = [record_json(d, start + i) for i, d in enumerate(datas)]
    return message({"action": "processRecords", "records": records, "millisBehindLatest": 0})


class FakeCheckpointer:
    def __init__(self, on_checkpoint: Callable[[], None] | None = None, errors: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str | None, int | None]] = []
        self._on_checkpoint = on_checkpoint
        self._errors = list(errors)

    def checkpoint(self, sequence_number: str | None = None, sub_sequence_number: int | None = None) -> None:
        if self._on_checkpoint:
            self._on_checkpoint()
        if self._errors:
            raise CheckpointError(self._errors.pop(0))
        self.calls.append((sequence_number, sub_sequence_number))


class Harness:
    def __init__(self, router: TagRouter | None = None, **options: Any) -> None:
        self.tenantconfig = MemoryConfigStore()
        self.paramconfig = MemoryConfigStore()
        self.router = router or TagRouter({"tenantconfig": self.tenantconfig, "paramconfig": self.paramconfig})
        self.dead_letters = MemoryDeadLetterSink()
        self.sleeps: list[float] = []
        self.processor = ConfigProjectionProcessor(
            self.router, dead_letters=self.dead_letters, sleep=self.sleeps.append, **options
        )
        message({"action": "initialize", "shardId": "shardId-000000000001", "sequenceNumber": None,
                 "subSequenceNumber": None}).dispatch(None, self.processor)  # fmt: skip

    def deliver(self, datas: Sequence[bytes], checkpointer: FakeCheckpointer, start: int = 1) -> None:
        process_records(datas, start).dispatch(checkpointer, self.processor)

    def value(self, tenant: str, key: str) -> Any:
        item = self.router.get(tenant, key)
        return None if item is None else (item.value, item.version)


def test_a_batch_is_applied_before_it_is_checkpointed() -> None:
    h = Harness()
    seen_at_checkpoint: list[Any] = []
    checkpointer = FakeCheckpointer(lambda: seen_at_checkpoint.append(h.value("acme", "tenantconfig:a")))
    h.deliver([event_data("acme", "tenantconfig:a", 1, "x"), sample("paramconfig_set")], checkpointer)
    assert seen_at_checkpoint == [("x", 1)]
    assert checkpointer.calls == [(f"4959{2:020d}", 0)]
    assert h.value("globex", "paramconfig:orders/limits") == (
        {"max_items": 50, "ratio": 0.75, "regions": ["eu", "us"]},
        1,
    )
    assert h.processor.stats.checkpoints == 1 and h.dead_letters.letters == []


def test_duplicates_and_reorders_end_at_the_last_version() -> None:
    h = Harness()
    key = "tenantconfig:feature/x"
    first = [event_data("acme", key, v, f"v{v}") for v in (3, 1, 2)]
    second = [event_data("acme", key, v, f"v{v}") for v in (2, 4, 1)]
    third = [
        event_data("acme", key, 5, deleted=True),
        event_data("acme", key, 4, "v4"),
        sample("domain_event"),
    ]
    checkpointer = FakeCheckpointer()
    h.deliver(first, checkpointer, start=1)
    assert h.value("acme", key) == ("v3", 3)
    h.deliver(second, checkpointer, start=4)
    h.deliver(first + second, checkpointer, start=7)  # a redelivery after a restart
    assert h.value("acme", key) == ("v4", 4)
    h.deliver(third, checkpointer, start=13)
    assert h.value("acme", key) is None
    assert h.tenantconfig.entries("acme")[key].version == 5
    assert [c[0] for c in checkpointer.calls] == [f"4959{n:020d}" for n in (3, 6, 12, 15)]
    assert h.dead_letters.letters == []
    assert h.processor.stats.outcomes["ignored"] == 1


def test_poison_events_are_dead_lettered_and_later_events_applied() -> None:
    h = Harness(max_attempts=3)
    datas = [
        sample("config_set_v1"),
        sample("poison_unknown_tag"),
        b"\x00not json",
        sample("poison_bad_key"),
        sample("config_set_v2"),
        event_data("acme", "paramconfig:after", 1, "applied"),
    ]
    checkpointer = FakeCheckpointer()
    h.deliver(datas, checkpointer)
    assert h.value("acme", "tenantconfig:billing/currency") == ("USD", 2)
    assert h.value("acme", "paramconfig:after") == ("applied", 1)
    assert checkpointer.calls == [(f"4959{6:020d}", 0)]

    letters = {letter.event_id: letter for letter in h.dead_letters.letters}
    assert set(letters) == {"evt-0300", "evt-0301", f"record:shardId-000000000001:4959{3:020d}:0"}
    unknown_tag = letters["evt-0300"]
    assert (unknown_tag.tenant, unknown_tag.error_type, unknown_tag.attempts) == ("acme", "UnknownTag", 3)
    assert unknown_tag.data == sample("poison_unknown_tag")
    assert unknown_tag.stream == "vaultconfig:secrets/db" and unknown_tag.version == 1
    assert letters["evt-0301"].error_type == "InvalidConfigKey"
    undecodable = letters[f"record:shardId-000000000001:4959{3:020d}:0"]
    assert (undecodable.tenant, undecodable.attempts, undecodable.data) == ("-", 1, b"\x00not json")
    assert len(h.sleeps) == 2  # two retry rounds before giving up on the poison
    assert h.processor.stats.dead_lettered == 3


class FlakyStore(MemoryConfigStore):
    """Fails every change with ``error`` for the first ``failures`` calls."""

    def __init__(self, error: Exception, failures: int) -> None:
        super().__init__()
        self.error = error
        self.failures = failures
        self.calls = 0

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        self.calls += 1
        if self.calls <= self.failures:
            return ApplyResult(tuple(ChangeResult(c, Outcome.FAILED, self.error) for c in changes))  # type: ignore[arg-type]
        return super().apply(changes)


def test_throttling_is_retried_with_backoff_then_applied() -> None:
    flaky = FlakyStore(StoreThrottled("slow down", store="ssm", code="ThrottlingException"), failures=3)
    router = TagRouter({"tenantconfig": MemoryConfigStore(), "paramconfig": flaky})
    h = Harness(router, base_delay=1.0, max_delay=3.0)
    checkpointer = FakeCheckpointer()
    h.deliver(
        [event_data("acme", "paramconfig:p", 1, "v"), event_data("acme", "tenantconfig:t", 1, "w")],
        checkpointer,
    )
    assert h.value("acme", "paramconfig:p") == ("v", 1)
    assert h.value("acme", "tenantconfig:t") == ("w", 1)
    assert len(h.sleeps) == 3
    assert 0.5 <= h.sleeps[0] <= 1.0 and 1.5 <= h.sleeps[2] <= 3.0
    assert checkpointer.calls == [(f"4959{2:020d}", 0)] and h.dead_letters.letters == []


def test_a_store_that_stays_down_halts_without_checkpoint_or_dead_letters() -> None:
    flaky = FlakyStore(StoreUnavailable("down", store="dynamodb"), failures=1000)
    h = Harness(TagRouter({"tenantconfig": flaky}), max_transient_attempts=4)
    checkpointer = FakeCheckpointer()
    with pytest.raises(SystemExit) as exit_info:
        h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], checkpointer)
    assert exit_info.value.code == EXIT_HALTED
    assert checkpointer.calls == [] and h.dead_letters.letters == []
    assert flaky.calls == 4


def test_a_misconfigured_store_halts_at_once() -> None:
    flaky = FlakyStore(StoreMisconfigured("no table", store="dynamodb", code="ResourceNotFoundException"), 1000)
    h = Harness(TagRouter({"tenantconfig": flaky}))
    checkpointer = FakeCheckpointer()
    with pytest.raises(SystemExit):
        h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], checkpointer)
    assert flaky.calls == 1 and checkpointer.calls == [] and h.sleeps == []


def test_a_dead_letter_that_cannot_be_written_halts() -> None:
    class BrokenSink:
        def put(self, letter: DeadLetter) -> None:
            raise StoreUnavailable("dlq down", store="dynamodb-deadletters")

    h = Harness()
    h.processor.dead_letters = BrokenSink()
    checkpointer = FakeCheckpointer()
    with pytest.raises(SystemExit):
        h.deliver([b"garbage", event_data("acme", "tenantconfig:t", 1, "w")], checkpointer)
    assert checkpointer.calls == []


def test_an_unexpected_exception_halts_instead_of_being_swallowed_by_kclpy() -> None:
    class Exploding(MemoryConfigStore):
        def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
            raise RuntimeError("bug")

    h = Harness(TagRouter({"tenantconfig": Exploding()}))
    checkpointer = FakeCheckpointer()
    with pytest.raises(SystemExit):
        h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], checkpointer)
    assert checkpointer.calls == []


def test_checkpoint_throttling_is_retried_and_a_lost_lease_stops_checkpointing() -> None:
    h = Harness()
    throttled = FakeCheckpointer(errors=["ThrottlingException", "ThrottlingException"])
    h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], throttled)
    assert throttled.calls == [(f"4959{1:020d}", 0)] and len(h.sleeps) == 2

    lost = FakeCheckpointer(errors=["ShutdownException"])
    h.deliver([event_data("acme", "tenantconfig:t", 2, "x")], lost, start=2)
    assert lost.calls == [] and h.processor.lease_lost_at is not None
    assert h.value("acme", "tenantconfig:t") == ("x", 2)


def test_lease_lost_never_checkpoints_and_shard_end_checkpoints_without_arguments() -> None:
    h = Harness()
    ended = FakeCheckpointer()
    message({"action": "shardEnded"}).dispatch(ended, h.processor)
    assert ended.calls == [(None, None)]

    other = Harness()
    message({"action": "leaseLost"}).dispatch(None, other.processor)
    after = FakeCheckpointer()
    message({"action": "shutdownRequested"}).dispatch(after, other.processor)
    assert after.calls == []


def test_empty_batches_do_not_checkpoint() -> None:
    h = Harness()
    checkpointer = FakeCheckpointer()
    h.deliver([], checkpointer)
    assert checkpointer.calls == []


def speak(processor: Any, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``processor`` under amazon-kclpy's protocol loop on the daemon's ``lines``; its replies
    (and nothing on stderr)."""
    stdin = io.StringIO("".join(json.dumps(line) + "\n" for line in lines))
    stdout, stderr = io.StringIO(), io.StringIO()
    KCLProcess(processor, input_file=stdin, output_file=stdout, error_file=stderr).run()
    assert stderr.getvalue() == ""
    return [json.loads(line) for line in stdout.getvalue().splitlines() if line.strip()]


def test_speaks_the_multilang_protocol_through_kclprocess() -> None:
    h = Harness()
    lines = [
        {"action": "initialize", "shardId": "shardId-000000000007", "sequenceNumber": "TRIM_HORIZON",
         "subSequenceNumber": 0},
        {"action": "processRecords", "millisBehindLatest": 0,
         "records": [record_json(sample("config_set_v1"), 1), record_json(sample("config_set_v2"), 2)]},
        {"action": "checkpoint", "sequenceNumber": f"4959{2:020d}", "subSequenceNumber": 0},
        {"action": "shardEnded"},
        {"action": "checkpoint", "sequenceNumber": "SHARD_END", "subSequenceNumber": 0},
    ]  # fmt: skip
    sent = speak(h.processor, lines)
    assert sent == [
        {"action": "status", "responseFor": "initialize"},
        {"action": "checkpoint", "sequenceNumber": f"4959{2:020d}", "subSequenceNumber": 0},
        {"action": "status", "responseFor": "processRecords"},
        {"action": "checkpoint", "sequenceNumber": None, "subSequenceNumber": None},
        {"action": "status", "responseFor": "shardEnded"},
    ]
    assert h.processor.shard_id == "shardId-000000000007"
    assert h.value("acme", "tenantconfig:billing/currency") == ("USD", 2)


# ------------------------------------------------------------------ checkpoint cadence, stages


def test_checkpoints_are_taken_at_most_once_an_interval_and_at_shutdown() -> None:
    now = [0.0]
    h = Harness(checkpoint_interval=1.0, monotonic=lambda: now[0])
    checkpointer = FakeCheckpointer()
    for n, at in enumerate((0.0, 0.5, 0.9, 1.2), start=1):
        now[0] = at
        h.deliver([event_data("acme", "tenantconfig:t", n, f"v{n}")], checkpointer, start=n)
        assert h.value("acme", "tenantconfig:t") == (f"v{n}", n)  # applied at once all the same
    assert checkpointer.calls == [(f"4959{1:020d}", 0), (f"4959{4:020d}", 0)]
    message({"action": "shutdownRequested"}).dispatch(checkpointer, h.processor)
    assert checkpointer.calls[-1] == (None, None)


def test_an_idle_call_takes_the_checkpoint_the_interval_held_back() -> None:
    now = [0.0]
    h = Harness(checkpoint_interval=1.0, monotonic=lambda: now[0])
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:t", 1, "v1")], checkpointer, start=1)
    now[0] = 0.5
    h.deliver([event_data("acme", "tenantconfig:t", n, f"v{n}") for n in (2, 3)], checkpointer, start=2)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]  # the second batch was held back
    now[0] = 0.9
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]  # still within the interval
    now[0] = 1.0
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0), (f"4959{3:020d}", 0)]


def test_an_idle_call_with_nothing_applied_checkpoints_nothing() -> None:
    now = [0.0]
    h = Harness(checkpoint_interval=1.0, monotonic=lambda: now[0])
    checkpointer = FakeCheckpointer()
    for at in (0.0, 5.0, 50.0):
        now[0] = at
        h.deliver([], checkpointer)
    assert checkpointer.calls == [] and h.processor.stats.checkpoints == 0


def test_an_idle_call_does_not_checkpoint_again_where_it_already_is() -> None:
    now = [0.0]
    h = Harness(checkpoint_interval=1.0, monotonic=lambda: now[0])
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:t", 1, "v1")], checkpointer, start=1)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]
    for at in (5.0, 50.0):
        now[0] = at
        h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)] and h.processor.stats.checkpoints == 1


def test_an_idle_call_retries_a_checkpoint_that_failed() -> None:
    h = Harness(checkpoint_interval=1.0, monotonic=lambda: 0.0)
    checkpointer = FakeCheckpointer(errors=["InvalidStateException"])
    h.deliver([event_data("acme", "tenantconfig:t", 1, "v1")], checkpointer, start=1)
    assert checkpointer.calls == []  # failed, and the batch stays applied
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]


def test_stage_timings_are_logged_as_one_parsable_line() -> None:
    lines: list[str] = []
    stages = StageRecorder(interval=0, emit=lines.append)
    h = Harness(stages=stages)
    h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], FakeCheckpointer())
    assert stages.flush() is not None
    summary = parse_stage_line("2024-05-01 12:00:00,000 INFO consumers.stages [1] " + lines[0])
    assert summary is not None and (summary["batches"], summary["checkpoints"]) == (1, 1)
    assert set(summary) >= {"commit_to_arrival", "arrival_to_receive", "queued", "apply", "checkpoint"}
    assert summary["commit_to_arrival"]["p50"] == 0.0  # recorded and arrived at T0
    assert parse_stage_line(f"Received error line from subprocess [{lines[0]}] for shard s") is None


# ------------------------------------------------------------------ pipelined


class GatedStore(MemoryConfigStore):
    """Holds the calls numbered in ``gates`` until their event is set; records each call's keys."""

    def __init__(self, *gated_calls: int) -> None:
        super().__init__()
        self.gates = {n: threading.Event() for n in gated_calls}
        self.calls: list[list[tuple[str, int]]] = []

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        self.calls.append([(change.key.path, change.version) for change in changes])
        gate = self.gates.get(len(self.calls))
        if gate is not None:
            assert gate.wait(10), "gate never opened"
        return super().apply(changes)


def test_pipelined_batches_queued_behind_a_write_are_applied_together_then_checkpointed() -> None:
    store = GatedStore(1, 3)
    h = Harness(TagRouter({"tenantconfig": store}), pipelined=True)
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:a", 1, "a1")], checkpointer, start=1)
    wait_for(lambda: len(store.calls) == 1)  # being written, held at the gate
    h.deliver([event_data("acme", "tenantconfig:a", 2, "a2"), event_data("acme", "tenantconfig:b", 1, "b1")],
              checkpointer, start=2)  # fmt: skip
    h.deliver([event_data("acme", "tenantconfig:a", 3, "a3")], checkpointer, start=4)
    assert checkpointer.calls == [] and h.value("acme", "tenantconfig:a") is None  # nothing applied yet

    store.gates[1].set()
    wait_for(lambda: h.processor.applied_through == (f"4959{4:020d}", 0))
    assert h.value("acme", "tenantconfig:a") == ("a3", 3)
    # The two queued batches went out as one write, a's two versions coalesced to the last.
    assert store.calls == [[("a", 1)], [("a", 3), ("b", 1)]]

    h.deliver([event_data("acme", "tenantconfig:c", 1, "c1")], checkpointer, start=5)  # held at gate 3
    # Checkpointed where everything before is applied: the end of the merged batches, not c.
    assert checkpointer.calls == [(f"4959{4:020d}", 0)]

    shutdown = threading.Thread(
        target=lambda: message({"action": "shutdownRequested"}).dispatch(checkpointer, h.processor)
    )
    shutdown.start()
    # A checkpoint that does not happen has no event to wait on: time is let pass for one to show.
    time.sleep(0.1)
    assert checkpointer.calls == [(f"4959{4:020d}", 0)]  # shutdown waits for c's write
    store.gates[3].set()
    shutdown.join(10)
    assert checkpointer.calls == [(f"4959{4:020d}", 0), (None, None)]
    assert h.value("acme", "tenantconfig:c") == ("c1", 1)


def test_pipelined_failure_halts_at_once_without_checkpoint() -> None:
    class Exploding(MemoryConfigStore):
        def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
            raise RuntimeError("bug")

    halted = threading.Event()
    h = Harness(TagRouter({"tenantconfig": Exploding()}), pipelined=True, halt=halted.set)
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:t", 1, "w")], checkpointer)
    assert halted.wait(10)  # from the writer thread, not on the next batch
    with pytest.raises(SystemExit) as exit_info:
        h.deliver([event_data("acme", "tenantconfig:t", 2, "x")], checkpointer, start=2)
    assert exit_info.value.code == EXIT_HALTED
    with pytest.raises(SystemExit):
        message({"action": "shutdownRequested"}).dispatch(checkpointer, h.processor)
    assert checkpointer.calls == []


def test_pipelined_lease_lost_drops_the_batches_not_started() -> None:
    store = GatedStore(1)
    h = Harness(TagRouter({"tenantconfig": store}), pipelined=True)
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:a", 1, "a1")], checkpointer, start=1)
    wait_for(lambda: len(store.calls) == 1)
    h.deliver([event_data("acme", "tenantconfig:a", 2, "a2")], checkpointer, start=2)
    message({"action": "leaseLost"}).dispatch(None, h.processor)
    store.gates[1].set()
    message({"action": "shutdownRequested"}).dispatch(checkpointer, h.processor)  # drains
    assert store.calls == [[("a", 1)]] and h.value("acme", "tenantconfig:a") == ("a1", 1)
    assert checkpointer.calls == []


def test_pipelined_processor_speaks_the_multilang_protocol() -> None:
    store = GatedStore(1)  # the write outlasts processRecords: no checkpoint in its reply
    h = Harness(TagRouter({"tenantconfig": store}), pipelined=True)
    threading.Timer(0.2, store.gates[1].set).start()
    lines = [
        {"action": "initialize", "shardId": "shardId-000000000007", "sequenceNumber": "TRIM_HORIZON",
         "subSequenceNumber": 0},
        {"action": "processRecords", "millisBehindLatest": 0,
         "records": [record_json(sample("config_set_v1"), 1), record_json(sample("config_set_v2"), 2)]},
        {"action": "shardEnded"},
        {"action": "checkpoint", "sequenceNumber": "SHARD_END", "subSequenceNumber": 0},
    ]  # fmt: skip
    sent = speak(h.processor, lines)
    assert sent == [
        {"action": "status", "responseFor": "initialize"},
        {"action": "status", "responseFor": "processRecords"},  # handed over, not yet written
        {"action": "checkpoint", "sequenceNumber": None, "subSequenceNumber": None},  # after draining
        {"action": "status", "responseFor": "shardEnded"},
    ]
    assert h.value("acme", "tenantconfig:billing/currency") == ("USD", 2)


def test_pipelined_idle_calls_checkpoint_what_the_writer_applied_since() -> None:
    now = [0.0]
    store = GatedStore(1)
    h = Harness(TagRouter({"tenantconfig": store}), pipelined=True, checkpoint_interval=1.0, monotonic=lambda: now[0])
    checkpointer = FakeCheckpointer()
    h.deliver([event_data("acme", "tenantconfig:a", 1, "a1")], checkpointer, start=1)  # held at gate 1
    wait_for(lambda: len(store.calls) == 1)
    h.deliver([], checkpointer)
    assert checkpointer.calls == []  # nothing applied yet: nothing to checkpoint

    store.gates[1].set()
    wait_for(lambda: h.processor.applied_through == (f"4959{1:020d}", 0))
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]

    now[0] = 0.5
    h.deliver([event_data("acme", "tenantconfig:a", 2, "a2"), event_data("acme", "tenantconfig:b", 1, "b1")],
              checkpointer, start=2)  # fmt: skip
    wait_for(lambda: h.processor.applied_through == (f"4959{3:020d}", 0))
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0)]  # within the interval
    now[0] = 1.0
    h.deliver([], checkpointer)
    assert checkpointer.calls == [(f"4959{1:020d}", 0), (f"4959{3:020d}", 0)]
    now[0] = 10.0
    h.deliver([], checkpointer)
    assert len(checkpointer.calls) == 2  # already there
    assert h.value("acme", "tenantconfig:b") == ("b1", 1)


def test_tag_router_registers_both_tags() -> None:
    session = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
    router = tag_router(session.client("dynamodb"), session.client("ssm"))
    assert router.registered_tags == frozenset({"tenantconfig", "paramconfig"})
    assert isinstance(router.store_for("tenantconfig"), DynamoDBConfigStore)
    assert isinstance(router.store_for("paramconfig"), SSMConfigStore)


@mock_aws
def test_dynamodb_dead_letter_sink_round_trips() -> None:
    # On moto's in-process DynamoDB; tests/integration/test_dlq.py uses the sink on DynamoDB Local.
    client = boto3.client("dynamodb", **in_process("dynamodb"))
    sink = DynamoDBDeadLetterSink(client, table_name=f"tagbus-deadletters-test-{uuid.uuid4().hex[:8]}")
    sink.ensure_table()
    sink.ensure_table()
    try:
        letter = DeadLetter(
            tenant="acme",
            event_id="evt-0300",
            data=sample("poison_unknown_tag"),
            error_type="UnknownTag",
            error="no config store registered for tag 'vaultconfig'",
            attempts=3,
            failed_at=T0,
            shard_id="shardId-000000000001",
            sequence_number="4959",
            sub_sequence_number=0,
            partition_key="acme/vaultconfig:secrets/db",
            stream="vaultconfig:secrets/db",
            version=1,
        )
        sink.put(letter)
        assert list(sink.list("acme")) == [letter]
        assert orjson.loads(sink.list("acme")[0].data)["id"] == "evt-0300"
    finally:
        client.delete_table(TableName=sink.table_name)
