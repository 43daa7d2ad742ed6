"""The Kinesis change source against the running stack: kinesis-mock, DynamoDB Local, moto, and the
pipeline in front of them (bus → PostgreSQL → tailer → Kinesis → KCL consumer → read models).

Config events go in through the bus; a :class:`KinesisChangeSource` with a recording sink must
end with exactly what ``router.scan()`` shows once the pipeline settled, including keys changed
while it was starting, tombstones kept. Resharding runs on a throwaway stream of kinesis-mock.
Chaining: an :class:`UpstreamChangeSource` watching a real config server fed from the stack.
The stack must be running (``tagbus up``); these tests never start or stop its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import pytest

from config_server.checkpoints import CheckpointKind, read_checkpoints
from config_server.kinesis import KinesisChangeSource, KinesisUnavailable
from config_server.server import ConfigServer
from config_server.settings import ConfigServerSettings
from config_server.upstream import UpstreamChangeSource, UpstreamUnavailable
from consumers.daemon import APPLICATION_NAME
from devtools.ports import free_port
from kernel.auth import TokenVerifier, issue_dev_token
from kernel.envelope import CONFIG_SET, StoredEvent
from producers import TagbusClient
from producers.client import new_event
from projections.model import ConfigChange
from projections.router import TagRouter
from projections.stores.memory import MemoryConfigStore
from tagbus import aws, compose
from tagbus import settings as settings_mod
from tailer import KinesisPublisher
from tests.fixtures.change_sink import RecordingSink
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

SETTLE = 120.0


@pytest.fixture(scope="module")
def live() -> settings_mod.Settings:
    s = settings_mod.load()
    try:
        httpx.get(f"{s.base_url}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        pytest.fail(f"the local stack's bus is not answering at {s.base_url} (run `tagbus up`): {e}")
    return s


@pytest.fixture(scope="module")
def router(live: settings_mod.Settings) -> TagRouter:
    return compose.build_router(live)


def bus_client(s: settings_mod.Settings, tenant: str) -> TagbusClient:
    assert s.auth.jwt_secret
    token = issue_dev_token(
        s.auth.jwt_secret,
        tenant=tenant,
        tier="enterprise",
        scope="events:write config:read",
        issuer=s.auth.issuer,
        audience=s.auth.audience,
        now=time.time(),
    )
    return TagbusClient(s.base_url, lambda: token)


class Poster:
    """Posts config changes for one tenant and remembers each key's last version."""

    def __init__(self, client: TagbusClient) -> None:
        self.client = client
        self.last: dict[str, tuple[int, bool]] = {}

    def set(self, key: str, value: Any) -> None:
        body = self.client.post(new_event("config.set", "/tests/config-source", {"key": key, "value": value}))
        self.last[key] = (int(body["version"]), False)

    def delete(self, key: str) -> None:
        body = self.client.post(new_event("config.deleted", "/tests/config-source", {"key": key}))
        self.last[key] = (int(body["version"]), True)


def scanned(router: TagRouter, tenants: set[str]) -> dict[tuple[str, str], ConfigChange]:
    return {(c.tenant, str(c.key)): c for c in router.scan() if c.tenant in tenants}


#: A wait on the read models: each check scans them, so it polls gently.
wait_until = functools.partial(wait_for, interval=0.2)


def settled(router: TagRouter, tenant: str, poster: Poster) -> Callable[[], bool]:
    """The read models hold every key's last posted version (deleted keys as tombstones)."""

    def check() -> bool:
        state = scanned(router, {tenant})
        return all(
            (tenant, key) in state and (state[(tenant, key)].version, state[(tenant, key)].deleted) == last
            for key, last in poster.last.items()
        )

    return check


@pytest.fixture
def running() -> Iterator[Callable[[KinesisChangeSource, RecordingSink], threading.Thread]]:
    """Starts sources in threads; stops and joins them after the test."""
    started: list[tuple[threading.Event, threading.Thread]] = []

    def start(source: KinesisChangeSource, sink: RecordingSink) -> threading.Thread:
        stop = threading.Event()
        thread = threading.Thread(target=source.run, args=(sink, stop), name="kinesis-source", daemon=True)
        thread.start()
        started.append((stop, thread))
        return thread

    yield start
    for stop, _ in started:
        stop.set()
    for _, thread in started:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the source did not stop within 30 s of its stop event"


