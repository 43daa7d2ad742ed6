"""Watchers for the config delivery faults: what clients saw on the wire, and the server's side.

- :class:`RawWatch`: a gRPC Watch read in a thread, every message recorded, resumed with
  ``since`` after an error and listed again after a resync (what a careful client does);
- :class:`Callbacks`: the ``on_change`` calls of a :class:`config_client.ConfigCache`;
- :class:`StalledSse`: an SSE watch over a raw socket that is never read;
- :class:`PositionClock`: when the server's applied position reached each value (from its
  ``/metrics``), so a watcher's delay can be measured from the server's side;
- :class:`Fleet`: many :class:`config_client.AsyncConfigCache` in a child process
  (``python -m tests.reliability.config_watchers``), with every Watch attempt and state
  change timestamped on ``CLOCK_MONOTONIC`` (the same clock in every process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from config_api.v1 import config_pb2, config_pb2_grpc
from config_client import ChangeEvent
from kernel.envelope import CONFIG_DELETED
from projections.router import TagRouter
from tests.reliability.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]

#: What a key holds as seen by a watcher or a read model: (version, value); deletes are absent.
Held = tuple[int, Any]


# -- the read models' side --------------------------------------------------------------


def ledger_state(ledger: Ledger) -> dict[str, dict[str, Held]]:
    """Per tenant, every key's last acknowledged value (deleted keys absent): what every watcher must end with.

    Only for runs whose every post was acknowledged (the faults here spare the bus): an event
    stored without an answer would count too, and only the events table knows of it.
    """
    assert not ledger.unacknowledged, f"{len(ledger.unacknowledged)} posts without an answer"
    last: dict[tuple[str, str], tuple[int, bool, Any]] = {}
    for event in ledger.events:
        if event.key is None:
            continue
        held = last.get((event.tenant, event.key))
        if held is None or event.version > held[0]:
            last[(event.tenant, event.key)] = (event.version, event.type == CONFIG_DELETED, event.value)
    state: dict[str, dict[str, Held]] = {t: {} for t in ledger.tenants}
    for (tenant, key), (version, deleted, value) in last.items():
        if not deleted:
            state[tenant][key] = (version, value)
    return state


def read_model_state(router: TagRouter, tenant: str, prefixes: Iterable[str]) -> dict[str, Held]:
    """Every live key of ``tenant`` under ``prefixes`` (each ``<tag>:…``) as the read models hold it."""
    held: dict[str, Held] = {}
    for prefix in prefixes:
        after: str | None = None
        while True:
            page = router.list(tenant, prefix, limit=100, start_after=after)
            for item in page.items:
                held[str(item.key)] = (item.version, item.value)
            if not page.next_token:
                break
            after = page.next_token
    return held


def differences(want: Mapping[str, Held], got: Mapping[str, Held], limit: int = 5) -> list[str]:
    """What differs between two states, a few keys at most (for an assertion's message)."""
    found = [
        f"{k}: want {want.get(k)!r}, got {got.get(k)!r}"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    return found[:limit] + ([f"… and {len(found) - limit} more"] if len(found) > limit else [])


# -- the server's side --------------------------------------------------------------------


def metrics(http_url: str) -> dict[str, float]:
    """The config server's ``/metrics`` as ``name{label="v",…}`` → value (samples, ``_total`` kept)."""
    text = httpx.get(f"{http_url}/metrics", timeout=5.0).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def vm_rss_bytes(pid: int) -> int:
    """``VmRSS`` of one process (the config server is a single process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class PositionClock:
    """Samples the server's applied position every ``interval``: until when a position was not yet reached.

    A watcher's delay measured from the last sample that did not have its change yet is an upper
    bound (by one sample interval plus a scrape) of the server's own share of the delay.
    """

    def __init__(self, http_url: str, interval: float = 0.05) -> None:
        self._url = http_url
        self._interval = interval
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="position-clock", daemon=True)

    def start(self) -> PositionClock:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def not_yet(self, position: int) -> float | None:
        """The last sample before the server's position reached ``position`` (``None``: reached before the first)."""
        last: float | None = None
        for at, seen in self._samples:
            if seen >= position:
                return last
            last = at
        return None

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.wait(self._interval):
                try:
                    text = client.get(f"{self._url}/metrics").text
                except httpx.HTTPError:
                    continue
                at = time.monotonic()
                for line in text.splitlines():
                    if line.startswith("config_server_position "):
                        self._samples.append((at, int(float(line.split()[1]))))


# -- clients --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One change message, as a watcher received it (``stream``: which of its Watch calls)."""

    at: float
    stream: int
    key: str
    version: int
    position: int
    deleted: bool
    value: Any
    updated_at: float | None


@dataclass(frozen=True, slots=True)
class ProgressSeen:
    at: float
    position: int
    #: The server's clock when it sent it (epoch seconds).
    sent_at: float
    source_lag_ms: int


def order_problems(changes: Iterable[tuple[int, str, int, bool]]) -> list[str]:
    """Per key and stream, versions must rise; ``(stream, key, version, deleted)`` in arrival order.

    A repeat of the same version is allowed only as a delete following a set (the SDK reports a
    key missing from a new snapshot as a delete at the version it held).
    """
    last: dict[tuple[int, str], tuple[int, bool]] = {}
    problems: list[str] = []
    for stream, key, version, deleted in changes:
        before = last.get((stream, key))
        if before is not None and (version < before[0] or (version == before[0] and (before[1] or not deleted))):
            problems.append(f"{key}: v{version}{' (delete)' if deleted else ''} after v{before[0]}")
        last[(stream, key)] = (version, deleted)
    return problems


class Callbacks:
    """Records a cache's ``on_change`` calls with their arrival time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, ChangeEvent]] = []

    def __call__(self, event: ChangeEvent) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event))

    def snapshot(self) -> list[tuple[float, ChangeEvent]]:
        with self._lock:
            return list(self.events)

    def order_problems(self) -> list[str]:
        return order_problems((0, e.key, e.version, e.deleted) for _, e in self.snapshot())

    def versions(self) -> set[tuple[str, int]]:
        """(key, version) of every set it was called with."""
        return {(e.key, e.version) for _, e in self.snapshot() if not e.deleted}


class RawWatch:
    """A Watch stream read in a thread, every message recorded.

    After an error it resumes from its last position (``since``); after a resync (or a
    stream that ended before its snapshot was done) it watches again without ``since``.
    """

    def __init__(
        self,
        target: str,
        token: str,
        prefixes: Sequence[str],
        *,
        retry_delay: float = 0.2,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.prefixes = tuple(prefixes)
        self._retry_delay = retry_delay
        self._options = tuple(channel_options)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="raw-watch", daemon=True)
        self.position: int | None = None
        self.held: dict[str, Held] = {}
        self._versions: dict[str, int] = {}
        self.changes: list[Seen] = []
        self.progress: list[ProgressSeen] = []
        self.snapshots = 0
        self.resyncs = 0
        self.streams = 0
        self.errors: list[str] = []
        self.ready = threading.Event()

    def start(self, timeout: float = 30.0) -> RawWatch:
        """Start reading; returns once the first snapshot is complete."""
        self._thread.start()
        if not self.ready.wait(timeout):
            raise AssertionError(f"raw watch of {self.prefixes} not ready within {timeout:.0f}s: {self.errors[-3:]}")
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(10)

    def state(self) -> dict[str, Held]:
        with self._lock:
            return dict(self.held)

    def seen_versions(self) -> set[tuple[str, int]]:
        """(key, version) of every change message, sets and deletes."""
        with self._lock:
            return {(c.key, c.version) for c in self.changes}

    def first_seen(self) -> dict[tuple[str, int], float]:
        """When each (key, version) first arrived."""
        with self._lock:
            changes = list(self.changes)
        seen: dict[tuple[str, int], float] = {}
        for c in changes:
            seen.setdefault((c.key, c.version), c.at)
        return seen

    def order_problems(self) -> list[str]:
        """Versions per key within each stream (a resumed stream may repeat what the last one sent)."""
        with self._lock:
            changes = list(self.changes)
        return order_problems((c.stream, c.key, c.version, False) for c in changes)

    def _run(self) -> None:
        relist = True
        with grpc.insecure_channel(self._target, options=self._options) as channel:
            stub = config_pb2_grpc.ConfigServiceStub(channel)
            while not self._stop.is_set():
                if relist or self.position is None:
                    request = config_pb2.WatchRequest(prefixes=self.prefixes)
                else:
                    request = config_pb2.WatchRequest(prefixes=self.prefixes, since=self.position)
                relist = self._stream(stub, request)
                if not self._stop.is_set() and self.errors and self.errors[-1] != "clean end":
                    self._stop.wait(self._retry_delay)

    def _stream(self, stub: config_pb2_grpc.ConfigServiceStub, request: config_pb2.WatchRequest) -> bool:
        """One Watch call to its end; whether the next must list again."""
        call: Any = stub.Watch(request, metadata=self._metadata)
        with self._lock:
            self._call = call
            self.streams += 1
            stream = self.streams
        pending: dict[str, config_pb2.Entry] | None = None
        try:
            for message in call:
                at = time.monotonic()
                kind = message.WhichOneof("kind")
                if kind == "snapshot":
                    pending = {} if pending is None else pending
                    for entry in message.snapshot.entries:
                        pending[entry.key] = entry
                    if message.snapshot.done:
                        self._replace(pending, message.snapshot.position)
                        pending = None
                elif kind == "change":
                    self._apply(message.change, at, stream)
                elif kind == "progress":
                    p = message.progress
                    with self._lock:
                        self.progress.append(ProgressSeen(at, p.position, p.at.ToNanoseconds() / 1e9, p.source_lag_ms))
                        self.position = max(self.position or 0, p.position)
                elif kind == "resync":
                    with self._lock:
                        self.resyncs += 1
                    return True
            self.errors.append("clean end")
            return pending is not None
        except grpc.RpcError as e:
            if not self._stop.is_set():
                self.errors.append(f"{e.code().name}: {e.details()}")
            return pending is not None
        finally:
            call.cancel()
            with self._lock:
                self._call = None

    def _replace(self, entries: Mapping[str, config_pb2.Entry], position: int) -> None:
        with self._lock:
            held: dict[str, Held] = {}
            for key, entry in entries.items():
                version = self._versions.get(key, 0)
                current = self.held.get(key)
                if entry.version >= version:
                    held[key] = (entry.version, orjson.loads(entry.value_json))
                    self._versions[key] = entry.version
                elif current is not None:
                    held[key] = current
            self.held = held
            self.position = position
            self.snapshots += 1
        self.ready.set()

    def _apply(self, change: config_pb2.Change, at: float, stream: int) -> None:
        deleted = change.kind == config_pb2.Change.DELETE
        value = None if deleted else orjson.loads(change.value_json)
        updated = change.updated_at.ToNanoseconds() / 1e9 if change.HasField("updated_at") else None
        with self._lock:
            self.changes.append(Seen(at, stream, change.key, change.version, change.position, deleted, value, updated))
            if change.version > self._versions.get(change.key, 0):
                self._versions[change.key] = change.version
                if deleted:
                    self.held.pop(change.key, None)
                else:
                    self.held[change.key] = (change.version, value)
            self.position = max(self.position or 0, change.position)


def read_to_end(call: Any, timeout: float) -> str:
    """Read a Watch call until it ends (or a resync); how it ended, or that it had not within ``timeout``."""
    outcome: list[str] = []
    read = 0

    def drain() -> None:
        nonlocal read
        try:
            for message in call:
                read += 1
                if message.WhichOneof("kind") == "resync":
                    outcome.append("resync")
                    return
            outcome.append("clean end")
        except grpc.RpcError as e:
            outcome.append(e.code().name)

    reader = threading.Thread(target=drain, name="read-to-end", daemon=True)
    reader.start()
    reader.join(timeout)
    if not outcome:
        call.cancel()
        reader.join(10)
        return f"no status within {timeout:.0f} s (after {read} messages)"
    return f"{outcome[0]} (after {read} messages)"


class StalledSse:
    """An SSE watch whose client never reads: a tiny receive buffer, and no ``recv`` until :meth:`drain`."""

    def __init__(self, http_url: str, token: str, prefix: str, *, receive_buffer: int = 4096) -> None:
        host, _, port = http_url.removeprefix("http://").partition(":")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting: the window the kernel advertises is fixed at the handshake.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._sock.connect((host, int(port)))
        self._sock.sendall(
            f"GET /v1/config:watch?prefix={prefix} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )

    def drain(self, timeout: float = 10.0) -> tuple[bytes, bool]:
        """Everything the server sent, read now; and whether the server ended the stream."""
        data = bytearray()
        deadline = time.monotonic() + timeout
        self._sock.setblocking(False)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._sock], [], [], min(left, 1.0))
            if not readable:
                if data.endswith(b"0\r\n\r\n"):
                    return bytes(data), True
                continue
            try:
                chunk = self._sock.recv(1 << 16)
            except (ConnectionResetError, BlockingIOError):
                return bytes(data), True
            if not chunk:
                return bytes(data), True
            data += chunk
        return bytes(data), False

    def close(self) -> None:
        self._sock.close()


# -- many caches in a child process ---------------------------------------------------------


@dataclass
class FleetCache:
    """One cache of a fleet as its process reported it."""

    tenant: str
    state: str
    position: int | None
    items: int
    #: Monotonic time of every Watch attempt (the token callable runs before each).
    attempts: list[float]
    #: (monotonic time, state) of every change of state seen by the process's poller.
    transitions: list[tuple[float, str]]
    stats: dict[str, Any] = field(default_factory=dict)

    def ready_after(self, moment: float) -> float | None:
        """When it was READY again after ``moment`` (having left READY after it)."""
        left = False
        for at, state in self.transitions:
            if at < moment:
                continue
            if state != "ready":
                left = True
            elif left:
                return at
        return None

    def first_attempt_after(self, moment: float) -> float | None:
        return next((a for a in self.attempts if a > moment), None)


class Fleet:
    """``count`` ``AsyncConfigCache`` spread over ``tokens``' tenants, in a child process."""

    def __init__(self, target: str, tokens: Mapping[str, str], count: int, prefixes: Sequence[str]) -> None:
        spec = {"target": target, "tokens": dict(tokens), "count": count, "prefixes": list(prefixes)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.config_watchers"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(spec) + "\n")
        self._process.stdin.flush()
        self.count = count

    def wait_ready(self, timeout: float) -> None:
        answer = self._read(timeout)
        if answer.get("event") != "ready":
            raise AssertionError(f"fleet not ready: {answer}")

    def dump(self, timeout: float = 60.0) -> list[FleetCache]:
        assert self._process.stdin is not None
        self._process.stdin.write("dump\n")
        self._process.stdin.flush()
        answer = self._read(timeout)
        return [
            FleetCache(
                c["tenant"],
                c["state"],
                c["position"],
                c["items"],
                c["attempts"],
                [(t, s) for t, s in c["transitions"]],
                c["stats"],
            )
            for c in answer["caches"]
        ]

    def close(self) -> None:
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        if process.poll() is None:
            try:
                process.stdin.write("exit\n")
                process.stdin.flush()
                process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(5)
        for pipe in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._process.stdout is not None
        readable, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not readable:
            raise AssertionError(f"the fleet process said nothing within {timeout:.0f}s")
        line = self._process.stdout.readline()
        if not line:
            raise AssertionError(f"the fleet process ended (exit {self._process.wait(5)})")
        answer: dict[str, Any] = json.loads(line)
        return answer


async def _fleet_main() -> None:
    from config_client import AsyncConfigCache, State

    spec = json.loads(sys.stdin.readline())
    tenants = sorted(spec["tokens"])
    caches: list[AsyncConfigCache] = []
    attempts: list[list[float]] = []
    transitions: list[list[tuple[float, str]]] = []

    def token_of(index: int, token: str) -> Any:
        def token_source() -> str:
            attempts[index].append(time.monotonic())
            return token

        return token_source

    for i in range(spec["count"]):
        tenant = tenants[i % len(tenants)]
        attempts.append([])
        transitions.append([])
        caches.append(
            AsyncConfigCache(spec["target"], token=token_of(i, spec["tokens"][tenant]), prefixes=spec["prefixes"])
        )
    stop = asyncio.Event()

    async def poll() -> None:
        last: list[State | None] = [None] * len(caches)
        while not stop.is_set():
            now = time.monotonic()
            for i, cache in enumerate(caches):
                state = cache.state
                if state is not last[i]:
                    last[i] = state
                    transitions[i].append((now, state.value))
            await asyncio.sleep(0.02)

    poller = asyncio.create_task(poll())
    for cache in caches:
        await cache.start()
    await asyncio.gather(*(c.wait_ready(120) for c in caches))
    _say({"event": "ready", "at": time.monotonic()})
    loop = asyncio.get_running_loop()
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "dump":
            _say(
                {
                    "event": "dump",
                    "caches": [
                        {
                            "tenant": tenants[i % len(tenants)],
                            "state": c.state.value,
                            "position": c.position,
                            "items": len(c),
                            "attempts": attempts[i],
                            "transitions": transitions[i],
                            "stats": vars_of(c.stats()),
                        }
                        for i, c in enumerate(caches)
                    ],
                }
            )
        else:
            break
    stop.set()
    await poller
    await asyncio.gather(*(c.close() for c in caches))


def vars_of(stats: Any) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in stats.__dataclass_fields__}


def _say(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def histogram(offsets: Sequence[float], width: float) -> dict[float, int]:
    """Counts per bin of ``width`` seconds (keyed by the bin's start)."""
    counts: dict[float, int] = defaultdict(int)
    for offset in offsets:
        counts[round((offset // width) * width, 3)] += 1
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    asyncio.run(_fleet_main())
