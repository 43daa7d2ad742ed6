"""KCL MultiLangDaemon properties and launcher for the tagbus consumer.

The daemon (Java, KCL 3.x) owns leases in DynamoDB and reads the Kinesis stream; it runs
our record processor (amazon-kclpy v3 protocol over stdin/stdout) as a child process per
shard. This module renders its ``.properties`` file from :class:`DaemonSettings` and
starts ``java -cp '<jars>/*' software.amazon.kinesis.multilang.MultiLangDaemon
--properties-file <file> --log-configuration <logback.xml>``.

Choices made for the local emulators (kinesis-mock, DynamoDB Local) and why:

* ``retrievalMode = POLLING``: the default fan-out mode needs ``SubscribeToShard`` over
  HTTP/2 event streams, which kinesis-mock does not serve; polling uses ``GetRecords``.
* ``kinesisEndpoint = http://127.0.0.1:4568``: the KCL's Kinesis client speaks HTTP/2;
  kinesis-mock's plain port answers HTTP/2 cleartext (prior knowledge), so no TLS trust
  settings are needed for its self-signed certificate on 4567. CBOR stays on: kinesis-mock
  reads and writes ``application/x-amz-cbor-1.1``.
* ``disableWorkerMetrics = true``: KCL 3.x's worker-utilization balancing reads host CPU
  from cgroups/EC2 metadata; locally it only logs noise and skews lease assignment.
* ``metricsLevel = NONE``: the MultiLangDaemon has no CloudWatch endpoint override, so
  metrics would go to real CloudWatch; NONE publishes nothing.
* ``idleTimeBetweenReadsInMillis = 200``: the KCL's poll interval for ``GetRecords``, and the
  floor of freshness. KCL 3.1.3's multilang passes it to ``PollingConfig`` (its default is
  1,500 ms when the property is absent); 200 ms is both the KCL's minimum (smaller values
  are raised to it with a warning) and Kinesis's 5 reads/s per shard, so it is the fastest
  polling the shard allows for one consumer application. ``millisBehindLatestThresholdFor
  ReducedTps`` stays 0 (off): it slows polling while ``MillisBehindLatest`` is below the
  threshold, and kinesis-mock always reports 0.
* Short ``failoverTimeMillis``/``leaseAssignmentIntervalMillis``/``shardSyncIntervalMillis``
  so a fresh worker takes its lease within seconds rather than the production ~10-20 s.
* Table billing modes are left at KCL's default (PAY_PER_REQUEST), which DynamoDB Local
  accepts for the lease, WorkerMetricStats and CoordinatorState tables and the lease
  table's GSI; deletion protection and PITR stay off, so KCL never asks for them.
* Not tunable from here (hard-coded in KCL 3.1.3's Scheduler): with an empty lease table a
  new application waits a random 1-30 s before its first shard sync, and a new lease
  table's GSI is polled every 10 s. Only the first start of an application pays this;
  the tables live on in DynamoDB Local's ``-sharedDb`` file.

No orphans, no twins. The daemon dies with the consumer process that started it, however
that ends (``kill -9`` included): it is started with the parent-death signal set to
SIGKILL. Its record processors speak the protocol on stdin, which reaches end-of-file when
the JVM dies, and they exit then. Processes of a daemon that outlived its consumer anyway
(an older run, before this) are found by :func:`daemon_processes`, which ``tagbus down`` and
``tagbus up`` use. And :func:`run_daemon` first claims the worker id on this host
(:class:`~consumers.worker_lock.WorkerLock`): a second consumer with the same id is refused
instead of fighting the first over every lease.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from consumers.worker_lock import WorkerLock

__all__ = [
    "MAIN_CLASS",
    "RUN_DIR_VARIABLE",
    "DaemonSettings",
    "daemon_argv",
    "daemon_processes",
    "render_logback",
    "render_properties",
    "run_daemon",
    "start_daemon",
    "write_config",
]

#: KCL application name: also the name of its DynamoDB lease table.
APPLICATION_NAME = "tagbus-consumer"
MAIN_CLASS = "software.amazon.kinesis.multilang.MultiLangDaemon"
#: KCL's ``PollingConfig.MIN_IDLE_MILLIS_BETWEEN_READS``: 5 ``GetRecords`` per second and shard.
MIN_IDLE_TIME_BETWEEN_READS_MS = 200
#: Set in the daemon's environment (and so its processors') to its working directory: how
#: :func:`daemon_processes` knows a processor whose command line names no directory.
RUN_DIR_VARIABLE = "TAGBUS_CONSUMER_RUN_DIR"
#: ``PR_SET_PDEATHSIG`` from ``<linux/prctl.h>``.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class DaemonSettings:
    """What the MultiLangDaemon needs to know; rendered into its ``.properties`` file.

    ``processor_command`` is the argv of the record processor the daemon spawns per shard,
    e.g. ``("/repo/.venv/bin/python", "-m", "tagbus.processor")``.
    """

    stream_name: str
    processor_command: tuple[str, ...]
    application_name: str = APPLICATION_NAME
    region: str = "us-east-1"
    kinesis_endpoint: str | None = None
    dynamodb_endpoint: str | None = None
    initial_position: str = "TRIM_HORIZON"
    metrics_level: str = "NONE"
    worker_id: str | None = None
    max_records: int = 1000
    idle_time_between_reads_ms: int = MIN_IDLE_TIME_BETWEEN_READS_MS
    failover_time_ms: int = 3000
    lease_assignment_interval_ms: int = 1000
    shard_sync_interval_ms: int = 2000
    parent_shard_poll_interval_ms: int = 1000
    task_backoff_time_ms: int = 500
    shutdown_grace_ms: int = 5000
    processing_language: str = "python/3"
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.idle_time_between_reads_ms < MIN_IDLE_TIME_BETWEEN_READS_MS:
            raise ValueError(
                f"idle_time_between_reads_ms must be at least {MIN_IDLE_TIME_BETWEEN_READS_MS} "
                "(Kinesis serves 5 GetRecords/s per shard; the KCL raises smaller values to it)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str], processor_command: Sequence[str], **overrides: object) -> DaemonSettings:
        """Settings from tagbus's environment variables (``.tagbus/env``); call at an entry point."""
        base: dict[str, object] = {
            "stream_name": env.get("TAGBUS_STREAM_NAME", "tagbus-events"),
            "processor_command": tuple(processor_command),
            "application_name": application_name(env),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            "kinesis_endpoint": env.get("AWS_ENDPOINT_URL_KINESIS") or None,
            "dynamodb_endpoint": env.get("AWS_ENDPOINT_URL_DYNAMODB") or None,
            "worker_id": worker_id(env),
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


def application_name(env: Mapping[str, str]) -> str:
    """The KCL application (and lease table): ``TAGBUS_CONSUMER_APPLICATION``, else ``tagbus-consumer``."""
    return env.get("TAGBUS_CONSUMER_APPLICATION") or APPLICATION_NAME


def worker_id(env: Mapping[str, str]) -> str:
    """The KCL worker id: ``TAGBUS_CONSUMER_WORKER_ID``, else stable per host.

    A stable id lets a restarted consumer carry on with the leases it held at once; a random
    one (the KCL default) waits until the old leases expire and the leader hands them out
    again. Two consumers on one host need different ids (:func:`run_daemon` refuses a
    second one).
    """
    return env.get("TAGBUS_CONSUMER_WORKER_ID") or f"{application_name(env)}@{socket.gethostname()}"


def render_properties(settings: DaemonSettings, *, executable: str | None = None) -> str:
    """The MultiLangDaemon ``.properties`` text for ``settings``.

    The daemon splits ``executableName`` on spaces; ``executable`` overrides it (e.g. a
    wrapper script when an argument contains whitespace).
    """
    command = executable if executable is not None else _executable_name(settings.processor_command)
    props: dict[str, str] = {
        "executableName": command,
        "streamName": settings.stream_name,
        "applicationName": settings.application_name,
        "AwsCredentialsProvider": "DefaultCredentialsProvider",
        "processingLanguage": settings.processing_language,
        "regionName": settings.region,
        "initialPositionInStream": settings.initial_position,
        "retrievalMode": "POLLING",
        "maxRecords": str(settings.max_records),
        "idleTimeBetweenReadsInMillis": str(settings.idle_time_between_reads_ms),
        "failoverTimeMillis": str(settings.failover_time_ms),
        "leaseAssignmentIntervalMillis": str(settings.lease_assignment_interval_ms),
        "shardSyncIntervalMillis": str(settings.shard_sync_interval_ms),
        "parentShardPollIntervalMillis": str(settings.parent_shard_poll_interval_ms),
        "taskBackoffTimeMillis": str(settings.task_backoff_time_ms),
        "shutdownGraceMillis": str(settings.shutdown_grace_ms),
        "metricsLevel": settings.metrics_level,
        "disableWorkerMetrics": "true",
        "cleanupLeasesUponShardCompletion": "true",
        "validateSequenceNumberBeforeCheckpointing": "true",
        # Idle shards get empty calls, in which the processor takes the checkpoint its interval
        # held back: without them the last records of a burst stay unconfirmed until the next.
        "callProcessRecordsEvenForEmptyRecordList": "true",
    }
    if settings.kinesis_endpoint:
        props["kinesisEndpoint"] = settings.kinesis_endpoint
    if settings.dynamodb_endpoint:
        props["dynamoDBEndpoint"] = settings.dynamodb_endpoint
    if settings.worker_id:
        props["workerId"] = settings.worker_id
    props.update(settings.extra)
    lines = ["# generated by consumers.daemon; edits are overwritten"]
    lines += [f"{key} = {_escape(value)}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def render_logback(*, level: str = "INFO") -> str:
    """A logback config: KCL at ``level``, the AWS SDK and Netty quiet (their default is DEBUG)."""
    return f"""<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{{HH:mm:ss.SSS}} %-5level [%thread] %logger{{36}} - %msg%n</pattern></encoder>
  </appender>
  <logger name="software.amazon.kinesis" level="{level}"/>
  <!-- KCL 3.x logs lease assignment and leader election every second at INFO -->
  <logger name="software.amazon.kinesis.coordinator.assignment" level="WARN"/>
  <logger name="software.amazon.kinesis.leases.DynamoDBLockBasedLeaderDecider" level="WARN"/>
  <logger name="software.amazon.kinesis.leases.dynamodb.DynamoDBLeaseDiscoverer" level="WARN"/>
  <!-- and every message to/from the processor -->
  <logger name="software.amazon.kinesis.multilang.MessageWriter" level="WARN"/>
  <logger name="software.amazon.kinesis.multilang.LineReaderTask" level="WARN"/>
  <logger name="software.amazon.kinesis.multilang.MultiLangProtocol" level="WARN"/>
  <logger name="software.amazon.awssdk" level="WARN"/>
  <logger name="io.netty" level="WARN"/>
  <root level="WARN"><appender-ref ref="STDOUT"/></root>
</configuration>
"""


def write_config(settings: DaemonSettings, directory: Path, *, log_level: str = "INFO") -> tuple[Path, Path]:
    """Write ``<app>.properties`` and ``logback.xml`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    executable: str | None = None
    if any(not arg or any(ch.isspace() for ch in arg) for arg in settings.processor_command):
        wrapper = directory / "processor.sh"
        wrapper.write_text("#!/bin/sh\nexec " + shlex.join(settings.processor_command) + "\n")
        wrapper.chmod(0o755)
        executable = str(wrapper)
    properties = directory / f"{settings.application_name}.properties"
    properties.write_text(render_properties(settings, executable=executable))
    logback = directory / "logback.xml"
    logback.write_text(render_logback(level=log_level))
    return properties, logback


def daemon_argv(
    properties: Path,
    *,
    jars_dir: Path,
    java: str = "java",
    logback: Path | None = None,
    jvm_options: Sequence[str] = ("-Xmx512m",),
) -> list[str]:
    """``java -cp '<jars>/*' MultiLangDaemon --properties-file <file> [--log-configuration <xml>]``."""
    argv = [java, *jvm_options, "-cp", str(jars_dir / "*"), MAIN_CLASS, "--properties-file", str(properties)]
    if logback is not None:
        argv += ["--log-configuration", str(logback)]
    return argv


def start_daemon(
    settings: DaemonSettings,
    *,
    jars_dir: Path,
    workdir: Path,
    java: str = "java",
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
) -> subprocess.Popen[bytes]:
    """Write the config into ``workdir`` and start the daemon (output inherited).

    The daemon gets SIGKILL when the thread that called this ends (Linux's parent-death
    signal is tied to the thread, not the process): call it from a thread that lives as
    long as the daemon should, as :func:`run_daemon` does from the main thread.
    """
    workdir = workdir.resolve()
    properties, logback = write_config(settings, workdir, log_level=log_level)
    argv = daemon_argv(properties, jars_dir=jars_dir, java=java, logback=logback)
    child_env = {**(os.environ if env is None else env), RUN_DIR_VARIABLE: str(workdir)}
    # preexec_fn is unsafe only where the child could need a lock another thread held at
    # fork; this one makes two system calls through a libc handle opened beforehand.
    guard = _killed_with_parent(os.getpid())
    return subprocess.Popen(argv, cwd=workdir, env=child_env, preexec_fn=guard)  # noqa: PLW1509


def run_daemon(
    settings: DaemonSettings,
    *,
    jars_dir: Path,
    workdir: Path,
    java: str = "java",
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
    max_restarts: int = 5,
    restart_window: float = 60.0,
    restart_delay: float = 1.0,
    lock_dir: Path | None = None,
) -> int:
    """Run the daemon in the foreground, restarting it when it dies; SIGTERM/SIGINT are passed on.

    With ``lock_dir``, the worker id is claimed there first, for as long as this runs
    (:class:`~consumers.worker_lock.WorkerLock`): :class:`~consumers.worker_lock.WorkerIdTaken`
    if a live consumer on this host holds it.

    The MultiLangDaemon calls ``System.exit(1)`` as soon as one record processor (a child
    process) fails or dies, so a crashed processor would otherwise stop consumption until
    someone restarts the consumer. It is restarted here after ``restart_delay`` seconds:
    the stable worker id lets the new JVM take its leases back at once, and processing
    resumes from the last checkpoint (the projections are idempotent). More than
    ``max_restarts`` exits within ``restart_window`` seconds is a crash loop: the last exit
    code is returned instead. Returns the daemon's exit code once it exits after a stop
    signal, on its own with 0, or in a crash loop. For the ``tagbus consumer`` entry point.
    """

    def start() -> subprocess.Popen[bytes]:
        return start_daemon(settings, jars_dir=jars_dir, workdir=workdir, java=java, env=env, log_level=log_level)

    lock = WorkerLock(lock_dir, settings.worker_id) if lock_dir is not None and settings.worker_id else None
    if lock is not None:
        lock.acquire()
    try:
        return _supervise(start, max_restarts=max_restarts, restart_window=restart_window, restart_delay=restart_delay)
    finally:
        if lock is not None:
            lock.release()


def _supervise(
    start: Callable[[], subprocess.Popen[bytes]], *, max_restarts: int, restart_window: float, restart_delay: float
) -> int:
    """Start the daemon and start it again when it dies, until a stop signal, an exit 0 or a crash loop."""
    current = [start()]
    stopping = [False]

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping[0] = True
        if current[0].poll() is None:
            current[0].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    exits: list[float] = []
    try:
        while True:
            code = current[0].wait()
            if stopping[0] or code == 0:
                return code
            now = time.monotonic()
            exits = [t for t in exits if now - t < restart_window] + [now]
            if len(exits) > max_restarts:
                print(
                    f"tagbus consumer: the MultiLangDaemon exited {len(exits)} times in {restart_window:g}s; giving up",
                    file=sys.stderr,
                    flush=True,
                )
                return code
            print(
                f"tagbus consumer: the MultiLangDaemon exited with {code} (a record processor or the JVM died);"
                f" restarting in {restart_delay:g}s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(restart_delay)
            if stopping[0]:
                return code
            current[0] = start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def daemon_processes(workdir: Path) -> list[int]:
    """Live processes of daemons started in ``workdir``, and everything they started.

    A daemon is known by its command line (``--properties-file <workdir>/…``) or its
    environment (:data:`RUN_DIR_VARIABLE`, which its processors inherit); the processes
    that descend from one are included, whatever they run. This process is never included.
    """
    run_dir = str(workdir.resolve())
    marker = f"--properties-file {run_dir}/".encode()
    variable = f"{RUN_DIR_VARIABLE}={run_dir}".encode()
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            state, parent = stat.rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):
                continue
            parents[pid] = int(parent)
            ours = marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if ours or variable in (entry / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return sorted(found)


def _killed_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child killed when ``parent`` (the thread forking it) dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _executable_name(command: Sequence[str]) -> str:
    if not command:
        raise ValueError("processor_command must not be empty")
    return " ".join(os.fspath(part) for part in command)


def _escape(value: str) -> str:
    """Java properties escaping for a value (backslashes; leading spaces are trimmed by Java)."""
    return value.replace("\\", "\\\\")
