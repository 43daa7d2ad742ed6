"""kinesis-mock's wear: what each call costs as its stream holds more records, and what saving it costs.

The local stack's kinesis-mock (npm ``kinesis-local``) keeps every record in its JS heap and
never trims (it stores a stream's retention period and reports it, nothing reads it), so the
stream only grows. This bench starts private instances with the very settings
``tagbus.stack`` gives the stack's own (same ``node`` flags and environment, from its part
spec; free ports, state under a temporary folder) and measures, beside the empty-stream
baseline of the same run:

1. **calls as records are held** — for streams of 1 and 4 shards, holding 0 … 1,000,000
   records: ``PutRecords`` of 500 events of ~1 KiB sent by :class:`tailer.KinesisPublisher`
   plain (500 entries) and KPL-aggregated (one record per shard), and ``GetRecords`` as the
   KCL polls (limit 10,000, from an iterator just behind the tip, which returns the last
   500 records of the shard); calls/s and p50/p99 per call, the emulator's RSS, and the time
   it takes to save its state (SIGTERM makes it save before it exits, as ``tagbus down``
   does; the periodic save of the stack does the same work).
2. **save and reload as bytes are held** — a 1-shard stream holding N records of ~1 KiB:
   how long the emulator takes to load the saved state when it starts (``tagbus up``), how
   long one save blocks it, and its peak RSS meanwhile.

Records held are put in place by writing the emulator's own state file and letting it load
it (``LOAD_DATA_IF_EXISTS``), since putting them through the API costs in proportion to the
records already held: the bulk records carry a 16-byte payload (what a call costs depends on
their number, and the load time on their bytes); the last 500 records of each shard carry
~1 KiB, as the tailer's would. A ``PutRecords`` that would take longer than the cap is not
sent (its time is foreseen from the previous level) or not waited for.

Usage: ``python -m bench.kinesis_wear [--quick]`` or ``python -m bench --only kinesis_wear``.
Results: printed, and written to ``reports/bench-kinesis-wear.{json,md}``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
from prometheus_client import CollectorRegistry

from bench import REPO_ROOT, BenchOptions
from devtools.ports import free_port
from kernel.envelope import CONFIG_SET, StoredEvent
from kernel.stats import percentile
from tagbus.stack import StackConfig, part_specs
from tailer import KinesisPublisher, TailerMetrics

STREAM = "tagbus-events"
#: Events in one ``PutRecords`` of the tailer (its request limit) and their size.
BATCH_EVENTS = 500
EVENT_BYTES = 1_024
#: Records of ~1 KiB at the tip of each shard: what a KCL one batch behind reads.
TAIL_RECORDS = 500
BULK_PAYLOAD_BYTES = 16
SAVE_RECORD_BYTES = 1_024


@dataclass(frozen=True, slots=True)
class Sizes:
    """How far each part goes; a quick run keeps the same shape, smaller."""

    #: Per shard count, the records held beyond the tail (the bulk, spread evenly over the shards).
    levels: tuple[tuple[int, tuple[int, ...]], ...]
    #: ~1 KiB records held by a 1-shard stream for the save/reload rows.
    saved: tuple[int, ...]
    #: Calls per kind and level at most, and seconds spent on one kind at one level at most.
    samples: int
    budget_seconds: float
    #: A single PutRecords foreseen or seen slower than this is not (further) waited for.
    cap_seconds: float
    #: How long a start (load of the saved state) and a stop (save) may take.
    start_timeout: float = 600.0
    stop_timeout: float = 300.0


FULL = Sizes(
    # 4 shards stop at 500,000 to keep the run near 10 minutes: loading 1,000,000 records alone
    # takes the emulator about two.
    levels=((1, (0, 50_000, 200_000, 500_000, 1_000_000)), (4, (0, 50_000, 200_000, 500_000))),
    saved=(10_000, 40_000),
    samples=5,
    budget_seconds=15.0,
    cap_seconds=30.0,
)
QUICK = Sizes(
    levels=((1, (0, 20_000)), (4, (0, 20_000))), saved=(5_000,), samples=3, budget_seconds=6.0, cap_seconds=15.0
)


class CallTooSlow(Exception):
    """A call was not answered within the cap (the emulator may still be working on it)."""


# --------------------------------------------------------------------------- a private emulator


def proc_status_mb(pid: int, field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of a process, in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


@dataclass(frozen=True, slots=True)
class Stopped:
    """How a stop went: seconds from SIGTERM to exit (the save) and the peak RSS meanwhile."""

    seconds: float
    peak_rss_mb: float
    completed: bool


class PrivateKinesis:
    """A kinesis-mock of our own, started as ``tagbus.stack`` starts the stack's, on free ports.

    Its argv and environment come from the stack's part spec for a stack rooted at ``root``
    (so the state file lives under ``root``); only the ports differ from the shared
    instance's, which this never touches.
    """

    def __init__(self, root: Path, shards: int) -> None:
        config = StackConfig(
            root=root,
            kinesis_port=free_port(),
            kinesis_tls_port=free_port(),
            stream_name=STREAM,
            stream_shards=shards,
        )
        spec = part_specs(config)["kinesis"]
        self.shards = shards
        self.endpoint = f"http://127.0.0.1:{config.kinesis_port}"
        self.env = dict(spec.env)
        self.argv = spec.argv
        # The package is installed once, under the checkout's own .tagbus/, in the same layout.
        self.cwd = REPO_ROOT / spec.cwd.relative_to(root)
        self.state_file = Path(self.env["PERSIST_PATH"]) / "kinesis-data.json"
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []
        self._log = root / f"kinesis-mock-{config.kinesis_port}.log"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def client(self, read_timeout: float = 600.0) -> Any:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "kinesis",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(connect_timeout=2, read_timeout=read_timeout, retries={"max_attempts": 1}),
        )
        # One connection per call: kinesis-mock's HTTP server waits up to 30 s for open
        # connections to close before it saves and exits, which would blur the save's time.
        client.meta.events.register("before-sign.kinesis.*", _close_connection)
        self._clients.append(client)
        return client

    def start(self, timeout: float) -> float:
        """Start it and wait until the stream is ACTIVE; the seconds that took (the load)."""
        if not (self.cwd / "main.js").is_file():
            raise RuntimeError(f"kinesis-mock is not installed at {self.cwd} (run `make setup`)")
        started = time.monotonic()
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                list(self.argv),
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        probe = self.client(read_timeout=30)
        deadline = started + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"kinesis-mock exited with {self._process.returncode}; log: {self._log}")
            try:
                summary = probe.describe_stream_summary(StreamName=STREAM)["StreamDescriptionSummary"]
                if summary["StreamStatus"] == "ACTIVE":
                    break
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kinesis-mock not ACTIVE after {timeout:.0f} s; log: {self._log}")
            time.sleep(0.2)
        # It saves its state once as soon as it starts, on its one thread: a first call waits
        # for that, so no measured call does.
        probe.list_shards(StreamName=STREAM)
        return time.monotonic() - started

    def rss_mb(self) -> float:
        return proc_status_mb(self.pid, "VmRSS")

    def hwm_mb(self) -> float:
        return proc_status_mb(self.pid, "VmHWM")

    def stop(self, timeout: float) -> Stopped:
        """SIGTERM (it saves its whole state, then exits) and wait, sampling its RSS; SIGKILL past ``timeout``.

        Our connections are closed first: its HTTP server waits for open ones before the save.
        """
        process, self._process = self._process, None
        if process is None:
            return Stopped(0.0, 0.0, True)
        for client in self._clients:
            client.close()
        self._clients.clear()
        peak = 0.0
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while process.poll() is None and time.monotonic() - started < timeout:
            with contextlib.suppress(OSError, RuntimeError):
                peak = max(peak, proc_status_mb(process.pid, "VmRSS"))
            time.sleep(0.1)
        seconds = time.monotonic() - started
        completed = process.poll() is not None
        if not completed:
            process.kill()
        process.wait()
        return Stopped(seconds, peak, completed)

    def kill(self) -> None:
        process, self._process = self._process, None
        for client in self._clients:
            client.close()
        self._clients.clear()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _close_connection(request: Any, **_: Any) -> None:
    request.headers["Connection"] = "close"


# --------------------------------------------------------------------------- its state file


def sequence_number(shard_created: datetime, shard_index: int, position: int, at: datetime) -> str:
    """The sequence number kinesis-mock gives the ``position``-th record (from 1) of a shard.

    Its own layout (``SequenceNumber.create``): version, the shard's creation second, the
    shard index's last hex digit, the position, a byte, the arrival second, the shard index.
    """
    digits = (
        "2"
        + f"{int(shard_created.timestamp()):09x}"[-9:]
        + f"{shard_index:x}"[-1:]
        + f"{position:016x}"
        + "00"
        + f"{int(at.timestamp()):09x}"[-9:]
        + f"{shard_index:08x}"
        + "2"
    )
    return str(int(digits, 16))


@dataclass(frozen=True, slots=True)
class Seeded:
    """What a written state holds: records and payload bytes per stream, and where each shard's tail starts."""

    records: int
    payload_bytes: int
    #: Shard id → sequence number of the record just before its tail (``None``: the tail is all).
    before_tail: Mapping[str, str | None]


