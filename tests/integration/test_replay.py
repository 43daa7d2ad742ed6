"""Replay from the events table into the real read models (DynamoDB Local, moto SSM).

Each test has its own migrated database (``database_url``), its own logical table, alias
table and SSM root, so the stack's live tables and the alias of ``tagbus-tenantconfig``
are never touched. Endpoints come from the environment or ``.tagbus/env`` (``tagbus up``).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import pytest
from botocore.exceptions import ClientError

from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from projections.model import ConfigChange, ConfigKey
from projections.replay import ReplayProgress, ReplayRunner
from projections.router import TagRouter
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.memory import MemoryConfigStore
from projections.stores.ssm import SSMConfigStore
from tagbus import aws
from tagbus import settings as settings_mod
from tests.fixtures.waiting import wait_for

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

pytestmark = pytest.mark.stack

ALIAS_TTL = 0.5
SWITCH_WAIT = 2 * ALIAS_TTL + 0.3

INSERT = (
    "INSERT INTO events (event_id, tenant_id, stream_id, version, type, source, data, digest)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, 'test') RETURNING id"
)
SELECT_ALL = (
    "SELECT event_id, tenant_id, stream_id, version, type, source, recorded_at, data::text FROM events ORDER BY id"
)


@pytest.fixture(scope="module")
def clients() -> tuple[DynamoDBClient, SSMClient]:
    settings = settings_mod.load()
    if not settings.environ.get("AWS_ENDPOINT_URL_DYNAMODB") or not settings.environ.get("AWS_ENDPOINT_URL_SSM"):
        pytest.fail("no DynamoDB/SSM endpoints: run `tagbus up` (it writes .tagbus/env) or `make test`")
    return aws.client(settings, "dynamodb"), aws.client(settings, "ssm")


@dataclass
class Models:
    """One test's read models: a logical table behind its own alias table, and an SSM root."""

    dynamodb: DynamoDBClient
    ssm: SSMClient
    logical: str
    alias_table: str
    root: str

    def router(self) -> TagRouter:
        return TagRouter(
            {
                "tenantconfig": DynamoDBConfigStore(
                    self.dynamodb, table_name=self.logical, alias_table=self.alias_table, alias_ttl=ALIAS_TTL
                ),
                "paramconfig": SSMConfigStore(self.ssm, root=self.root, sleep=lambda _: None),
            }
        )

    def dynamodb_store(self, router: TagRouter) -> DynamoDBConfigStore:
        store = router.store_for("tenantconfig")
        assert isinstance(store, DynamoDBConfigStore)
        return store

    def tables(self) -> list[str]:
        names = self.dynamodb.list_tables()["TableNames"]
        return sorted(n for n in names if n == self.logical or n.startswith(self.logical + "-"))

    def dump(self, router: TagRouter) -> dict[str, Any]:
        """Everything both models hold, tombstones included, minus what a replay cannot know.

        ``position`` is the commit LSN, which only the WAL carries (replay writes 0), and
        ``expires_at`` is stamped by the clock of whoever wrote the tombstone.
        """
        table = self.dynamodb_store(router).current_table()
        items = {}
        for page in self.dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
            for item in page["Items"]:
                kept = {k: v for k, v in item.items() if k not in ("position", "expires_at")}
                items[(item["pk"]["S"], item["sk"]["S"])] = kept
        parameters = {}
        for page in self.ssm.get_paginator("get_parameters_by_path").paginate(Path=self.root, Recursive=True):
            for p in page["Parameters"]:
                body = orjson.loads(p["Value"])
                body.pop("position", None)
                parameters[p["Name"]] = body
        return {"dynamodb": items, "ssm": parameters}

    def wipe(self, router: TagRouter) -> None:
        table = self.dynamodb_store(router).current_table()
        for page in self.dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
            for item in page["Items"]:
                self.dynamodb.delete_item(TableName=table, Key={"pk": item["pk"], "sk": item["sk"]})
        names = [
            p["Name"]
            for page in self.ssm.get_paginator("get_parameters_by_path").paginate(Path=self.root, Recursive=True)
            for p in page["Parameters"]
        ]
        for start in range(0, len(names), 10):
            self.ssm.delete_parameters(Names=names[start : start + 10])


