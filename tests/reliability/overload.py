"""Ingest capacity, a soak at 80% of it, 3× capacity, and recovery, against the stack's bus.

The load of every phase comes from ``wrk`` (C): single domain events for enterprise tenants
(no quota: back pressure must come from the bus's own load shedding, not from a tenant's
bucket). A Python generator offering the load takes the CPU the bus needs, since both share
2 CPUs: in a full run its 5,600 posts/s (3×) left the bus 1,200 answers/s and 266,000 client
timeouts, and its own closed-loop capacity came out at a third of wrk's, so its "80%" soak
ran at a quarter of the bus's capacity.

- capacity (:func:`measure_capacity`): wrk, closed loop, 64 connections; events/s acked;
- phases (:func:`flood`): wrk, paced: each connection pauses between its requests so that
  together they offer the rate; the pause is calibrated for the answers' latency first, and
  the rate achieved is what the report shows. The wrk script tallies the answers by status,
  ``Retry-After`` and second;
- probes (:class:`LoadPool`): worker processes (``spawn``ed, so they inherit no threads)
  posting open loop with ``aiohttp`` (request *i* at ``start + i / rate`` whatever the
  answers), each request's send time, latency, status and ``Retry-After`` kept: the latency
  the report plots.

A sampler thread records RSS of the bus, tailer and consumer (process trees) and the
replication slot's lag once per second.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from kernel.stats import percentile
from tagbus import stack
from tagbus.settings import Settings
from tests.reliability.faults import tree_rss_bytes
from tests.reliability.ledger import enterprise_token

#: Client-side timeout of one request: an answer later than this counts as a timeout.
REQUEST_TIMEOUT = 10.0
TIMEOUT = -1
CONNECT_ERROR = -2

_SLOT_LAG = (
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


@dataclass(frozen=True, slots=True)
class Shot:
    """One request: when it was sent (monotonic), how long it took, the status (or TIMEOUT …)."""

    sent: float
    seconds: float
    status: int
    retry_after: bool


def _body(prefix: str, n: int) -> bytes:
    return (
        b'{"specversion":"1.0","id":"%s-%d","source":"/reliability/soak","type":"reliability.soak",'
        b'"subject":"soak/%s-%d","data":{"n":%d,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'
        % (prefix.encode(), n, prefix.encode(), n, n)
    )


def _session(base_url: str, token: str, connections: int) -> aiohttp.ClientSession:
    """One worker's client: aiohttp, whose pool stays cheap at thousands of connections (httpx's
    did not: at a few hundred requests/s its own pool made the generator the bottleneck)."""
    return aiohttp.ClientSession(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/cloudevents+json"},
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
        # Bounded as a whole, from the moment the request is started (waiting for a connection included).
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def _post(session: aiohttp.ClientSession, body: bytes, shots: list[Shot]) -> None:
    sent = time.monotonic()
    try:
        async with session.post("/v1/events", data=body) as response:
            await response.read()
            status, retry_after = response.status, "Retry-After" in response.headers
    except TimeoutError:
        shots.append(Shot(sent, time.monotonic() - sent, TIMEOUT, False))
        return
    except aiohttp.ClientError:
        shots.append(Shot(sent, time.monotonic() - sent, CONNECT_ERROR, False))
        return
    shots.append(Shot(sent, time.monotonic() - sent, status, retry_after))


async def _open_loop(base_url: str, token: str, rate: float, seconds: float, start: float) -> list[Shot]:
    shots: list[Shot] = []
    prefix = uuid.uuid4().hex[:12]
    # Below the bus's own connection limit: its 503 for too many connections is not the subject here.
    async with _session(base_url, token, connections=1_500) as session:
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        while True:
            due = start + n / rate
            if due - start >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_post(session, _body(prefix, n), shots))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks)
    return shots


def _worker(base_url: str, token: str, rate: float, seconds: float, start: float) -> list[Shot]:
    return asyncio.run(_open_loop(base_url, token, rate, seconds, start))


WRK_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "wrk" / "post_events.lua"


def _wrk(
    settings: Settings, connections: int, seconds: float, *, pause_seconds: float | None = None, tally: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One ``wrk`` run of single-event posts: its figures, and with ``tally`` the answers by kind."""
    token = enterprise_token(settings, f"wrk-{uuid.uuid4().hex[:6]}", "events:write")
    argv = [
        "wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={REQUEST_TIMEOUT:g}s",
        "-s", str(WRK_SCRIPT), f"{settings.base_url}/v1/events", "--", token, f"wrk-{uuid.uuid4().hex[:8]}", "0",
    ]  # fmt: skip
    env = dict(os.environ)
    if pause_seconds is not None:
        env["TAGBUS_WRK_PAUSE_MS"] = f"{pause_seconds * 1000:.3f}"
    if tally:
        env["TAGBUS_WRK_TALLY"] = "1"
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60, env=env).stdout
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if " {" in line}
    return lines["WRKJSON"], lines.get("WRKTALLY")