def write_state(
    state_file: Path, template: Mapping[str, Any], *, bulk: int, bulk_bytes: int, tail: int, tail_bytes: int
) -> Seeded:
    """Write a saved state whose stream holds ``bulk`` records (spread over its shards) then ``tail`` per shard.

    ``template`` is a state the emulator saved with the stream empty; only its shards'
    record lists are filled, streamed out record by record.
    """
    (arn,) = template["streams"]
    shard_keys = list(template["streams"][arn]["shards"])
    markers = {key: f"@@shard-{i}@@" for i, key in enumerate(shard_keys)}
    skeleton = json.loads(json.dumps(template))
    for key, marker in markers.items():
        skeleton["streams"][arn]["shards"][key] = marker
    text = json.dumps(skeleton, separators=(",", ":"))
    now = datetime.now(UTC)
    bulk_payload = base64.b64encode(os.urandom(bulk_bytes)).decode()
    tail_payload = base64.b64encode(os.urandom(tail_bytes)).decode()
    before_tail: dict[str, str | None] = {}
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with state_file.open("w") as out:
        for n, key in enumerate(shard_keys):
            head, text = text.split(json.dumps(markers[key]), 1)
            out.write(head)
            shard = json.loads(key)
            created = datetime.fromisoformat(shard["CreatedAtTimestamp"].replace("Z", "+00:00"))
            index = int(shard["ShardIndex"])
            own = bulk // len(shard_keys) + (1 if n < bulk % len(shard_keys) else 0)
            total = own + tail
            before_tail[shard["ShardId"]] = None
            out.write("[")
            for position in range(1, total + 1):
                at = now - timedelta(seconds=(total - position) * 1e-3)
                seq = sequence_number(created, index, position, at)
                if position == own:
                    before_tail[shard["ShardId"]] = seq
                payload = tail_payload if position > own else bulk_payload
                separator = "," if position > 1 else ""
                out.write(
                    f'{separator}{{"ApproximateArrivalTimestamp":{at.timestamp():.3f},"Data":"{payload}",'
                    f'"EncryptionType":"NONE","PartitionKey":"tenant-{position % 64}/paramconfig:svc/key-{position}",'
                    f'"SequenceNumber":"{seq}"}}'
                )
            out.write("]")
        out.write(text)
    records = bulk + tail * len(shard_keys)
    return Seeded(records, bulk * bulk_bytes + tail * len(shard_keys) * tail_bytes, before_tail)


