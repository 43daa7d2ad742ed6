"""Fault injection against the local stack, and one scenario shape: load, faults, recovery, ledger check.

Every fault acts on a real process of the stack (found through its pid file, or as a child of
the consumer part for the KCL daemon and its record processors):

- ``kill -9``: the part's process (or the daemon / a processor), then ``tagbus up`` brings the
  part back the way an operator or a supervisor would;
- outages of kinesis-mock, DynamoDB Local and moto are ``SIGSTOP`` … ``SIGCONT`` of the
  part's process group: the endpoint hangs (connections accepted by the kernel, no answer),
  which is the harder case for clients than a refused connection, and the emulators keep
  their state. A stop+start would lose it: moto keeps SSM in memory, kinesis-mock persists
  only every second, so a restart could drop records it had acknowledged — an emulator
  artefact, not a pipeline fault;
- PostgreSQL: ``pg_ctl stop -m fast`` (clean) or ``-m immediate`` (crash, WAL recovery at
  start), then ``tagbus up``.

:class:`Mode` switches between the short run (every fault once, 5 s outages; what CI runs)
and the full run (``TAGBUS_RELIABILITY=full``: 3 times each, 30 s outages).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.envelope import CONFIG_SET
from producers.client import TagbusClient, new_event
from tagbus import install, lifecycle, stack
from tagbus.compose import build_router
from tagbus.settings import Settings
from tests.fixtures import waiting
from tests.reliability.ledger import LedgerReport, LoadDriver, check, enterprise_token

MODE_VARIABLE = "TAGBUS_RELIABILITY"


@dataclass(frozen=True, slots=True)
class Mode:
    """How hard one run pushes: repeats per kill, outage length, soak and overload durations."""

    name: str
    kills: int
    outage_seconds: float
    soak_seconds: float
    overload_seconds: float
    capacity_seconds: float

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Mode:
        value = (os.environ if environ is None else environ).get(MODE_VARIABLE, "short")
        if value == "full":
            return cls("full", kills=3, outage_seconds=30, soak_seconds=300, overload_seconds=60, capacity_seconds=10)
        return cls("short", kills=1, outage_seconds=5, soak_seconds=20, overload_seconds=5, capacity_seconds=3)

    @property
    def writes_report(self) -> bool:
        """Plain CI runs (no variable) leave ``reports/`` alone; ``make reliability`` writes it."""
        return MODE_VARIABLE in os.environ


@dataclass(slots=True)
class FaultResult:
    """One fault kind's outcome, as the report shows it."""

    kind: str
    method: str
    injected: int
    acked: int
    unacked: int
    lost: int
    mismatches: int
    duplicated: int
    resent_on_stream: int
    recovery_seconds: float | None
    ok: bool
    notes: list[str] = field(default_factory=list)


# -- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: the JVM forks from worker threads)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(found))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def part_pid(part: str) -> int:
    pid = stack.status()[part].pid
    if pid is None:
        raise AssertionError(f"{part} is not running")
    return pid


def kcl_daemon_pid() -> int | None:
    """The MultiLangDaemon JVM: the Java child of the ``tagbus consumer`` process (None between restarts)."""
    for child in children(part_pid("consumer")):
        if "java" in cmdline(child).split(" ", 1)[0]:
            return child
    return None


def processor_pids() -> list[int]:
    """The Python record processors the daemon spawned (one per leased shard)."""
    daemon = kcl_daemon_pid()
    return [] if daemon is None else [p for p in children(daemon) if "tagbus.processor" in cmdline(p)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> bool:
    """:func:`tests.fixtures.waiting.wait_for`, polling the stack's parts at a gentler pace by default."""
    return waiting.wait_for(predicate, what, timeout, interval=interval)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the consumer is a JVM plus Pythons)."""
    total = 0
    pending = [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while pending:
        current = pending.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        pending += children(current)
    return total


# -- faults ---------------------------------------------------------------------------------


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_part(part: str) -> None:
    """``kill -9`` a part's main process, wait until it is gone, then ``tagbus up``."""
    pid = part_pid(part)
    kill9(pid)
    wait_for(lambda: stack.status()[part].pid is None, 15, f"{part} gone after kill -9")
    lifecycle.up()


def kill_kcl_daemon() -> None:
    """``kill -9`` the JVM; the ``tagbus consumer`` part must start a new one (and its processors) itself."""
    consumer = part_pid("consumer")
    daemon = kcl_daemon_pid()
    if daemon is None:
        raise AssertionError("the consumer part has no Java child (KCL daemon)")
    kill9(daemon)
    wait_for(lambda: bool(processor_pids()), 120, "a new KCL daemon with a record processor after kill -9")
    assert stack.status()["consumer"].pid == consumer, "the consumer part itself died with its JVM"