def measure_capacity(settings: Settings, seconds: float, *, connections: int = 64) -> dict[str, float]:
    """Ingest capacity with ``wrk`` (closed loop, C, so the client is not the bottleneck): 2xx/s."""
    figures, _ = _wrk(settings, connections, seconds)
    duration = figures["duration_us"] / 1e6
    ok = figures["requests"] - figures["non2xx"]
    return {
        "events_per_second": ok / duration,
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "non2xx": figures["non2xx"],
        "seconds": duration,
        "clients": connections,
    }


def flood(settings: Settings, rate: float, seconds: float, *, connections: int = 1_500) -> dict[str, Any]:
    """``rate`` posts/s for ``seconds`` from wrk, summarized like :func:`summarize` (the
    latency percentiles are of all answers: wrk does not split them by status)."""
    pace = connections / rate  # each connection's cycle: its answer's latency, then a pause
    calibration, _ = _wrk(settings, connections, 3, pause_seconds=pace)
    pause = max(0.0, pace - calibration["mean_us"] / 1e6)
    figures, tally = _wrk(settings, connections, seconds, pause_seconds=pause, tally=True)
    assert tally is not None
    duration = figures["duration_us"] / 1e6
    failed = sum(figures[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    statuses = {"2xx": tally["ok"], "429": tally["too_many"], "503": tally["unavailable"], "other": tally["other"]}
    statuses = {k: v for k, v in statuses.items() if v} | ({"timeout": failed} if failed else {})
    answers: dict[int, tuple[int, int]] = {}  # unix second -> (acknowledged, answered)
    for entry in filter(None, tally["seconds"].split(";")):
        second, ok, shed, other = map(int, entry.split())
        acked, answered = answers.get(second, (0, 0))
        answers[second] = (acked + ok, answered + ok + shed + other)
    whole_seconds = sorted(answers)[1:-1]  # the first and last are partial
    return {
        "seconds": duration,
        "sent": figures["requests"] + failed,
        "achieved_rate": (figures["requests"] + failed) / duration,
        "acked_rate": tally["ok"] / duration,
        "statuses": statuses,
        "retry_after": tally["retry_after"],
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "generator": f"wrk, {connections} connections, paced (pause {pause * 1000:.0f} ms after each answer)",
        "acked_per_second_min": min((answers[t][0] for t in whole_seconds), default=0),
        "recovered_after_s": _recovered(answers),
    }


def _ready() -> bool:
    """Run once per worker at start: unpickling it imports this module (seconds on a busy machine)."""
    return True


class LoadPool:
    """A few worker processes that split an open-loop load (the probes) between them."""

    def __init__(self, settings: Settings, *, workers: int = 2) -> None:
        self._settings = settings
        self._workers = workers
        self._pool = multiprocessing.get_context("spawn").Pool(workers)
        self._tokens = [
            enterprise_token(settings, f"soak-{uuid.uuid4().hex[:6]}-{i}", "events:write") for i in range(workers)
        ]
        # Imports done before any timed phase: a worker that starts late would shorten it.
        assert all(self._pool.starmap(_ready, [()] * workers * 4))

    def open(self, rate: float, seconds: float) -> list[Shot]:
        """``rate`` posts/s in total for ``seconds``, open loop, split between the workers."""
        start = time.monotonic() + 0.5  # CLOCK_MONOTONIC is system-wide: the workers share it
        args = [(self._settings.base_url, token, rate / self._workers, seconds, start) for token in self._tokens]
        shots: list[Shot] = []
        for part in self._pool.starmap(_worker, args):
            shots += part
        return shots

    def close(self) -> None:
        self._pool.close()
        self._pool.join()


@dataclass
class Sampler:
    """Once per second: RSS of the app parts (process trees) and the tailer slot's lag."""

    settings: Settings
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="reliability-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        slot = self.settings.tailer().slot_name
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            while not self._stop.is_set():
                status = stack.status()
                sample: dict[str, float] = {"at": time.monotonic()}
                for part in ("bus", "tailer", "consumer"):
                    pid = status[part].pid
                    sample[f"rss_{part}"] = float(tree_rss_bytes(pid)) if pid else 0.0
                try:
                    row = conn.execute(_SLOT_LAG, (slot,)).fetchone()
                except psycopg.Error:
                    row = None
                sample["slot_lag_bytes"] = float(row[0]) if row and row[0] is not None else 0.0
                self.samples.append(sample)
                self._stop.wait(1.0)


def _percentile(values: list[float], q: float) -> float:
    """``q`` in 0–1; 0.0 when there are no values (the report shows a zero, not NaN)."""
    return percentile(values, q * 100) if values else 0.0


def summarize(shots: list[Shot], seconds: float) -> dict[str, Any]:
    """Status classes, Retry-After presence and latency of a phase's successful requests."""
    statuses: Counter[str] = Counter()
    for shot in shots:
        if 200 <= shot.status < 300:
            statuses["2xx"] += 1
        elif shot.status in (429, 503):
            statuses[str(shot.status)] += 1
        elif shot.status in (TIMEOUT, CONNECT_ERROR):
            statuses["timeout"] += 1
        else:
            statuses["other"] += 1
    ok = [s.seconds * 1000 for s in shots if 200 <= s.status < 300]
    return {
        "seconds": seconds,
        "sent": len(shots),
        "achieved_rate": len(shots) / seconds if seconds else 0.0,
        "acked_rate": statuses["2xx"] / seconds if seconds else 0.0,
        "statuses": dict(statuses),
        "retry_after": sum(1 for s in shots if s.status in (429, 503) and s.retry_after),
        "p50_ms": _percentile(ok, 0.50),
        "p99_ms": _percentile(ok, 0.99),
    }


def recovered_after(shots: list[Shot], *, share: float = 0.99) -> float | None:
    """Seconds from a phase's first post until every later second's posts were acknowledged
    (at least ``share`` of them): how long the bus took to serve the load fully again."""
    if not shots:
        return None
    start = min(shot.sent for shot in shots)
    answers: dict[int, tuple[int, int]] = {}
    for shot in shots:
        acked, answered = answers.get(int(shot.sent - start), (0, 0))
        answers[int(shot.sent - start)] = (acked + (200 <= shot.status < 300), answered + 1)
    return _recovered(answers, share=share)


def _recovered(answers: dict[int, tuple[int, int]], *, share: float = 0.99) -> float | None:
    """:func:`recovered_after` over (acknowledged, answered) counts per second."""
    if not answers:
        return None
    first = min(answers)
    recovered: int | None = None
    for second in sorted(answers, reverse=True):
        acked, answered = answers[second]
        if acked < share * answered:
            break
        recovered = second
    return None if recovered is None else float(recovered - first)


def per_second(shots: list[Shot], origin: float, samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """One point per second since ``origin``: latency p50/p99 of the posts sent then, and slot lag."""
    by_second: dict[int, list[float]] = {}
    for shot in shots:
        if 200 <= shot.status < 300:
            by_second.setdefault(int(shot.sent - origin), []).append(shot.seconds * 1000)
    lag = {int(s["at"] - origin): s["slot_lag_bytes"] for s in samples}
    points = []
    for second in sorted(set(by_second) | set(lag)):
        values = by_second.get(second, [])
        points.append(
            {
                "t": float(second),
                # NaN, not 0, for a second without an acknowledged post: the plot shows a gap.
                "p50_ms": statistics.median(values) if values else float("nan"),
                "p99_ms": _percentile(values, 0.99) if values else float("nan"),
                "slot_lag_bytes": lag.get(second, 0.0),
            }
        )
    return points


def memory(samples: list[dict[str, float]], since: float, until: float, warm_up: float) -> dict[str, dict[str, float]]:
    """RSS per part at the end of the warm-up and at the end of the soak, and the growth between."""
    window = [s for s in samples if since <= s["at"] <= until]
    warm = [s for s in window if s["at"] >= since + warm_up] or window
    result: dict[str, dict[str, float]] = {}
    for part in ("bus", "tailer", "consumer"):
        if not warm:
            continue
        # Medians of a few samples on each side: one GC or JIT moment must not decide the figure.
        start = statistics.median(s[f"rss_{part}"] for s in warm[:5])
        end = statistics.median(s[f"rss_{part}"] for s in warm[-5:])
        result[part] = {
            "start": start,
            "end": end,
            "growth_percent": (end - start) / start * 100 if start else 0.0,
        }
    return result