def empty_state(root: Path, shards: int, sizes: Sizes) -> dict[str, Any]:
    """The state an emulator saves with the stream created and empty (its exact layout, to fill)."""
    kinesis = PrivateKinesis(root, shards)
    try:
        kinesis.start(sizes.start_timeout)
        kinesis.stop(sizes.stop_timeout)
    finally:
        kinesis.kill()
    state: dict[str, Any] = json.loads(kinesis.state_file.read_text())
    return state


# --------------------------------------------------------------------------- the calls


def batch_events(level: int) -> list[StoredEvent]:
    """500 config events of ~1 KiB each over many streams (so that they spread over the shards)."""
    recorded = datetime.now(UTC)
    events = []
    for i in range(BATCH_EVENTS):
        key = f"paramconfig:svc/key-{i}"
        event = StoredEvent(
            id=f"wear-{level}-{i}-{time.monotonic_ns()}",
            tenant=f"tenant-{i % 50}",
            stream=key,
            version=1,
            type=CONFIG_SET,
            source="/bench/kinesis-wear",
            recorded_at=recorded,
            data={"key": key, "value": ""},
            position=level + i,
        )
        pad = max(0, EVENT_BYTES - len(event.to_record_data()))
        events.append(dataclasses.replace(event, data={"key": key, "value": "x" * pad}))
    return events