def stack_source(live: settings_mod.Settings, router: TagRouter, **options: Any) -> KinesisChangeSource:
    return KinesisChangeSource(
        aws.client(live, "kinesis"),
        aws.client(live, "dynamodb"),
        router,
        stream_name=live.stream_name,
        lease_table=APPLICATION_NAME,
        **options,
    )


def test_converges_to_the_read_models_with_changes_made_while_it_starts(
    live: settings_mod.Settings,
    router: TagRouter,
    running: Callable[[KinesisChangeSource, RecordingSink], threading.Thread],
) -> None:
    tenant = f"src-{uuid.uuid4().hex[:10]}"
    with bus_client(live, tenant) as client:
        poster = Poster(client)
        # Before the start: sets, overwrites and deletes in both read models.
        for n in range(6):
            poster.set(f"tenantconfig:before/k{n}", {"n": n})
        poster.set("paramconfig:before/p", "one")
        poster.set("tenantconfig:before/k0", {"n": 0, "again": True})
        poster.delete("tenantconfig:before/k1")
        poster.delete("paramconfig:before/p")
        # In the read models before the start, so the snapshot (not only the stream) has them.
        wait_until(settled(router, tenant, poster), timeout=SETTLE, what="the keys posted before the start")

        sink = RecordingSink()
        keep_posting = threading.Event()
        errors: list[BaseException] = []

        def post_while_starting() -> None:
            n = 0
            try:
                while not keep_posting.is_set() or n < 12:
                    poster.set(f"tenantconfig:during/k{n % 4}", n)
                    if n % 5 == 4:
                        poster.delete(f"tenantconfig:during/k{(n + 1) % 4}")
                    if n % 6 == 0:
                        poster.set(f"paramconfig:during/p{n % 2}", [n])
                    n += 1
            except BaseException as e:
                errors.append(e)

        writer = threading.Thread(target=post_while_starting, name="poster", daemon=True)
        writer.start()
        source = stack_source(live, router)
        running(source, sink)
        sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=SETTLE, what="the source's first caught_up")
        keep_posting.set()
        writer.join(timeout=SETTLE)
        assert not writer.is_alive() and not errors, errors
        # After the start too.
        poster.set("tenantconfig:after/k", "late")
        poster.delete("tenantconfig:before/k2")

    wait_until(settled(router, tenant, poster), timeout=SETTLE, what="the read models to hold every posted version")
    expected = scanned(router, {tenant})
    sink.wait_for(
        lambda s: s.tenant_state({tenant}) == expected,
        timeout=SETTLE,
        what="the source's state to equal the read models'",
    )
    state = sink.tenant_state({tenant})
    assert state == expected
    assert {key for (_, key), c in state.items() if c.deleted} >= {
        "tenantconfig:before/k1",
        "tenantconfig:before/k2",
        "paramconfig:before/p",
    }
    assert any(c.tenant == tenant for c in sink.loads[0]), "the snapshot held the keys posted before the start"
    assert source.stats.undecodable == 0 and source.stats.invalid == 0


