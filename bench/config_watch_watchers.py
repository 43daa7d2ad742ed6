"""Watch streams held by a child process, so the load generator and the watchers do not share a core.

The parent (:class:`WatcherProcess`) writes a spec (target, tokens, one ``(tenant, prefixes)``
per stream), starts ``python -m bench.config_watch_watchers SPEC``, and waits for ``READY``:
every stream has its snapshot. The child then records every change it receives as
``(stream, key, version, received, updated_at)`` (both wall-clock seconds; the parent matches
them to the 201 of each post, or to the synthetic source's stamp) until the parent writes
``STOP``; it writes the records to the spec's ``out`` file and prints ``DONE``.

Streams share a few ``grpc.aio`` channels, each on its own connection (a local subchannel
pool: without it, channels to one target share one HTTP/2 connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import orjson

from bench import REPO_ROOT
from config_api.v1 import config_pb2, config_pb2_grpc

#: Streams opened at once while starting (so the server is not asked for thousands of
#: snapshots in the same instant; the figures are of the steady state, not of a herd).
OPEN_AT_ONCE = 200


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What a watcher process holds: ``streams`` of ``(tenant, prefixes)``, tokens by tenant."""

    target: str
    tokens: dict[str, str]
    streams: list[tuple[str, list[str]]]
    channels: int = 4

    def to_json(self, out: Path) -> bytes:
        return orjson.dumps(
            {
                "target": self.target,
                "tokens": self.tokens,
                "streams": self.streams,
                "channels": self.channels,
                "out": str(out),
            }
        )


@dataclass
class WatchRecords:
    """What a watcher process received after its streams were ready."""

    stream_tenants: list[str]
    #: Per change: stream index, key, version, wall time received, wall time of ``updated_at``.
    changes: list[tuple[int, str, int, float, float]]
    snapshot_entries: int
    resyncs: int
    progress: int
    errors: dict[str, int]
    ready_seconds: float
    max_source_lag_ms: int
    rss_bytes: int
    cpu_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def deliveries(self) -> list[tuple[str, str, int, float, float]]:
        """Each change as ``(tenant, key, version, received, updated_at)``."""
        tenants = self.stream_tenants
        return [(tenants[i], key, version, received, updated) for i, key, version, received, updated in self.changes]


class WatcherProcess:
    """The parent's handle on one watcher child process."""

    def __init__(self, spec: WatchSpec) -> None:
        self.spec = spec
        self._dir = tempfile.TemporaryDirectory(prefix="cw-watchers-")
        self._out = Path(self._dir.name) / "records.json"
        spec_path = Path(self._dir.name) / "spec.json"
        spec_path.write_bytes(spec.to_json(self._out))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.config_watch_watchers", str(spec_path)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _line(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"watcher process {self._proc.pid} exited ({self._proc.wait()}) before answering")
        return line.strip()

    def wait_ready(self) -> float:
        """Block until every stream has its snapshot; the seconds that took (the child's own clock)."""
        while True:
            line = self._line()
            if line.startswith("READY "):
                return float(line.split()[1])
            if line.startswith("FAILED "):
                raise RuntimeError(f"watcher process: {line[7:]}")

    def stop(self) -> WatchRecords:
        """Stop the streams and read what they received."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("STOP\n")
        self._proc.stdin.flush()
        while self._line() != "DONE":
            pass
        self._proc.wait(timeout=60)
        raw = orjson.loads(self._out.read_bytes())
        self._dir.cleanup()
        return WatchRecords(
            stream_tenants=[tenant for tenant, _ in self.spec.streams],
            changes=[tuple(c) for c in raw["changes"]],
            snapshot_entries=raw["snapshot_entries"],
            resyncs=raw["resyncs"],
            progress=raw["progress"],
            errors=raw["errors"],
            ready_seconds=raw["ready_seconds"],
            max_source_lag_ms=raw["max_source_lag_ms"],
            rss_bytes=raw["rss_bytes"],
            cpu_seconds=raw["cpu_seconds"],
        )

    def kill(self) -> None:
        """Stop the child at once (after a failure elsewhere)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._dir.cleanup()


# --------------------------------------------------------------------------- the child


class _Watchers:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.changes: list[tuple[int, str, int, float, float]] = []
        self.snapshot_entries = 0
        self.resyncs = 0
        self.progress = 0
        self.max_lag = 0
        self.errors: Counter[str] = Counter()
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.recording = False

    async def watch(self, index: int, stub: config_pb2_grpc.ConfigServiceAsyncStub, gate: asyncio.Semaphore) -> None:
        """Hold stream ``index``; when the server ends it (its lifetime cap), resume from the last position."""
        tenant, prefixes = self.spec["streams"][index]
        metadata = (("authorization", f"Bearer {self.spec['tokens'][tenant]}"),)
        changes = self.changes
        now = time.time
        opened = False
        since: int | None = None
        await gate.acquire()
        try:
            while True:
                request = config_pb2.WatchRequest(prefixes=prefixes, since=since)
                try:
                    async for message in stub.Watch(request, metadata=metadata):
                        kind = message.WhichOneof("kind")
                        if kind == "change":
                            change = message.change
                            since = change.position
                            if self.recording:
                                stamp = change.updated_at
                                changes.append(
                                    (index, change.key, change.version, now(), stamp.seconds + stamp.nanos * 1e-9)
                                )
                        elif kind == "snapshot":
                            self.snapshot_entries += len(message.snapshot.entries)
                            if message.snapshot.done:
                                since = message.snapshot.position
                                if not opened:
                                    opened = True
                                    gate.release()
                                    self._one_ready()
                        elif kind == "progress":
                            self.progress += 1
                            since = message.progress.position
                            self.max_lag = max(self.max_lag, message.progress.source_lag_ms)
                        elif kind == "resync":
                            self.resyncs += 1
                            since = None
                    self.errors["ended"] += 1
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.CANCELLED:
                        return
                    self.errors[e.code().name] += 1
                    if e.code() != grpc.StatusCode.UNAVAILABLE or not opened:
                        return
                    await asyncio.sleep(0.5)
        finally:
            if not opened:
                gate.release()
                # Counted as ready so the parent is not kept waiting; its error is reported.
                self._one_ready()

    def _one_ready(self) -> None:
        self.ready += 1
        if self.ready == len(self.spec["streams"]):
            self.all_ready.set()


async def _child(spec: dict[str, Any]) -> None:
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    channels = [grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(spec["channels"])]
    stubs = [config_pb2_grpc.ConfigServiceStub(c) for c in channels]
    watchers = _Watchers(spec)
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    tasks = [asyncio.create_task(watchers.watch(i, stubs[i % len(stubs)], gate)) for i in range(len(spec["streams"]))]
    if not tasks:
        watchers.all_ready.set()
    await watchers.all_ready.wait()
    watchers.recording = True
    ready_seconds = time.monotonic() - started
    print(f"READY {ready_seconds:.3f}", flush=True)
    cpu = time.process_time()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("STOP", ""):
        pass
    watchers.recording = False
    cpu = time.process_time() - cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)
    status = Path("/proc/self/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    Path(spec["out"]).write_bytes(
        orjson.dumps(
            {
                "changes": watchers.changes,
                "snapshot_entries": watchers.snapshot_entries,
                "resyncs": watchers.resyncs,
                "progress": watchers.progress,
                "errors": dict(watchers.errors),
                "ready_seconds": ready_seconds,
                "max_source_lag_ms": watchers.max_lag,
                "rss_bytes": rss_kb * 1024,
                "cpu_seconds": cpu,
            }
        )
    )
    print("DONE", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = orjson.loads(Path(args[0]).read_bytes())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
