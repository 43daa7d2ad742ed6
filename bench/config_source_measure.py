"""How fast a config server's Kinesis change source starts, and how long a record waits to be delivered.

Against the running local stack (``tagbus up``)::

    .venv/bin/python -m bench.config_source_measure [--starts 5] [--changes 300] [--rate 30]

* start → first ``caught_up``: fresh :class:`KinesisChangeSource` instances on the stack's
  stream, lease table and read models, split into reading the checkpoints, the snapshot
  (``sink.load`` of ``router.scan()``) and the first round over the shards;
* delivery: config changes posted through the bus at ``--rate``/s while one source runs; for
  each change, Kinesis arrival (``ApproximateArrivalTimestamp``) → ``sink.apply`` (the poll
  interval's share), the ``GetRecords`` answer → ``sink.apply`` (decode and hand-over), and the
  bus ``201`` → ``sink.apply`` (the whole path).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from config_server.kinesis import KinesisChangeSource, user_records
from consumers.daemon import APPLICATION_NAME
from kernel.auth import issue_dev_token
from kernel.envelope import StoredEvent
from producers import TagbusClient
from producers.client import new_event
from projections.model import ConfigChange
from tagbus import aws, compose
from tagbus import settings as settings_mod


def percentiles(values: Sequence[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "n/a"

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    figures = ", ".join(f"p{round(q * 100)} {at(q):.0f} ms" for q in (0.5, 0.9, 0.99))
    return f"{figures}, max {ordered[-1]:.0f} ms (n={len(ordered)})"


class TimedSink:
    """A change sink noting when the snapshot load started and ended (the load consumes the
    scan), when it first caught up, and, through ``on_apply``, when each batch arrived."""

    def __init__(self, on_apply: Callable[[Sequence[ConfigChange]], None] | None = None) -> None:
        self.on_apply = on_apply
        self.load_started = self.load_ended = self.first_caught_up = 0.0
        self.loaded = 0
        self.ready = threading.Event()

    def load(self, entries: Iterable[ConfigChange]) -> None:
        self.load_started = time.perf_counter()
        self.loaded = sum(1 for _ in entries)
        self.load_ended = time.perf_counter()

    def apply(self, changes: Sequence[ConfigChange]) -> None:
        if self.on_apply is not None:
            self.on_apply(changes)

    def caught_up(self, *, lag_ms: int) -> None:
        if not self.ready.is_set():
            self.first_caught_up = time.perf_counter()
            self.ready.set()

    def source_failed(self, error: Exception) -> None:
        print(f"  source failed: {error}")


def source(s: settings_mod.Settings, kinesis: Any | None = None) -> KinesisChangeSource:
    return KinesisChangeSource(
        kinesis or aws.client(s, "kinesis"),
        aws.client(s, "dynamodb"),
        compose.build_router(s),
        stream_name=s.stream_name,
        lease_table=APPLICATION_NAME,
    )


def measure_starts(s: settings_mod.Settings, runs: int) -> None:
    totals, checkpoints, snapshots, rounds, sizes = [], [], [], [], []
    for _ in range(runs):
        sink, stop = TimedSink(), threading.Event()
        src = source(s)
        started = time.perf_counter()
        thread = threading.Thread(target=src.run, args=(sink, stop), daemon=True)
        thread.start()
        if not sink.ready.wait(120):
            raise SystemExit("the source did not catch up within 120 s")
        stop.set()
        thread.join(30)
        totals.append((sink.first_caught_up - started) * 1000)
        checkpoints.append((sink.load_started - started) * 1000)
        snapshots.append((sink.load_ended - sink.load_started) * 1000)
        rounds.append((sink.first_caught_up - sink.load_ended) * 1000)
        sizes.append(sink.loaded)
    print(f"start → first caught_up over {runs} starts ({statistics.median(sizes):.0f} keys in the read models):")
    print(f"  total                       {percentiles(totals)}")
    print(f"  lease table (checkpoints)   {percentiles(checkpoints)}")
    print(f"  snapshot (scan + load)      {percentiles(snapshots)}")
    print(f"  shards listed, first round  {percentiles(rounds)}")


def measure_delivery(s: settings_mod.Settings, changes: int, rate: float) -> None:
    tenant = f"measure-{uuid.uuid4().hex[:8]}"
    assert s.auth.jwt_secret
    token = issue_dev_token(
        s.auth.jwt_secret,
        tenant=tenant,
        tier="enterprise",
        scope="events:write",
        issuer=s.auth.issuer,
        audience=s.auth.audience,
        now=time.time(),
    )
    arrivals: dict[tuple[str, int], tuple[float, float]] = {}  # (key, version) → (arrival, answered)
    delivered: dict[tuple[str, int], float] = {}
    acknowledged: dict[tuple[str, int], float] = {}

    kinesis = aws.client(s, "kinesis")

    calls: list[float] = []
    sent: list[float] = [0.0]

    def on_send(**_: Any) -> None:
        sent[0] = time.time()

    def on_records(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        answered = time.time()
        calls.append((answered - sent[0]) * 1000)
        for record in parsed.get("Records", []):
            arrival = record["ApproximateArrivalTimestamp"].timestamp()
            for data in user_records(record["Data"]):
                try:
                    event = StoredEvent.from_record_data(data)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if event.tenant == tenant:
                    arrivals[(event.stream, event.version)] = (arrival, answered)

    kinesis.meta.events.register("before-call.kinesis.GetRecords", on_send)
    kinesis.meta.events.register("after-call.kinesis.GetRecords", on_records)

    def on_apply(batch: Sequence[ConfigChange]) -> None:
        now = time.time()
        for change in batch:
            if change.tenant == tenant:
                delivered.setdefault((str(change.key), change.version), now)

    sink, stop = TimedSink(on_apply), threading.Event()
    thread = threading.Thread(target=source(s, kinesis).run, args=(sink, stop), daemon=True)
    thread.start()
    if not sink.ready.wait(120):
        raise SystemExit("the source did not catch up within 120 s")
    with TagbusClient(s.base_url, lambda: token) as client:
        began = time.perf_counter()
        for n in range(changes):
            key = f"tenantconfig:measure/k{n % 20}"
            body = client.post(new_event("config.set", "/bench/config-source", {"key": key, "value": n}))
            acknowledged[(key, int(body["version"]))] = time.time()
            pause = began + (n + 1) / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    deadline = time.monotonic() + 60
    while len(delivered) < len(acknowledged) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(30)
    missing = len(acknowledged) - len(delivered)
    arrival_to_delivery = [(delivered[k] - arrivals[k][0]) * 1000 for k in delivered if k in arrivals]
    answer_to_delivery = [(delivered[k] - arrivals[k][1]) * 1000 for k in delivered if k in arrivals]
    ack_to_delivery = [(delivered[k] - acknowledged[k]) * 1000 for k in delivered if k in acknowledged]
    print(f"delivery of {len(acknowledged)} changes posted at {rate:.0f}/s ({missing} not delivered within 60 s):")
    print(f"  Kinesis arrival → sink.apply   {percentiles(arrival_to_delivery)}")
    print(f"  GetRecords answer → sink.apply {percentiles(answer_to_delivery)}")
    print(f"  bus 201 → sink.apply           {percentiles(ack_to_delivery)}")
    print(f"  GetRecords call                {percentiles(calls)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0)
    args = parser.parse_args(argv)
    s = settings_mod.load()
    measure_starts(s, args.starts)
    measure_delivery(s, args.changes, args.rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