def test_reads_the_consumers_checkpoints_from_the_real_lease_table_and_starts_there(
    live: settings_mod.Settings,
    router: TagRouter,
    running: Callable[[KinesisChangeSource, RecordingSink], threading.Thread],
) -> None:
    tenant = f"ckp-{uuid.uuid4().hex[:10]}"
    with bus_client(live, tenant) as client:
        poster = Poster(client)
        poster.set("tenantconfig:checkpointed", True)
    wait_until(settled(router, tenant, poster), timeout=SETTLE, what="the consumer to apply the change")
    dynamodb = aws.client(live, "dynamodb")
    # The consumer checkpoints at most once a second after applying.
    wait_until(
        lambda: any(
            c.kind is CheckpointKind.SEQUENCE
            for c in read_checkpoints(dynamodb, APPLICATION_NAME, stream_name=live.stream_name).values()
        ),
        timeout=SETTLE,
        what="a sequence-number checkpoint in the lease table",
    )
    checkpoints = read_checkpoints(dynamodb, APPLICATION_NAME, stream_name=live.stream_name)
    kinesis = aws.client(live, "kinesis")
    shards = {s["ShardId"] for s in kinesis.list_shards(StreamName=live.stream_name)["Shards"]}
    assert set(checkpoints) <= shards
    opened: list[dict[str, Any]] = []
    kinesis.meta.events.register(
        "provide-client-params.kinesis.GetShardIterator", lambda params, **_: opened.append(dict(params))
    )
    source = KinesisChangeSource(kinesis, dynamodb, router, stream_name=live.stream_name, lease_table=APPLICATION_NAME)
    sink = RecordingSink()
    running(source, sink)
    sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=SETTLE, what="caught_up")
    by_shard = {p["ShardId"]: p for p in opened}
    for shard_id, checkpoint in read_checkpoints(dynamodb, APPLICATION_NAME, stream_name=live.stream_name).items():
        if checkpoint.kind is CheckpointKind.SEQUENCE and shard_id in by_shard:
            assert by_shard[shard_id]["ShardIteratorType"] == "AT_SEQUENCE_NUMBER"
            # The checkpoint may have moved since the source read it; never backwards.
            assert int(by_shard[shard_id]["StartingSequenceNumber"]) <= int(checkpoint.sequence_number or 0)
    assert any(p["ShardIteratorType"] == "AT_SEQUENCE_NUMBER" for p in opened)
    assert sink.state[(tenant, "tenantconfig:checkpointed")].value is True


def _config_event(tenant: str, key: str, version: int, value: Any) -> StoredEvent:
    return StoredEvent(
        id=f"{key}@{version}",
        tenant=tenant,
        stream=key,
        version=version,
        type=CONFIG_SET,
        source="/tests/reshard",
        recorded_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        data={"key": key, "value": value},
        position=version,
    )


