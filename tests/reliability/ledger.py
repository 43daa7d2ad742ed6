"""Ledger check: drive load through the SDK, then prove from every store that nothing was lost.

:class:`LoadDriver` posts a mix of ``config.set``, ``config.deleted`` and plain domain events
for a handful of fresh tenants and keeps a :class:`Ledger` of what the bus acknowledged
(``201``/``200``). :func:`check` then reads the events table, the whole Kinesis stream and the
read models (through the tag router) and returns a :class:`LedgerReport` whose ``lost`` and
``mismatches`` must both be 0.

Events the bus never acknowledged (the client gave up during a fault) may still have been
stored: they are legitimate as long as their content is exactly what was sent, and they take
part in the read-model expectation because the projections apply them too.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from kernel.auth import issue_dev_token
from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from producers.client import EventRejected, TagbusClient, TagbusUnavailable, new_event
from projections.model import ConfigItem
from tagbus import aws
from tagbus.compose import build_router
from tagbus.settings import Settings

SOURCE = "/reliability/ledger"
DOMAIN_TYPE = "ledger.order.placed"

# Reads the run's rows only; ``ANY(%s)`` keeps the statement fixed whatever the tenant count.
_EVENTS_OF_TENANTS = (
    "SELECT tenant_id, event_id, stream_id, version, type, source, subject, data, digest"
    " FROM events WHERE tenant_id = ANY(%s)"
)


def enterprise_token(settings: Settings, tenant: str, scope: str) -> str:
    """A dev token of the stack's issuer and audience for an enterprise tenant (no quota: the
    suites test the bus's own back pressure, not a tenant's bucket)."""
    auth = settings.auth
    assert auth.jwt_secret, "the reliability suite issues dev tokens; TAGBUS_JWT_SECRET must be set"
    return issue_dev_token(
        auth.jwt_secret,
        tenant=tenant,
        tier="enterprise",
        scope=scope,
        issuer=auth.issuer,
        audience=auth.audience,
        now=time.time(),
    )


def body_digest(body: dict[str, Any]) -> str:
    """SHA-256 of an envelope as the bus computes it (sorted keys, ``tenantid`` left out).

    Kept here rather than imported: the check must not trust the code it checks.
    """
    canonical = {k: v for k, v in body.items() if k != "tenantid"}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class AckedEvent:
    """One event the bus acknowledged (``201`` or ``200``), with where it sits and what was sent."""

    tenant: str
    id: str
    stream: str
    version: int
    type: str
    key: str | None
    value: Any
    body: dict[str, Any]

    @property
    def digest(self) -> str:
        return body_digest(self.body)


@dataclass(frozen=True, slots=True)
class SentEvent:
    """An event that was sent but never acknowledged (rejected, or the client gave up)."""

    tenant: str
    body: dict[str, Any]
    reason: str


class Ledger:
    """Thread-safe record of one run: every acknowledged event, and every unacknowledged one."""

    def __init__(self, tenants: Iterable[str]) -> None:
        self.tenants: tuple[str, ...] = tuple(tenants)
        self._lock = threading.Lock()
        self._acked: list[AckedEvent] = []
        self._unacked: list[SentEvent] = []
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    def acked(self, event: AckedEvent) -> None:
        with self._lock:
            self._acked.append(event)

    def unacked(self, event: SentEvent) -> None:
        with self._lock:
            self._unacked.append(event)

    def finish(self) -> None:
        self.finished_at = time.monotonic()

    @property
    def events(self) -> list[AckedEvent]:
        with self._lock:
            return list(self._acked)

    @property
    def unacknowledged(self) -> list[SentEvent]:
        with self._lock:
            return list(self._unacked)

    def __len__(self) -> int:
        with self._lock:
            return len(self._acked)


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """What the check found; ``lost`` and ``mismatches`` must be 0 for the pipeline to pass."""

    acked: int
    unacked: int
    stored: int
    stored_unacked: int
    on_stream: int
    duplicates_on_stream: int
    lost: int
    mismatches: int
    keys_checked: int
    convergence_seconds: float | None
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.mismatches == 0 and not self.problems

    def summary(self) -> str:
        converged = "never" if self.convergence_seconds is None else f"{self.convergence_seconds:.2f}s"
        lines = [
            f"acked={self.acked} unacked={self.unacked} stored={self.stored} stored_unacked={self.stored_unacked}",
            f"on_stream={self.on_stream} duplicates_on_stream={self.duplicates_on_stream}",
            f"lost={self.lost} mismatches={self.mismatches} keys={self.keys_checked} converged={converged}",
        ]
        lines += [f"  - {p}" for p in self.problems[:30]]
        if len(self.problems) > 30:
            lines.append(f"  … and {len(self.problems) - 30} more")
        return "\n".join(lines)


class LoadDriver:
    """Posts a bounded mix of config and domain events for fresh tenants from a few threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        events: int = 300,
        tenants: int = 5,
        keys: int = 20,
        threads: int = 4,
        max_seconds: float = 30.0,
        delete_share: float = 0.15,
        domain_share: float = 0.25,
        domain_streams: int = 3,
        pace: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._settings = settings
        self._total = events
        self._threads = threads
        self._max_seconds = max_seconds
        self._delete_share = delete_share
        self._domain_share = domain_share
        self._pace = pace
        self._random = random.Random(seed)
        run = uuid.uuid4().hex[:8]
        self.ledger = Ledger(f"ledger-{run}-t{i}" for i in range(tenants))
        tags = ("tenantconfig", "paramconfig")
        self.keys = tuple(f"{tags[i % 2]}:ledger/k{i:03d}" for i in range(keys))
        self.domain_streams = tuple(f"orders/o{i}" for i in range(domain_streams))
        self._issued = 0
        self._issue_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._stop = threading.Event()

    def start(self) -> LoadDriver:
        self.ledger.started_at = time.monotonic()
        deadline = self.ledger.started_at + self._max_seconds
        self._workers = [
            threading.Thread(target=self._work, args=(deadline,), name=f"ledger-load-{i}", daemon=True)
            for i in range(self._threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def wait_for_acks(self, count: int, timeout: float = 30.0) -> int:
        """Block until ``count`` events are acknowledged (or the load ends); the count reached."""
        deadline = time.monotonic() + timeout
        while len(self.ledger) < count and time.monotonic() < deadline and self.running:
            time.sleep(0.02)
        return len(self.ledger)

    def stop(self) -> None:
        """End the load early: each worker finishes the request it is in, then returns."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return any(w.is_alive() for w in self._workers)

    def join(self) -> Ledger:
        for worker in self._workers:
            worker.join()
        self.ledger.finish()
        if self._errors:
            raise RuntimeError(f"load driver failed: {self._errors[0]!r}") from self._errors[0]
        return self.ledger

    def run(self) -> Ledger:
        return self.start().join()

    def _next(self) -> tuple[str, dict[str, Any]] | None:
        with self._issue_lock:
            if self._issued >= self._total:
                return None
            self._issued += 1
            rnd = self._random
            tenant = rnd.choice(self.ledger.tenants)
            roll = rnd.random()
            if roll < self._domain_share:
                stream = rnd.choice(self.domain_streams)
                data = {"order": stream, "amount": rnd.randint(1, 10_000), "n": self._issued}
                return tenant, new_event(DOMAIN_TYPE, SOURCE, data, subject=stream)
            key = rnd.choice(self.keys)
            if roll < self._domain_share + self._delete_share:
                return tenant, new_event(CONFIG_DELETED, SOURCE, {"key": key})
            value: Any = rnd.choice(
                [
                    rnd.randint(0, 1_000_000),
                    f"v{rnd.randint(0, 1_000_000)}",
                    {"n": self._issued, "on": rnd.random() < 0.5},
                ]
            )
            return tenant, new_event(CONFIG_SET, SOURCE, {"key": key, "value": value})

    def _work(self, deadline: float) -> None:
        clients: dict[str, TagbusClient] = {}
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                item = self._next()
                if item is None:
                    return
                tenant, body = item
                client = clients.get(tenant) or clients.setdefault(tenant, self._client(tenant))
                self._post(client, tenant, body)
                if self._pace:
                    time.sleep(self._pace)
        except BaseException as e:  # surfaced by join(): a silent dead worker would shrink the run
            self._errors.append(e)
        finally:
            for client in clients.values():
                client.close()

    def _client(self, tenant: str) -> TagbusClient:
        token = enterprise_token(self._settings, tenant, "events:write events:read config:read")
        # Enough attempts to ride out a bus restart; max_delay bounds a run under faults.
        return TagbusClient(self._settings.base_url, lambda: token, attempts=10, max_delay=2.0, timeout=10.0)

    def _post(self, client: TagbusClient, tenant: str, body: dict[str, Any]) -> None:
        try:
            answer = client.post(body)
        except EventRejected as e:
            self.ledger.unacked(SentEvent(tenant, body, f"rejected {e.status}: {e}"))
            return
        except TagbusUnavailable as e:
            self.ledger.unacked(SentEvent(tenant, body, f"unavailable: {e}"))
            return
        data = body.get("data") or {}
        config = body["type"] in (CONFIG_SET, CONFIG_DELETED)
        self.ledger.acked(
            AckedEvent(
                tenant=tenant,
                id=body["id"],
                stream=str(answer["stream"]),
                version=int(answer["version"]),
                type=body["type"],
                key=data.get("key") if config else None,
                value=data.get("value"),
                body=body,
            )
        )


@dataclass(frozen=True, slots=True)
class _Row:
    tenant: str
    id: str
    stream: str
    version: int
    type: str
    source: str
    subject: str | None
    data: Any
    digest: str


class KinesisTail:
    """Reads every shard of a stream from TRIM_HORIZON and keeps reading from where it stopped."""

    def __init__(self, settings: Settings, tenants: Iterable[str]) -> None:
        self._client = aws.client(settings, "kinesis")
        self._stream = settings.stream_name
        self._tenants = frozenset(tenants)
        self._iterators: dict[str, str | None] = {}
        #: Events of the run's tenants in shard read order (per shard, hence per stream).
        self.events: list[StoredEvent] = []

    def poll(self) -> int:
        """Read every shard up to its tip; the number of new records of the run's tenants."""
        before = len(self.events)
        for shard in self._shards():
            if shard not in self._iterators:
                self._iterators[shard] = self._client.get_shard_iterator(
                    StreamName=self._stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
                )["ShardIterator"]
            self._iterators[shard] = self._drain(self._iterators[shard])
        return len(self.events) - before

    def _shards(self) -> Iterator[str]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"NextToken": token} if token else {"StreamName": self._stream}
            page = self._client.list_shards(**kwargs)
            for shard in page["Shards"]:
                yield shard["ShardId"]
            token = page.get("NextToken")
            if not token:
                return

    def _drain(self, iterator: str | None) -> str | None:
        while iterator:
            page = self._client.get_records(ShardIterator=iterator, Limit=10_000)
            for data in _user_records(page["Records"]):
                event = StoredEvent.from_record_data(data)
                if event.tenant in self._tenants:
                    self.events.append(event)
            # A closed shard ends with no next iterator; an open one is drained when a read
            # returns nothing, and the iterator is kept for the next poll.
            next_iterator: str | None = page.get("NextShardIterator")
            if not page["Records"]:
                return next_iterator
            iterator = next_iterator
        return None


def _user_records(records: list[dict[str, Any]]) -> Iterator[bytes]:
    """The payload of every user record, KPL aggregates unpacked (the tailer may aggregate).

    Unpacked here rather than with ``deaggregate_records``, which skips a record it cannot
    parse after printing to stderr: the check must see every failure.
    """
    import aws_kinesis_agg  # type: ignore[import-untyped]

    # The package's own modules put it on sys.path so that its generated protobuf modules
    # import each other; importing one of them first is what makes messages_pb2 importable.
    import aws_kinesis_agg.deaggregator
    from aws_kinesis_agg import messages_pb2

    magic, digest = aws_kinesis_agg.MAGIC, aws_kinesis_agg.DIGEST_SIZE
    for record in records:
        data: bytes = record["Data"]
        body = data[len(magic) : -digest]
        if not data.startswith(magic) or hashlib.md5(body).digest() != data[-digest:]:
            yield data
            continue
        aggregate = messages_pb2.AggregatedRecord()
        aggregate.ParseFromString(body)
        for user in aggregate.records:
            yield bytes(user.data)


@dataclass
class _Findings:
    """Counts and problems gathered by the phases of :func:`check`."""

    lost: int = 0
    mismatches: int = 0
    problems: list[str] = field(default_factory=list)

    def lose(self, problem: str) -> None:
        self.lost += 1
        self.problems.append(problem)

    def mismatch(self, problem: str) -> None:
        self.mismatches += 1
        self.problems.append(problem)


def check(
    ledger: Ledger,
    settings: Settings,
    *,
    timeout: float = 30.0,
    poll_interval: float = 0.2,
) -> LedgerReport:
    """Prove the ledger against the events table, the Kinesis stream and the read models.

    ``timeout`` bounds the wait for Kinesis to carry every stored event and, separately, for
    the read models to converge (at least half of it is left for them).
    """
    acked = ledger.events
    found = _Findings()
    rows = _stored_rows(settings, ledger.tenants)
    stored_unacked = _check_table(ledger, acked, rows, found)
    started = time.monotonic()
    on_stream, duplicates = _check_stream(ledger, acked, rows, settings, found, started + timeout, poll_interval)
    expected = _expected_config(acked, stored_unacked)
    deadline = max(started + timeout, time.monotonic() + timeout / 2)
    converged_at = _check_read_models(expected, settings, found, deadline, poll_interval)
    end_of_load = ledger.finished_at or started
    stored_ids = {(r.tenant, r.id) for r in rows}
    return LedgerReport(
        acked=len(acked),
        unacked=len(ledger.unacknowledged),
        stored=sum(1 for e in acked if (e.tenant, e.id) in stored_ids),
        stored_unacked=len(stored_unacked),
        on_stream=on_stream,
        duplicates_on_stream=duplicates,
        lost=found.lost,
        mismatches=found.mismatches,
        keys_checked=len(expected),
        convergence_seconds=None if converged_at is None else round(converged_at - end_of_load, 3),
        problems=tuple(found.problems),
    )


def _check_table(ledger: Ledger, acked: list[AckedEvent], rows: list[_Row], found: _Findings) -> list[_Row]:
    """Every ack stored once as sent, nothing else but exact unacked attempts, versions 1..n.

    Returns the rows stored without an acknowledgement (they count for the read models).
    """
    by_id = {(r.tenant, r.id): r for r in rows}
    for event in acked:
        row = by_id.get((event.tenant, event.id))
        if row is None:
            found.lose(f"lost from the table: {event.tenant}/{event.id} ({event.stream} v{event.version})")
        elif different := _differences(event, row):
            found.mismatch(f"stored differently: {event.tenant}/{event.id}: {', '.join(different)}")
    for (tenant, event_id), n in Counter((r.tenant, r.id) for r in rows).items():
        if n > 1:
            found.mismatch(f"stored {n} times: {tenant}/{event_id}")

    acked_ids = {(e.tenant, e.id) for e in acked}
    sent = {(s.tenant, s.body["id"]): s for s in ledger.unacknowledged}
    stored_unacked: list[_Row] = []
    for row in rows:
        if (row.tenant, row.id) in acked_ids:
            continue
        attempt = sent.get((row.tenant, row.id))
        if attempt is None or body_digest(attempt.body) != row.digest:
            found.mismatch(f"stored but never sent with this content: {row.tenant}/{row.id}")
        else:
            stored_unacked.append(row)

    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row in rows:
        versions[(row.tenant, row.stream)].append(row.version)
    for (tenant, stream), numbers in versions.items():
        if sorted(numbers) != list(range(1, len(numbers) + 1)):
            found.mismatch(f"versions of {tenant}/{stream} are not 1..{len(numbers)}: {sorted(numbers)[:20]}")
    return stored_unacked


def _check_stream(
    ledger: Ledger,
    acked: list[AckedEvent],
    rows: list[_Row],
    settings: Settings,
    found: _Findings,
    deadline: float,
    poll_interval: float,
) -> tuple[int, int]:
    """Every stored event on Kinesis at least once, first occurrences in version order.

    Returns (distinct events of the run on the stream, duplicate records).
    """
    by_id = {(r.tenant, r.id): r for r in rows}
    acked_ids = {(e.tenant, e.id) for e in acked}
    tail = KinesisTail(settings, ledger.tenants)
    while True:
        tail.poll()
        missing = set(by_id) - {(e.tenant, e.id) for e in tail.events}
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    for tenant, event_id in sorted(missing):
        if (tenant, event_id) in acked_ids:
            found.lose(f"never reached Kinesis: {tenant}/{event_id}")
        else:
            found.problems.append(f"stored (unacked) event never reached Kinesis: {tenant}/{event_id}")

    seen: set[tuple[str, str]] = set()
    first_order: dict[tuple[str, str], list[int]] = defaultdict(list)
    for record in tail.events:
        ident = (record.tenant, record.id)
        if ident in seen:
            continue
        seen.add(ident)
        first_order[(record.tenant, record.stream)].append(record.version)
        row = by_id.get(ident)
        if row is None:
            found.mismatch(f"on Kinesis but not in the table: {record.tenant}/{record.id}")
        elif (record.stream, record.version, record.type, record.data) != (row.stream, row.version, row.type, row.data):
            found.mismatch(f"on Kinesis with other content than stored: {record.tenant}/{record.id}")
    for (tenant, stream), order in first_order.items():
        if order != sorted(order):
            found.mismatch(f"{tenant}/{stream} first reached Kinesis out of order: {order[:20]}")
    return len(seen), len(tail.events) - len(seen)


def _check_read_models(
    expected: dict[tuple[str, str], tuple[int, bool, Any]],
    settings: Settings,
    found: _Findings,
    deadline: float,
    poll_interval: float,
) -> float | None:
    """Poll the router until every key holds its expected state; when that happened, or None."""
    router = build_router(settings)
    pending = dict(expected)
    last: dict[tuple[str, str], str] = {}
    while pending:
        for (tenant, key), (version, deleted, value) in list(pending.items()):
            item = router.get(tenant, key)
            if _holds(item, version, deleted, value):
                del pending[(tenant, key)]
            else:
                got = "absent" if item is None else f"v{item.version}={item.value!r}"
                want = f"deleted at v{version}" if deleted else f"v{version}={value!r}"
                last[(tenant, key)] = f"{tenant}/{key}: want {want}, got {got}"
        if pending and time.monotonic() < deadline:
            time.sleep(poll_interval)
        elif pending:
            break
    for ident in sorted(pending):
        found.mismatch(f"read model did not converge: {last[ident]}")
    return None if pending else time.monotonic()


def _stored_rows(settings: Settings, tenants: Iterable[str]) -> list[_Row]:
    with psycopg.connect(settings.database_url) as conn:
        cursor = conn.execute(_EVENTS_OF_TENANTS, (list(tenants),))
        return [_Row(t, i, s, int(v), ty, so, su, d, dg) for t, i, s, v, ty, so, su, d, dg in cursor]


def _holds(item: ConfigItem | None, version: int, deleted: bool, value: Any) -> bool:
    if deleted:
        return item is None
    return item is not None and item.version == version and item.value == value


def _differences(event: AckedEvent, row: _Row) -> list[str]:
    body = event.body
    pairs = {
        "stream": (event.stream, row.stream),
        "version": (event.version, row.version),
        "type": (body["type"], row.type),
        "source": (body["source"], row.source),
        "subject": (body.get("subject"), row.subject),
        "data": (body.get("data"), row.data),
        "digest": (event.digest, row.digest),
    }
    return [f"{name} {ours!r} != {stored!r}" for name, (ours, stored) in pairs.items() if ours != stored]


def _expected_config(
    acked: Iterable[AckedEvent], stored_unacked: Iterable[_Row]
) -> dict[tuple[str, str], tuple[int, bool, Any]]:
    """Per (tenant, key): (version, deleted, value) of the key's highest stored version."""
    latest: dict[tuple[str, str], tuple[int, bool, Any]] = {}

    def offer(tenant: str, key: str, version: int, event_type: str, value: Any) -> None:
        current = latest.get((tenant, key))
        if current is None or version > current[0]:
            latest[(tenant, key)] = (version, event_type == CONFIG_DELETED, value)

    for event in acked:
        if event.key is not None:
            offer(event.tenant, event.key, event.version, event.type, event.value)
    for row in stored_unacked:
        if row.type in (CONFIG_SET, CONFIG_DELETED):
            offer(row.tenant, row.data["key"], row.version, row.type, row.data.get("value"))
    return latest