class TimedClient:
    """A boto3 Kinesis client whose ``put_records`` calls are timed; a read timeout is :class:`CallTooSlow`.

    The publisher retries an unanswered call forever; the bench wants to give up instead.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self.seconds: list[float] = []
        self.records: list[int] = []
        self.bytes: list[int] = []

    @property
    def list_shards(self) -> Callable[..., Mapping[str, Any]]:
        method: Callable[..., Mapping[str, Any]] = self._client.list_shards
        return method

    @property
    def put_records(self) -> Callable[..., Mapping[str, Any]]:
        return self._put_records

    def _put_records(self, **kwargs: Any) -> Mapping[str, Any]:
        started = time.perf_counter()
        try:
            response: Mapping[str, Any] = self._client.put_records(**kwargs)
        except botocore.exceptions.ReadTimeoutError as e:
            raise CallTooSlow(str(e)) from e
        self.seconds.append(time.perf_counter() - started)
        self.records.append(len(kwargs["Records"]))
        self.bytes.append(sum(len(r["Data"]) + len(r["PartitionKey"]) for r in kwargs["Records"]))
        return response


def summary(seconds: Sequence[float], **extra: Any) -> dict[str, Any]:
    """Calls/s (one caller, one call at a time) and p50/p99 per call, in ms."""
    if not seconds:
        return {"calls": 0, **extra}
    return {
        "calls": len(seconds),
        "calls_per_s": round(len(seconds) / sum(seconds), 2),
        "p50_ms": round(percentile(seconds, 50) * 1000, 1),
        "p99_ms": round(percentile(seconds, 99) * 1000, 1),
        **extra,
    }


def measure_put(
    kinesis: PrivateKinesis, level: int, *, aggregate: bool, sizes: Sizes, foreseen: float
) -> dict[str, Any]:
    """PutRecords of 500 ~1 KiB events as the tailer sends them, until the samples or the budget run out."""
    if foreseen > sizes.cap_seconds:
        return {"calls": 0, "skipped": f"foreseen {foreseen:.0f} s a call (cap {sizes.cap_seconds:.0f} s)"}
    timed = TimedClient(kinesis.client(read_timeout=sizes.cap_seconds))
    publisher = KinesisPublisher(
        timed,
        STREAM,
        aggregate=aggregate,
        metrics=TailerMetrics.for_registry(CollectorRegistry()),
        # A retried call would be timed as two: stop (PublishInterruptedError) rather than wait.
        wait=lambda _seconds: True,
    )
    for _ in range(sizes.samples):
        try:
            publisher.publish(batch_events(level))
        except CallTooSlow:
            return summary(timed.seconds, timed_out=f"a call took over {sizes.cap_seconds:.0f} s")
        if sum(timed.seconds) >= sizes.budget_seconds:
            break
    return summary(
        timed.seconds,
        records_per_call=round(statistics.mean(timed.records), 1),
        bytes_per_call=round(statistics.mean(timed.bytes)),
    )


def measure_get(kinesis: PrivateKinesis, seeded: Seeded, sizes: Sizes) -> dict[str, Any]:
    """GetRecords as the KCL polls (limit 10,000) from an iterator just behind the tip of the first shard."""
    client = kinesis.client()
    shard_id, before = next(iter(seeded.before_tail.items()))
    if before is None:
        iterator = client.get_shard_iterator(StreamName=STREAM, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")
    else:
        iterator = client.get_shard_iterator(
            StreamName=STREAM,
            ShardId=shard_id,
            ShardIteratorType="AFTER_SEQUENCE_NUMBER",
            StartingSequenceNumber=before,
        )
    seconds: list[float] = []
    returned = 0
    for _ in range(sizes.samples):
        started = time.perf_counter()
        response = client.get_records(ShardIterator=iterator["ShardIterator"], Limit=10_000)
        seconds.append(time.perf_counter() - started)
        returned = len(response["Records"])
        if sum(seconds) >= sizes.budget_seconds:
            break
    return summary(seconds, records_returned=returned)


def foreseen_seconds(history: Sequence[Mapping[str, Any]], kind: str, records: int) -> float:
    """A call's time at ``records`` held, foreseen from the empty stream's and the last level's.

    What a call costs above the empty stream's grows in proportion to the records held
    (kinesis-mock groups a request's entries by their shard's whole record list, hashing it
    once per entry), so a straight line through the two is the forecast.
    """
    if len(history) < 2:
        return 0.0
    base, last = history[0], history[-1]
    if last[kind].get("skipped") or last[kind].get("timed_out"):
        return math.inf
    base_s, last_s = base[kind]["p50_ms"] / 1000, last[kind]["p50_ms"] / 1000
    slope = max(0.0, last_s - base_s) / max(1, last["records"] - base["records"])
    return float(base_s + slope * (records - base["records"]))


# --------------------------------------------------------------------------- the parts


def measure_level(
    root: Path,
    template: Mapping[str, Any],
    shards: int,
    held: int,
    *,
    sizes: Sizes,
    history: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """One emulator holding ``held`` records (plus the tail): its calls, RSS, and the save at stop."""
    kinesis = PrivateKinesis(root, shards)
    seeded = write_state(
        kinesis.state_file,
        template,
        bulk=held,
        bulk_bytes=BULK_PAYLOAD_BYTES,
        tail=TAIL_RECORDS,
        tail_bytes=EVENT_BYTES,
    )
    state_mb = kinesis.state_file.stat().st_size / 1e6
    row: dict[str, Any] = {
        "shards": shards,
        "held": held,
        "records": seeded.records,
        "state_file_mb": round(state_mb, 1),
    }
    try:
        row["load_s"] = round(kinesis.start(sizes.start_timeout), 1)
        row["rss_loaded_mb"] = round(kinesis.rss_mb())
        row["get"] = measure_get(kinesis, seeded, sizes)
        for kind, aggregate in (("put_aggregated", True), ("put_plain", False)):
            foreseen = foreseen_seconds(history, kind, seeded.records)
            row[kind] = measure_put(kinesis, held, aggregate=aggregate, sizes=sizes, foreseen=foreseen)
        row["rss_mb"] = round(kinesis.rss_mb())
        row["hwm_mb"] = round(kinesis.hwm_mb())
        if row["put_plain"].get("timed_out"):
            kinesis.kill()  # still busy with the call it gave up on: its save would wait for that
        else:
            stopped = kinesis.stop(sizes.stop_timeout)
            row["save_s"] = round(stopped.seconds, 1) if stopped.completed else None
            row["save_peak_rss_mb"] = round(stopped.peak_rss_mb)
    finally:
        kinesis.kill()
        kinesis.state_file.unlink(missing_ok=True)
    return row


def measure_saves(root: Path, template: Mapping[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    """1-shard streams of ~1 KiB records: load time and peak, RSS held, save time and peak."""
    rows: list[dict[str, Any]] = []
    for count in (0, *sizes.saved):
        kinesis = PrivateKinesis(root, 1)
        seeded = write_state(
            kinesis.state_file, template, bulk=count, bulk_bytes=SAVE_RECORD_BYTES, tail=0, tail_bytes=0
        )
        row: dict[str, Any] = {
            "records": seeded.records,
            "payload_mb": round(seeded.payload_bytes / 1e6, 1),
            "state_file_mb": round(kinesis.state_file.stat().st_size / 1e6, 1),
        }
        try:
            row["load_s"] = round(kinesis.start(sizes.start_timeout), 1)
            row["load_hwm_mb"] = round(kinesis.hwm_mb())
            row["rss_mb"] = round(kinesis.rss_mb())
            stopped = kinesis.stop(sizes.stop_timeout)
            row["save_s"] = round(stopped.seconds, 1) if stopped.completed else None
            row["save_peak_rss_mb"] = round(stopped.peak_rss_mb)
        finally:
            kinesis.kill()
            kinesis.state_file.unlink(missing_ok=True)
        rows.append(row)
        print(f"  save/reload {row}", flush=True)
    return rows


def measure_calls(root: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Every (shard count, records held) level, each on an emulator of its own."""
    rows: list[dict[str, Any]] = []
    for shards, levels in sizes.levels:
        template = empty_state(root, shards, sizes)
        history: list[dict[str, Any]] = []
        for held in levels:
            started = time.monotonic()
            row = measure_level(root, template, shards, held, sizes=sizes, history=history)
            row["wall_s"] = round(time.monotonic() - started, 1)
            history.append(row)
            rows.append(row)
            print(f"  {shards} shard(s), {held:,} held: {json.dumps(row)}", flush=True)
    return rows