def test_follows_a_split_on_kinesis_mock_without_losing_or_reordering_a_key(
    live: settings_mod.Settings,
    kinesis_client: Any,
    kinesis_stream: str,
    running: Callable[[KinesisChangeSource, RecordingSink], threading.Thread],
) -> None:
    tenant = f"rsh-{uuid.uuid4().hex[:10]}"
    keys = [f"tenantconfig:reshard/k{n}" for n in range(8)]
    publisher = KinesisPublisher(kinesis_client, kinesis_stream, aggregate=True)
    publisher.publish([_config_event(tenant, key, 1, 1) for key in keys])
    source = KinesisChangeSource(
        kinesis_client,
        aws.client(live, "dynamodb"),
        TagRouter({"tenantconfig": MemoryConfigStore()}),
        stream_name=kinesis_stream,
        lease_table=None,
        list_shards_interval=1.0,
    )
    sink = RecordingSink()
    running(source, sink)
    sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=SETTLE, what="caught_up")

    shards = kinesis_client.list_shards(StreamName=kinesis_stream)["Shards"]
    parent = shards[0]
    low, high = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
    kinesis_client.split_shard(
        StreamName=kinesis_stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=str((low + high) // 2)
    )
    wait_until(
        lambda: (
            kinesis_client.describe_stream_summary(StreamName=kinesis_stream)["StreamDescriptionSummary"][
                "StreamStatus"
            ]
            == "ACTIVE"
        ),
        timeout=SETTLE,
        what="the split to finish",
    )
    # A fresh publisher maps the new shards (aggregates carry the child shards' hash keys).
    after = KinesisPublisher(kinesis_client, kinesis_stream, aggregate=True)
    for version in (2, 3):
        after.publish([_config_event(tenant, key, version, version) for key in keys])

    sink.wait_for(
        lambda s: all(s.state.get((tenant, key)) is not None and s.state[(tenant, key)].version == 3 for key in keys),
        timeout=SETTLE,
        what="every key's third version",
    )
    for key in keys:
        applied = [c.version for batch in sink.applied for c in batch if (c.tenant, str(c.key)) == (tenant, key)]
        assert applied == [1, 2, 3], (key, applied)
    listed = {s["ShardId"] for s in kinesis_client.list_shards(StreamName=kinesis_stream)["Shards"]}
    assert len(listed) == 4
    assert source.stats.undecodable == 0 and sink.failures == []


def test_an_unreachable_endpoint_is_reported_and_retried_until_stopped(
    live: settings_mod.Settings,
    running: Callable[[KinesisChangeSource, RecordingSink], threading.Thread],
) -> None:
    dead = {**live.environ, "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{free_port()}"}
    unreachable = settings_mod.load(dead, home=live.home)
    source = KinesisChangeSource(
        aws.client(unreachable, "kinesis", connect_timeout=1, retries={"max_attempts": 1}),
        aws.client(live, "dynamodb"),
        TagRouter({"tenantconfig": MemoryConfigStore()}),
        stream_name=live.stream_name,
        lease_table=None,
    )
    sink = RecordingSink()
    thread = running(source, sink)
    sink.wait_for(lambda s: len(s.failures) >= 3, timeout=SETTLE, what="three reported failures")
    assert all(isinstance(e, KinesisUnavailable) for e in sink.failures)
    assert thread.is_alive() and not sink.caught_up_lags


@contextlib.contextmanager
def config_server(live: settings_mod.Settings, router: TagRouter) -> Iterator[ConfigServer]:
    """A real config server on free ports, fed by a Kinesis source on the stack, on its own loop."""
    server = ConfigServer(
        ConfigServerSettings(grpc_port=0, http_port=0),
        source=stack_source(live, router),
        verifier=TokenVerifier(live.auth),
        tags=router.registered_tags,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="upstream-server-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(15)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_chained_source_converges_to_the_read_models_through_an_upstream_server(
    live: settings_mod.Settings, router: TagRouter
) -> None:
    tenant = f"chn-{uuid.uuid4().hex[:10]}"
    assert live.auth.jwt_secret
    secret = live.auth.jwt_secret

    def replicate_token() -> str:
        return issue_dev_token(
            secret,
            tenant="replica",
            scope="config:replicate",
            issuer=live.auth.issuer,
            audience=live.auth.audience,
            now=time.time(),
        )

    with bus_client(live, tenant) as client, config_server(live, router) as upstream:
        poster = Poster(client)
        poster.set("tenantconfig:chain/a", 1)
        poster.set("paramconfig:chain/p", {"deep": [1]})
        poster.set("tenantconfig:chain/gone-before", "x")
        poster.delete("tenantconfig:chain/gone-before")
        source = UpstreamChangeSource(f"127.0.0.1:{upstream.grpc_port}", replicate_token)
        sink, stop = RecordingSink(), threading.Event()
        thread = threading.Thread(target=source.run, args=(sink, stop), name="upstream-source", daemon=True)
        thread.start()
        try:
            sink.wait_for(lambda s: bool(s.caught_up_lags), timeout=SETTLE, what="the chained source's snapshot")
            poster.set("tenantconfig:chain/a", 2)
            poster.set("tenantconfig:chain/gone-after", "y")
            poster.delete("tenantconfig:chain/gone-after")
            wait_until(settled(router, tenant, poster), timeout=SETTLE, what="the read models")
            expected = scanned(router, {tenant})

            changed_after = {(tenant, "tenantconfig:chain/a"), (tenant, "tenantconfig:chain/gone-after")}

            def converged(s: RecordingSink) -> bool:
                # The upstream's snapshot lists live keys only: a key deleted before the
                # chain started may be absent downstream rather than a tombstone; what changed
                # after it started came as changes, tombstones included.
                state = s.tenant_state({tenant})
                return all(
                    state.get(slot) == c or (c.deleted and slot not in state and slot not in changed_after)
                    for slot, c in expected.items()
                ) and set(state) <= set(expected)

            sink.wait_for(
                converged,
                timeout=SETTLE,
                what=f"the chained state to equal the read models' (failures: {sink.failures})",
            )
            state = sink.tenant_state({tenant})
            assert state[(tenant, "tenantconfig:chain/gone-after")].deleted
            assert state[(tenant, "tenantconfig:chain/a")].value == 2
            # Before the upstream is ready it answers UNAVAILABLE, which the source retries.
            assert all(
                isinstance(e, UpstreamUnavailable) and e.code is grpc.StatusCode.UNAVAILABLE for e in sink.failures
            )
        finally:
            stop.set()
            thread.join(15)
        assert not thread.is_alive()
