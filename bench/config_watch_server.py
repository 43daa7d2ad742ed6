"""A private config server fed by a synthetic source: how much one server process holds and delivers.

The scale row of the ``config_watch`` benchmark must not be bounded by the pipeline in front of
the server (bus, WAL, Kinesis), so the server here takes its changes from
:class:`SyntheticSource`, an in-process :class:`config_server.source.ChangeSource` that makes up
``config.set`` changes at a rate set from outside, round-robin over its tenants (at ``R``
changes/s over ``T`` tenants, each tenant changes ``R / T`` times a second). Each change's
``updated_at`` is the wall-clock moment it was made, so a watcher's delay is ``received −
updated_at``: the server's fan-out, gRPC and the watcher's own loop, nothing upstream.

The parent (:class:`ServerProcess`) starts ``python -m bench.config_watch_server SPEC``, reads
``LISTENING <port>``, measures the process from ``/proc/<pid>``, and steers the source with
``RATE <changes/s>`` lines; ``STOP`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import REPO_ROOT
from config_server.server import ConfigServer
from config_server.settings import ConfigServerSettings
from config_server.source import ChangeSink
from kernel.auth import AuthSettings, TokenVerifier
from projections.model import ConfigChange, ConfigKey

#: First synthetic position: any positive start works; a large one looks like an LSN.
FIRST_POSITION = 1 << 32


class SyntheticSource:
    """Changes made up at :attr:`rate` per second over ``tenants``, each with ``keys`` keys."""

    def __init__(self, tenants: list[str], keys: int, *, tick: float = 0.005) -> None:
        self.tenants = tenants
        self.keys = [ConfigKey("tenantconfig", f"cw/k{i:03d}") for i in range(keys)]
        self.rate = 0.0
        self.made = 0
        self._tick = tick
        self._versions = [[1] * keys for _ in tenants]
        self._cursor = 0
        self._position = FIRST_POSITION

    def _change(self, tenant: int, key: int, now: datetime) -> ConfigChange:
        self._position += 1
        return ConfigChange(
            tenant=self.tenants[tenant],
            key=self.keys[key],
            value={"n": self._versions[tenant][key]},
            version=self._versions[tenant][key],
            position=self._position,
            updated_at=now,
        )

    def run(self, sink: ChangeSink, stop: threading.Event) -> None:
        now = datetime.now(UTC)
        sink.load(self._change(t, k, now) for t in range(len(self.tenants)) for k in range(len(self.keys)))
        sink.caught_up(lag_ms=0)
        owed = 0.0
        last = time.monotonic()
        last_progress = last
        while not stop.wait(self._tick):
            at = time.monotonic()
            owed += self.rate * (at - last)
            last = at
            batch = []
            now = datetime.now(UTC)
            while owed >= 1:
                owed -= 1
                tenant = self._cursor % len(self.tenants)
                key = (self._cursor // len(self.tenants)) % len(self.keys)
                self._cursor += 1
                self._versions[tenant][key] += 1
                batch.append(self._change(tenant, key, now))
            if batch:
                sink.apply(batch)
                self.made += len(batch)
            if at - last_progress >= 1.0:
                sink.caught_up(lag_ms=0)
                last_progress = at


@dataclass(frozen=True, slots=True)
class ServerSpec:
    tenants: list[str]
    keys: int
    jwt_secret: str
    audience: str
    max_streams_per_tenant: int


class ServerProcess:
    """The parent's handle on a private config server child process."""

    def __init__(self, spec: ServerSpec) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cw-server-")
        path = Path(self._dir.name) / "spec.json"
        path.write_bytes(
            orjson.dumps(
                {
                    "tenants": spec.tenants,
                    "keys": spec.keys,
                    "jwt_secret": spec.jwt_secret,
                    "audience": spec.audience,
                    "max_streams_per_tenant": spec.max_streams_per_tenant,
                }
            )
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.config_watch_server", str(path)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if line[:1] != ["LISTENING"]:
            self.stop()
            raise RuntimeError(f"the private config server did not start: {line}")
        self.target = f"127.0.0.1:{line[1]}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def set_rate(self, changes_per_second: float) -> int:
        """Make changes at this rate from now on; returns how many were made so far."""
        self._send(f"RATE {changes_per_second}")
        assert self._proc.stdout is not None
        return int(self._proc.stdout.readline().split()[1])

    def stop(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self._send("STOP")
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()


# --------------------------------------------------------------------------- the child


async def _child(spec: dict[str, Any]) -> None:
    source = SyntheticSource(spec["tenants"], spec["keys"])
    settings = ConfigServerSettings(
        grpc_port=0,
        http_port=0,
        max_streams_per_tenant=spec["max_streams_per_tenant"],
        # The bench's streams are opened together and held for minutes: no lifetime cut mid-run.
        stream_lifetime_seconds=3600.0,
    )
    verifier = TokenVerifier(AuthSettings(jwt_secret=spec["jwt_secret"], audience=spec["audience"]))
    server = ConfigServer(settings, source=source, verifier=verifier, tags=frozenset({"tenantconfig"}))
    await server.start()
    print(f"LISTENING {server.grpc_port}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "STOP":
            break
        if line[0] == "RATE":
            source.rate = float(line[1])
            print(f"MADE {source.made}", flush=True)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = orjson.loads(Path(args[0]).read_bytes())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