@pytest.fixture
def models(clients: tuple[DynamoDBClient, SSMClient]) -> Iterator[Models]:
    dynamodb, ssm = clients
    suffix = uuid.uuid4().hex[:8]
    m = Models(dynamodb, ssm, f"tagbus-tenantconfig-rt{suffix}", f"tagbus-aliases-rt{suffix}", f"/tagbusrt{suffix}")
    DynamoDBConfigStore(dynamodb, table_name=m.logical, alias_table=None).ensure_table()
    yield m
    for table in [*m.tables(), m.alias_table]:
        with contextlib.suppress(ClientError):
            dynamodb.delete_table(TableName=table)
    names = [
        p["Name"]
        for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=m.root, Recursive=True)
        for p in page["Parameters"]
    ]
    for start in range(0, len(names), 10):
        ssm.delete_parameters(Names=names[start : start + 10])


def _insert(
    conn: psycopg.Connection[Any],
    tenant: str,
    key: str,
    version: int,
    value: Any = None,
    *,
    deleted: bool = False,
    data: Any = None,
    type_: str | None = None,
) -> int:
    body = data if data is not None else ({"key": key} if deleted else {"key": key, "value": value})
    kind = type_ or (CONFIG_DELETED if deleted else CONFIG_SET)
    row = conn.execute(
        INSERT,
        (f"{key}@{version}-{uuid.uuid4().hex[:6]}", tenant, key, version, kind, "/tests", orjson.dumps(body).decode()),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _stored_events(database_url: str) -> list[StoredEvent]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(SELECT_ALL).fetchall()
    return [
        StoredEvent(
            id=r[0],
            tenant=r[1],
            stream=r[2],
            version=r[3],
            type=r[4],
            source=r[5],
            recorded_at=r[6],
            data=orjson.loads(r[7]) if r[7] else None,
            position=i + 1,
        )
        for i, r in enumerate(rows)
    ]


def _history(database_url: str, tenants: tuple[str, str]) -> None:
    """Sets, overwrites, deletes, a resurrection, poison, an unknown tag and a domain event."""
    rng = random.Random(7)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for tenant in tenants:
            for k in range(20):
                key = f"tenantconfig:app/k{k:02d}"
                versions = rng.randint(1, 5)
                for v in range(1, versions + 1):
                    deleted = v == versions and k % 5 == 0
                    _insert(conn, tenant, key, v, {"k": k, "v": v, "f": 0.5, "n": None}, deleted=deleted)
            # deleted, then set again
            _insert(conn, tenant, "tenantconfig:back", 1, "first")
            _insert(conn, tenant, "tenantconfig:back", 2, deleted=True)
            _insert(conn, tenant, "tenantconfig:back", 3, "again")
            # the highest version is malformed: the consumer dead-letters it and keeps v1
            _insert(conn, tenant, "tenantconfig:poisoned", 1, "good")
            _insert(conn, tenant, "tenantconfig:poisoned", 2, data={"key": "tenantconfig:poisoned"})
            _insert(conn, tenant, "featureflags:dark", 1, True)  # no store for this tag
            _insert(conn, tenant, "orders/1", 1, type_="order.placed", data={"total": 3})
            for k in range(3):
                for v in range(1, k + 2):
                    _insert(conn, tenant, f"paramconfig:db/p{k}", v, f"value-{v}", deleted=(k == 2 and v == 3))


def _project_live(router: TagRouter, events: list[StoredEvent]) -> None:
    """What consumers do: batches, duplicates and reorders; failures would be dead-lettered."""
    rng = random.Random(11)
    delivered = events + rng.sample(events, len(events) // 3)
    rng.shuffle(delivered)
    for start in range(0, len(delivered), 7):
        router.apply(delivered[start : start + 7])


def test_replay_after_wiping_the_read_models_reproduces_them(database_url: str, models: Models) -> None:
    tenants = (f"ra-{uuid.uuid4().hex[:6]}", f"rb-{uuid.uuid4().hex[:6]}")
    _history(database_url, tenants)
    router = models.router()
    _project_live(router, _stored_events(database_url))
    expected = models.dump(router)
    store = models.dynamodb_store(router)
    assert len(expected["dynamodb"]) == 2 * 22 and len(expected["ssm"]) == 2 * 3
    poisoned = store.get(tenants[0], ConfigKey.parse("tenantconfig:poisoned"))
    assert poisoned is not None and poisoned.value == "good"

    models.wipe(router)
    assert models.dump(router) == {"dynamodb": {}, "ssm": {}}
    progress: list[ReplayProgress] = []
    summary = ReplayRunner(database_url, router, switch_wait=SWITCH_WAIT, drop_after=SWITCH_WAIT + 0.5).run(
        progress=progress.append
    )

    assert models.dump(router) == expected
    assert summary.keys == 2 * 25 and summary.keys_written == 2 * 25
    assert summary.failed == 4  # per tenant: the poisoned v2 and the unknown tag
    assert {f.error.split(":")[0] for f in summary.failures} == {"InvalidConfigEvent", "UnknownTag"}
    assert summary.tombstones == sum(1 for i in expected["dynamodb"].values() if i["deleted"]["BOOL"]) + 2
    (switch,) = summary.switches
    assert (switch.old_table, switch.new_table, switch.generation) == (models.logical, f"{models.logical}-1", 1)
    assert switch.old_dropped and models.tables() == [f"{models.logical}-1"]
    assert store.current_table() == f"{models.logical}-1"
    assert [p.phase for p in progress][-1] == "done" and {"read", "write", "switch"} <= {p.phase for p in progress}

    # In place (no fresh table): wipe the new generation and replay conditionally into it.
    models.wipe(router)
    in_place = ReplayRunner(database_url, router, rebuild=False).run()
    assert models.dump(router) == expected
    assert in_place.switches == () and models.tables() == [f"{models.logical}-1"]

    # Replaying again over a complete model changes nothing: every write is stale.
    again = ReplayRunner(database_url, router, rebuild=False).run(tenant=tenants[0])
    assert again.keys_written == 0 and again.stale == 25
    assert models.dump(router) == expected


def test_catch_up_takes_an_event_committed_after_the_snapshot_below_its_max_id(
    database_url: str, models: Models
) -> None:
    """An id drawn before the snapshot's highest id but committed after it is not lost."""
    tenant = f"rl-{uuid.uuid4().hex[:6]}"
    router = models.router()
    store = models.dynamodb_store(router)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, tenant, "tenantconfig:early", 1, "e")
    late = psycopg.connect(database_url)  # a transaction that draws its id now, commits later
    late_id = _insert(late, tenant, "tenantconfig:late", 1, "committed after the snapshot")
    with psycopg.connect(database_url, autocommit=True) as conn:
        after_id = _insert(conn, tenant, "tenantconfig:after", 1, "a")
    assert late_id < after_id

    def on_progress(p: ReplayProgress) -> None:
        if p.phase == "write" and not late.closed:
            # The snapshot is read; the late event commits, and a consumer that has not yet
            # seen the switch applies it to the old table.
            late.commit()
            late.close()
            (event,) = [e for e in _stored_events(database_url) if e.stream == "tenantconfig:late"]
            assert store.current_table() == models.logical
            assert router.apply([event]).ok

    summary = ReplayRunner(database_url, router, switch_wait=SWITCH_WAIT, drop_after=None).run(progress=on_progress)
    assert summary.events_read == 2 and summary.catch_up_events >= 1
    assert store.current_table() == f"{models.logical}-1"
    item = router.get(tenant, "tenantconfig:late")
    assert item is not None and item.value == "committed after the snapshot"
    assert models.tables() == [models.logical, f"{models.logical}-1"]  # drop_after=None keeps it


def test_switch_over_while_writes_continue_loses_no_update(database_url: str, models: Models) -> None:
    tenant = f"rs-{uuid.uuid4().hex[:6]}"
    keys = [f"tenantconfig:live/k{i:02d}" for i in range(40)]
    versions = dict.fromkeys(keys, 0)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(10):
            for key in keys:
                versions[key] += 1
                _insert(conn, tenant, key, versions[key], versions[key])
    consumer_router = models.router()  # the live consumer's own store, resolving the alias
    consumer_store = models.dynamodb_store(consumer_router)
    _project_live(consumer_router, _stored_events(database_url))

    committed: queue.Queue[StoredEvent | None] = queue.Queue()
    stop = threading.Event()
    tables_written: dict[str, int] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(3)
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                while not stop.is_set():
                    key = rng.choice(keys)
                    versions[key] += 1
                    _insert(conn, tenant, key, versions[key], versions[key])
                    row = conn.execute(
                        "SELECT recorded_at FROM events WHERE tenant_id = %s AND stream_id = %s AND version = %s",
                        (tenant, key, versions[key]),
                    ).fetchone()
                    assert row is not None
                    committed.put(
                        StoredEvent(
                            id=f"{key}@{versions[key]}",
                            tenant=tenant,
                            stream=key,
                            version=versions[key],
                            type=CONFIG_SET,
                            source="/tests",
                            recorded_at=row[0],
                            data={"key": key, "value": versions[key]},
                        )
                    )
                    time.sleep(0.005)  # a steady trickle of writes, not a flood
        except BaseException as e:
            errors.append(e)
        finally:
            committed.put(None)

    def consumer() -> None:
        # Applies after commit, in small batches, a little behind: like the KCL consumer.
        try:
            done = False
            while not done:
                batch: list[StoredEvent] = []
                while len(batch) < 10:
                    event = committed.get()
                    if event is None:
                        done = True
                        break
                    batch.append(event)
                if batch:
                    table = consumer_store.current_table()
                    tables_written[table] = tables_written.get(table, 0) + len(batch)
                    result = consumer_router.apply(batch)
                    assert result.ok, result.failed
                time.sleep(0.02)
        except BaseException as e:
            errors.append(e)

    new_table = f"{models.logical}-1"
    threads = [threading.Thread(target=writer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: tables_written.get(models.logical, 0) > 0 or errors, what="the consumer's first writes")
        summary = ReplayRunner(
            database_url, models.router(), switch_wait=SWITCH_WAIT, drop_after=SWITCH_WAIT + 0.5
        ).run()
        wait_for(lambda: tables_written.get(new_table, 0) > 0 or errors, what="the consumer's writes after the switch")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors

    assert summary.switches[0].new_table == new_table and summary.switches[0].old_dropped
    # The consumer wrote the old table during the rebuild, and the new one after the switch.
    assert tables_written.get(models.logical, 0) > 0 and tables_written.get(new_table, 0) > 0
    reader = models.router()
    for key in keys:
        item = reader.get(tenant, key)
        assert item is not None and (item.version, item.value) == (versions[key], versions[key]), key


def test_a_second_full_replay_rebuilds_from_the_first_generation(database_url: str, models: Models) -> None:
    tenant = f"rg-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, tenant, "tenantconfig:a", 1, "one")
    router = models.router()
    first = ReplayRunner(database_url, router, switch_wait=SWITCH_WAIT, drop_after=0.0).run()
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, tenant, "tenantconfig:a", 2, "two")
    second = ReplayRunner(database_url, router, switch_wait=SWITCH_WAIT, drop_after=0.0).run()

    assert [(s.old_table, s.new_table, s.generation) for s in (*first.switches, *second.switches)] == [
        (models.logical, f"{models.logical}-1", 1),
        (f"{models.logical}-1", f"{models.logical}-2", 2),
    ]
    assert second.switches[0].old_dropped and models.tables() == [f"{models.logical}-2"]
    item = router.get(tenant, "tenantconfig:a")
    assert item is not None and (item.value, item.version) == ("two", 2)


def test_a_replay_that_fails_before_its_switch_removes_its_fresh_table(database_url: str, models: Models) -> None:
    tenant = f"rf-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, tenant, "tenantconfig:a", 1, "kept")
    router = models.router()
    assert router.apply(_stored_events(database_url)).ok

    def fail_while_writing(p: ReplayProgress) -> None:
        if p.phase == "write":
            assert models.tables() == [models.logical, f"{models.logical}-1"]
            raise RuntimeError("the operator pressed ^C")

    with pytest.raises(RuntimeError):
        ReplayRunner(database_url, router, switch_wait=SWITCH_WAIT).run(progress=fail_while_writing)
    assert models.tables() == [models.logical]
    assert models.dynamodb_store(router).current_table() == models.logical
    item = router.get(tenant, "tenantconfig:a")
    assert item is not None and item.value == "kept"


def test_the_in_memory_store_is_rebuilt_through_the_same_port(database_url: str) -> None:
    tenant = f"rm-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for version in (1, 2, 3):
            _insert(conn, tenant, "tenantconfig:a", version, f"v{version}")
        _insert(conn, tenant, "tenantconfig:gone", 1, "x")
        _insert(conn, tenant, "tenantconfig:gone", 2, deleted=True)
    store = MemoryConfigStore(name="cfg")
    # A key no event ever set: a rebuild starts from an empty copy, so it does not survive.
    stray = ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse("tenantconfig:stray"),
        value=1,
        version=9,
        position=0,
        updated_at=datetime.now(UTC),
    )
    assert store.apply([stray]).ok

    summary = ReplayRunner(database_url, TagRouter({"tenantconfig": store}), drop_after=0.0).run()

    assert [(s.alias, s.old_table, s.new_table, s.generation, s.old_dropped) for s in summary.switches] == [
        ("cfg", "cfg", "cfg-1", 1, True)
    ]
    assert summary.keys_written == 2
    item = store.get(tenant, ConfigKey.parse("tenantconfig:a"))
    assert item is not None and (item.value, item.version) == ("v3", 3)
    assert {key: (e.version, e.deleted) for key, e in store.entries(tenant).items()} == {
        "tenantconfig:a": (3, False),
        "tenantconfig:gone": (2, True),
    }