# --------------------------------------------------------------------------- the report


def _ms(part: Mapping[str, Any]) -> str:
    if not part.get("calls"):
        return part.get("skipped") or part.get("timed_out") or "—"
    return f"{part['p50_ms']:,.0f} / {part['p99_ms']:,.0f} ({part['calls']})"


def _rate(part: Mapping[str, Any]) -> str:
    return f"{part['calls_per_s']:,.2f}" if part.get("calls") else "—"


def _wear(part: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    if not part.get("calls") or not base.get("calls"):
        return "—"
    return f"×{part['p50_ms'] / base['p50_ms']:,.1f}"


def calls_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Calls/s, p50 / p99 per call and the wear (p50 over the same shard count's empty stream's)."""
    lines = [
        "| shards | records held | GetRecords calls/s | p50 / p99 ms (calls) | wear | PutRecords aggregated calls/s "
        "| p50 / p99 ms (calls) | wear | PutRecords plain calls/s | p50 / p99 ms (calls) | wear | RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bases = {row["shards"]: row for row in rows if row["held"] == 0}
    for row in rows:
        base = bases[row["shards"]]
        cells = [str(row["shards"]), f"{row['records']:,}"]
        for kind in ("get", "put_aggregated", "put_plain"):
            cells += [_rate(row[kind]), _ms(row[kind]), _wear(row[kind], base[kind])]
        cells.append(f"{row.get('rss_mb', 0):,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def state_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| shards | records held | state file MB | start (load) s | RSS loaded MB | peak RSS MB | save s "
        "| peak RSS while saving MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        save = (
            "killed (busy)" if "save_s" not in row else ("> timeout" if row["save_s"] is None else f"{row['save_s']}")
        )
        lines.append(
            f"| {row['shards']} | {row['records']:,} | {row['state_file_mb']:,} | {row['load_s']} "
            f"| {row['rss_loaded_mb']:,} | {row['hwm_mb']:,} | {save} | {row.get('save_peak_rss_mb', '—')} |"
        )
    return "\n".join(lines)


def saves_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| ~1 KiB records held | payload MB | state file MB | start (load) s | peak RSS loading MB "
        "| RSS after start MB "
        "| save s | peak RSS while saving MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        save = "> timeout" if row["save_s"] is None else f"{row['save_s']}"
        lines.append(
            f"| {row['records']:,} | {row['payload_mb']} | {row['state_file_mb']} | {row['load_s']} "
            f"| {row['load_hwm_mb']:,} | {row['rss_mb']:,} | {save} | {row['save_peak_rss_mb']:,} |"
        )
    return "\n".join(lines)


def derived(calls: Sequence[Mapping[str, Any]], saves: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Figures read off the tables: what each call gains per 100,000 records held, a save and a load per MB."""
    out: dict[str, Any] = {}
    for shards in sorted({row["shards"] for row in calls}):
        own = [row for row in calls if row["shards"] == shards]
        base = own[0]
        for kind in ("put_plain", "put_aggregated", "get"):
            measured = [row for row in own[1:] if row[kind].get("calls")]
            if not measured:
                continue
            top = measured[-1]
            extra_ms = top[kind]["p50_ms"] - base[kind]["p50_ms"]
            held = top["records"] - base["records"]
            out[f"{kind}, {shards} shard(s): ms added per 100,000 records held (to {top['records']:,})"] = round(
                extra_ms / held * 100_000, 1
            )
            if kind == "put_plain":
                # Each entry hashes its shard's whole record list once.
                per_hash = extra_ms / 1000 / (BATCH_EVENTS * held / shards) * 1e6
                out[f"put_plain, {shards} shard(s): µs per entry and record held in its shard"] = round(per_hash, 2)
    if len(saves) > 1:
        first, last = saves[0], saves[-1]
        mb = last["payload_mb"] - first["payload_mb"]
        if mb > 0 and last["save_s"] is not None and first["save_s"] is not None:
            out["save: s per MB of payload held"] = round((last["save_s"] - first["save_s"]) / mb, 2)
            out["save: peak RSS MB per MB of payload held"] = round(
                (last["save_peak_rss_mb"] - first["save_peak_rss_mb"]) / mb, 1
            )
            out["load at start: s per MB of payload held"] = round((last["load_s"] - first["load_s"]) / mb, 2)
            out["load at start: peak RSS MB per MB of payload held"] = round(
                (last["load_hwm_mb"] - first["load_hwm_mb"]) / mb, 1
            )
            out["RSS after the load, MB per MB of payload held"] = round((last["rss_mb"] - first["rss_mb"]) / mb, 1)
    return out


def run(quick: bool, *, reports_dir: Path | None = None) -> dict[str, Any]:
    """Run both parts; returns the results (also printed and written under ``reports/``)."""
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "quick": quick,
        "sizes": dataclasses.asdict(sizes),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    root = Path(tempfile.mkdtemp(prefix="tagbus-kinesis-wear-"))
    try:
        spec = PrivateKinesis(root, 1)
        results["emulator"] = {
            "argv": list(spec.argv),
            "env": {k: v for k, v in spec.env.items() if not k.endswith("_PORT") and k != "PERSIST_PATH"},
            "package": json.loads((spec.cwd / "package.json").read_text())["version"],
        }
        print("records held: calls, RSS, save", flush=True)
        results["calls"] = measure_calls(root, sizes)
        print("~1 KiB records held: save and reload", flush=True)
        results["saves"] = measure_saves(root, empty_state(root, 1, sizes), sizes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["derived"] = derived(results["calls"], results["saves"])
    results["wall_s"] = round(time.monotonic() - started)
    tables = (
        "## Calls as records are held\n\n"
        + calls_table(results["calls"])
        + "\n\n## The saved state as records are held\n\n"
        + state_table(results["calls"])
        + "\n\n## Save and reload as ~1 KiB records are held (1 shard)\n\n"
        + saves_table(results["saves"])
    )
    print(tables)
    print(json.dumps(results["derived"], indent=2))
    reports = reports_dir or REPO_ROOT / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "bench-kinesis-wear.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python -m bench.kinesis_wear" + (" --quick" if quick else "")
    emulator = results["emulator"]
    (reports / "bench-kinesis-wear.md").write_text(
        f"# kinesis-mock wear\n\n`{command}` — {results['started_at']}, {os.cpu_count()} CPUs, "
        f"{results['wall_s']} s. Private kinesis-mock {emulator['package']} instances started as the stack starts "
        f"its own (`{' '.join(Path(a).name for a in emulator['argv'])}`, "
        + ", ".join(f"`{k}={v}`" for k, v in emulator["env"].items())
        + f"), one per row, on free ports. Records held: the bulk carries {BULK_PAYLOAD_BYTES}-byte payloads, "
        f"the last {TAIL_RECORDS} of each shard ~1 KiB; they are written into the emulator's state file and "
        "loaded at its start. Each call is timed alone (one caller, one call at a time): PutRecords of "
        f"{BATCH_EVENTS} events of ~{EVENT_BYTES} bytes through `tailer.KinesisPublisher`, plain or KPL-aggregated; "
        "GetRecords with limit 10,000 from an iterator just behind the tip of the first shard (it returns "
        f"that shard's last {TAIL_RECORDS} records). Wear: p50 over the p50 of the same shard count's "
        "empty stream in this run. Save: seconds from SIGTERM to exit (kinesis-mock writes its whole "
        "state on the way out, as `tagbus down` and its periodic save make it do).\n\n"
        + tables
        + "\n\n## Read off\n\n"
        + "\n".join(f"- `{k}`: {v}" for k, v in results["derived"].items())
        + "\n"
    )
    return results


def run_benchmark(options: BenchOptions) -> None:
    """Entry point of ``python -m bench``."""
    run(options.quick, reports_dir=options.reports_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kinesis_wear", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="up to 20,000 records held (< 2 minutes)")
    parser.parse_args(argv)
    run(parser.parse_args(argv).quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