def kill_processor() -> None:
    """``kill -9`` one Python record processor; the daemon exits (KCL does), the part restarts it."""
    before = processor_pids()
    if not before:
        raise AssertionError("no record processor is running under the KCL daemon")
    consumer = part_pid("consumer")
    victim = random.choice(before)
    kill9(victim)
    wait_for(
        lambda: bool(processor_pids()) and victim not in processor_pids(), 120, "a new record processor after kill -9"
    )
    assert stack.status()["consumer"].pid == consumer, "the consumer part itself died with its processor"


@contextmanager
def paused(part: str) -> Iterator[None]:
    """``SIGSTOP`` a part's process group for the duration; ``SIGCONT`` even if the body fails."""
    pid = part_pid(part)
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def pause_part(part: str, seconds: float) -> None:
    """Hang ``part`` for ``seconds``: the outage's length is the fault itself."""
    with paused(part):
        time.sleep(seconds)


def restart_postgres(mode: str) -> None:
    """``pg_ctl stop -m <mode>`` on the stack's cluster, then ``tagbus up`` (start and catch up)."""
    cfg = stack.StackConfig.from_env()
    pg_ctl = install.find_postgres_bindir() / "pg_ctl"
    extra: dict[str, Any] = {}
    if os.geteuid() == 0:
        import pwd

        account = pwd.getpwnam("postgres")
        extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    subprocess.run(
        [str(pg_ctl), "-D", str(cfg.state / "pg"), "-m", mode, "-w", "-t", "60", "stop"],
        check=True,
        capture_output=True,
        cwd=cfg.state,
        **extra,
    )
    wait_for(lambda: stack.status()["postgres"].pid is None, 30, "postgres gone after pg_ctl stop")
    lifecycle.up()


# -- recovery -------------------------------------------------------------------------------


class Probe:
    """Posts one fresh ``config.set`` and waits until the read model shows it: the pipeline works."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tenant = f"probe-{uuid.uuid4().hex[:8]}"
        self._router = build_router(settings)
        token = enterprise_token(settings, self._tenant, "events:write config:read")
        self._client = TagbusClient(settings.base_url, lambda: token, attempts=200, max_delay=0.5, timeout=5.0)

    def seconds_until_through(self, since: float, timeout: float = 180.0) -> float:
        """Post now; the seconds from ``since`` until the event reached its read model."""
        key = f"tenantconfig:probe/p{uuid.uuid4().hex[:8]}"
        answer = self._client.post(new_event(CONFIG_SET, "/reliability/probe", {"key": key, "value": 1}))
        version = int(answer["version"])

        def through() -> bool:
            try:
                item = self._router.get(self._tenant, key)
            except Exception:  # a read model still recovering: not through yet
                return False
            return item is not None and item.version == version

        wait_for(through, timeout, f"probe {key} in its read model", interval=0.05)
        return round(time.monotonic() - since, 2)

    def close(self) -> None:
        self._client.close()


# -- the scenario ---------------------------------------------------------------------------


def duplicated_effects(report: LedgerReport) -> int:
    """Events stored more than once (the only effect a duplicate could have: projections are versioned)."""
    return sum(1 for p in report.problems if p.startswith("stored ") and " times: " in p)


def run_fault(
    settings: Settings,
    kind: str,
    method: str,
    inject: Callable[[], None],
    *,
    times: int,
    lead_in: float = 2.0,
    gap: tuple[float, float] = (1.0, 3.0),
    pace: float = 0.05,
    check_timeout: float = 120.0,
    recovery_from_start: bool = True,
) -> tuple[FaultResult, LedgerReport]:
    """Steady load; ``inject()`` ``times`` times at random moments; recovery probe; ledger check.

    ``inject`` returns when the fault is over (the part restarted, or resumed). Recovery is
    measured until a fresh event posted then reaches its read model, from the injection
    (a kill or restart: the restart is part of the recovery) or, with
    ``recovery_from_start=False``, from the end of an outage of a given length.
    """
    driver = LoadDriver(settings, events=10**7, tenants=5, keys=20, threads=4, max_seconds=3600, pace=pace).start()
    probe = Probe(settings)
    recoveries: list[float] = []
    try:
        # Not synchronisation: the faults strike a load that has run for a while, at random moments.
        time.sleep(lead_in)
        for _ in range(times):
            time.sleep(random.uniform(*gap))
            assert driver.running, "the load driver stopped before the fault"
            began = time.monotonic()
            inject()
            ended = time.monotonic()
            recoveries.append(probe.seconds_until_through(began if recovery_from_start else ended))
        time.sleep(1.0)  # the load goes on past the recovery, so the ledger holds events sent after it
    finally:
        driver.stop()
        probe.close()
    ledger = driver.join()
    report = check(ledger, settings, timeout=check_timeout)
    result = FaultResult(
        kind=kind,
        method=method,
        injected=times,
        acked=report.acked,
        unacked=report.unacked,
        lost=report.lost,
        mismatches=report.mismatches,
        duplicated=duplicated_effects(report),
        resent_on_stream=report.duplicates_on_stream,
        recovery_seconds=max(recoveries) if recoveries else None,
        ok=report.ok,
    )
    return result, report
