"""The shared store suite against every adapter, plus adapter-specific behaviour.

DynamoDB and SSM run against the endpoints in ``AWS_ENDPOINT_URL_DYNAMODB`` and
``AWS_ENDPOINT_URL_SSM`` (DynamoDB Local and moto in the local stack) and are skipped when
those are unset. Each run works in its own table and parameter root and removes them after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from projections.errors import ChangeRejected, StoreMisconfigured, StoreThrottled, StoreUnavailable
from projections.model import ConfigKey
from projections.stores.base import Outcome, Rebuildable
from projections.stores.botocore_errors import translate
from projections.stores.dynamodb import TRANSACT_MAX, TRANSACT_MIN, DynamoDBConfigStore
from projections.stores.memory import MemoryConfigStore
from projections.stores.ssm import SSMConfigStore
from tests.unit.store_suite import ConfigStoreSuite, change, new_tenant

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

#: The stores' clock, which dates tombstones. It must lie ahead of the real time: DynamoDB
#: Local's TTL sweeper deletes items whose ``expires_at`` has passed, so a tombstone dated
#: from the suite's T0 (2024) could vanish between a delete and the late ``set`` it guards.
STORE_NOW = datetime(2100, 1, 1, tzinfo=UTC)


def _client_kwargs(variable: str) -> dict[str, Any]:
    endpoint = os.environ.get(variable)
    if not endpoint:
        pytest.skip(f"{variable} is not set: no emulator endpoint to run this backend's suite against")
    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "config": Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
    }
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        # Local emulators accept any credentials; never fall through to a real profile.
        kwargs.update(aws_access_key_id="test", aws_secret_access_key="test")
    return kwargs


@pytest.fixture(scope="module")
def dynamodb_client() -> DynamoDBClient:
    return boto3.client("dynamodb", **_client_kwargs("AWS_ENDPOINT_URL_DYNAMODB"))


@pytest.fixture(scope="module")
def ssm_client() -> SSMClient:
    return boto3.client("ssm", **_client_kwargs("AWS_ENDPOINT_URL_SSM"))


@pytest.fixture(scope="module")
def dynamodb_table(dynamodb_client: DynamoDBClient) -> Iterator[str]:
    name = f"tagbus-tenantconfig-test-{uuid.uuid4().hex[:8]}"
    store = DynamoDBConfigStore(dynamodb_client, table_name=name)
    try:
        store.ensure_table()
    except StoreUnavailable as e:
        pytest.fail(f"AWS_ENDPOINT_URL_DYNAMODB is set but unreachable: {e}")
    yield name
    dynamodb_client.delete_table(TableName=name)


@pytest.fixture(scope="module")
def ssm_root(ssm_client: SSMClient) -> Iterator[str]:
    root = f"/tagbustest{uuid.uuid4().hex[:8]}"
    try:
        ssm_client.describe_parameters(MaxResults=1)
    except (BotoCoreError, ClientError) as e:
        pytest.fail(f"AWS_ENDPOINT_URL_SSM is set but unusable: {e}")
    yield root
    names = [
        p["Name"]
        for page in ssm_client.get_paginator("get_parameters_by_path").paginate(Path=root, Recursive=True)
        for p in page.get("Parameters", [])
    ]
    for start in range(0, len(names), 10):
        ssm_client.delete_parameters(Names=names[start : start + 10])


class TestMemoryStore(ConfigStoreSuite):
    @pytest.fixture
    def store(self) -> MemoryConfigStore:
        return MemoryConfigStore()

    @pytest.fixture
    def rebuildable(self) -> MemoryConfigStore:
        return MemoryConfigStore()

    @pytest.fixture
    def tag(self) -> str:
        return "tenantconfig"


class TestDynamoDBStore(ConfigStoreSuite):
    @pytest.fixture(params=[TRANSACT_MIN, 0], ids=["transactions", "puts"])
    def store(
        self, request: pytest.FixtureRequest, dynamodb_client: DynamoDBClient, dynamodb_table: str
    ) -> DynamoDBConfigStore:
        return DynamoDBConfigStore(
            dynamodb_client, table_name=dynamodb_table, clock=lambda: STORE_NOW, transact_min=request.param
        )

    @pytest.fixture
    def rebuildable(self, dynamodb_client: DynamoDBClient) -> Iterator[DynamoDBConfigStore]:
        """A logical table behind an alias table of its own, removed with all its generations."""
        suffix = uuid.uuid4().hex[:8]
        logical, alias_table = f"tagbus-rebuilt-test-{suffix}", f"tagbus-aliases-test-{suffix}"
        store = DynamoDBConfigStore(
            dynamodb_client, table_name=logical, alias_table=alias_table, clock=lambda: STORE_NOW
        )
        store.ensure_table()
        yield store
        for page in dynamodb_client.get_paginator("list_tables").paginate():
            for name in page["TableNames"]:
                if name in (logical, alias_table) or name.startswith(f"{logical}-"):
                    dynamodb_client.delete_table(TableName=name)

    @pytest.fixture
    def tag(self) -> str:
        return "tenantconfig"

    def test_a_store_without_an_alias_cannot_be_rebuilt(self, dynamodb_client: DynamoDBClient) -> None:
        store = DynamoDBConfigStore(dynamodb_client, table_name="tagbus-never-made", alias_table=None)
        assert isinstance(store, Rebuildable) and not store.can_rebuild
        with pytest.raises(StoreMisconfigured):
            store.new_generation()

    def test_item_layout(self, store: DynamoDBConfigStore, dynamodb_client: DynamoDBClient) -> None:
        tenant = new_tenant()
        store.apply([change(tenant, "tenantconfig:a/b", 4, {"x": 1.5}, position=77)])
        store.apply([change(tenant, "tenantconfig:gone", 2, deleted=True)])
        item = dynamodb_client.get_item(
            TableName=store.table_name,
            Key={"pk": {"S": f"TENANT#{tenant}"}, "sk": {"S": "tenantconfig:a/b"}},
            ConsistentRead=True,
        )["Item"]
        assert item["value"] == {"S": '{"x":1.5}'}
        assert item["version"] == {"N": "4"} and item["position"] == {"N": "77"}
        assert item["deleted"] == {"BOOL": False} and "expires_at" not in item
        tombstone = dynamodb_client.get_item(
            TableName=store.table_name,
            Key={"pk": {"S": f"TENANT#{tenant}"}, "sk": {"S": "tenantconfig:gone"}},
            ConsistentRead=True,
        )["Item"]
        assert tombstone["deleted"] == {"BOOL": True} and "value" not in tombstone
        assert tombstone["expires_at"] == {"N": str(int((STORE_NOW + timedelta(days=7)).timestamp()))}

    def test_ensure_table_is_idempotent_and_enables_ttl(
        self, store: DynamoDBConfigStore, dynamodb_client: DynamoDBClient
    ) -> None:
        store.ensure_table()
        ttl = dynamodb_client.describe_time_to_live(TableName=store.table_name)["TimeToLiveDescription"]
        assert ttl.get("AttributeName") == "expires_at"
        assert ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")

    def test_large_batch_goes_out_as_transactions_with_stale_items_reported(
        self, dynamodb_client: DynamoDBClient, dynamodb_table: str
    ) -> None:
        store = DynamoDBConfigStore(dynamodb_client, table_name=dynamodb_table, clock=lambda: STORE_NOW)
        tenant = new_tenant()
        keys = [f"tenantconfig:k/{n:03d}" for n in range(TRANSACT_MAX + 30)]
        # Every third key already holds a newer version: its put must come back STALE.
        store.apply([change(tenant, key, 9, "newer") for key in keys[::3]])
        calls: list[int] = []
        counter = lambda params, **_: calls.append(len(params["TransactItems"]))  # noqa: E731
        dynamodb_client.meta.events.register("provide-client-params.dynamodb.TransactWriteItems", counter)
        try:
            result = store.apply([change(tenant, key, 5, f"v{n}") for n, key in enumerate(keys)])
        finally:
            dynamodb_client.meta.events.unregister("provide-client-params.dynamodb.TransactWriteItems", counter)
        outcomes = [r.outcome for r in result.results]
        assert outcomes == [Outcome.STALE if n % 3 == 0 else Outcome.APPLIED for n in range(len(keys))]
        assert calls and max(calls) <= TRANSACT_MAX, calls
        for n, key in enumerate(keys):
            item = store.get(tenant, ConfigKey.parse(key))
            assert item is not None
            assert (item.version, item.value) == ((9, "newer") if n % 3 == 0 else (5, f"v{n}"))

    def test_a_bad_item_fails_alone_and_the_rest_of_the_transaction_lands(
        self, dynamodb_client: DynamoDBClient, dynamodb_table: str
    ) -> None:
        store = DynamoDBConfigStore(dynamodb_client, table_name=dynamodb_table, clock=lambda: STORE_NOW)
        tenant = new_tenant()
        changes = [change(tenant, f"tenantconfig:k{n}", 1, "small") for n in range(5)]
        # Over DynamoDB's 400 KB item limit: the whole TransactWriteItems is refused.
        changes[2] = change(tenant, "tenantconfig:huge", 1, "x" * 500_000)
        result = store.apply(changes)
        assert [r.outcome for r in result.results] == [Outcome.APPLIED] * 2 + [Outcome.FAILED] + [Outcome.APPLIED] * 2
        assert isinstance(result.results[2].error, ChangeRejected)
        assert store.get(tenant, ConfigKey.parse("tenantconfig:huge")) is None
        assert store.get(tenant, ConfigKey.parse("tenantconfig:k4")) is not None

    @pytest.mark.parametrize("bulk_write", ["transact", "batch"])
    def test_bulk_put_writes_final_states_with_either_request(
        self, dynamodb_client: DynamoDBClient, dynamodb_table: str, bulk_write: Any
    ) -> None:
        store = DynamoDBConfigStore(
            dynamodb_client, table_name=dynamodb_table, clock=lambda: STORE_NOW, bulk_write=bulk_write
        )
        tenant = new_tenant()
        changes = [change(tenant, f"tenantconfig:b/{n:03d}", n + 1, {"n": n}) for n in range(TRANSACT_MAX + 7)]
        changes.append(change(tenant, "tenantconfig:b/gone", 3, deleted=True))
        assert store.bulk_put(changes, table=dynamodb_table) == len(changes)
        page = store.list(tenant, "tenantconfig:b/", limit=1000)
        assert [(str(i.key), i.version, i.value) for i in page.items] == [
            (str(c.key), c.version, c.value) for c in changes[:-1]
        ]
        with pytest.raises(ChangeRejected):
            store.bulk_put([change(tenant, "tenantconfig:b/bad", 1, 2**70)], table=dynamodb_table)

    def test_missing_table_is_misconfigured(self, dynamodb_client: DynamoDBClient) -> None:
        store = DynamoDBConfigStore(dynamodb_client, table_name=f"tagbus-missing-{uuid.uuid4().hex[:8]}")
        result = store.apply([change(new_tenant(), "tenantconfig:k", 1, "v")])
        assert result.results[0].outcome is Outcome.FAILED
        assert isinstance(result.results[0].error, StoreMisconfigured)
        with pytest.raises(StoreMisconfigured):
            store.get("t", ConfigKey("tenantconfig", "k"))


class TestSSMStore(ConfigStoreSuite):
    @pytest.fixture
    def store(self, ssm_client: SSMClient, ssm_root: str) -> SSMConfigStore:
        return SSMConfigStore(ssm_client, root=ssm_root, sleep=lambda _: None)

    @pytest.fixture
    def tag(self) -> str:
        return "paramconfig"

    def test_parameter_holds_a_versioned_envelope(self, store: SSMConfigStore, ssm_client: SSMClient) -> None:
        tenant = new_tenant()
        store.apply([change(tenant, "paramconfig:db/url", 3, "postgres://x", position=9)])
        store.apply([change(tenant, "paramconfig:db/old", 2, deleted=True)])
        value = ssm_client.get_parameter(Name=f"{store.root}/{tenant}/db/url")["Parameter"]["Value"]
        assert value.startswith('{"v":"postgres://x","version":3,"position":9,')
        tombstone = ssm_client.get_parameter(Name=f"{store.root}/{tenant}/db/old")["Parameter"]["Value"]
        assert tombstone.startswith('{"deleted":true,"version":2,')

    def test_values_beyond_the_tier_are_rejected(self, ssm_client: SSMClient, ssm_root: str) -> None:
        tenant = new_tenant()
        standard = SSMConfigStore(ssm_client, root=ssm_root, tier="Standard")
        result = standard.apply([change(tenant, "paramconfig:big", 1, "x" * 5000)])
        assert result.results[0].outcome is Outcome.FAILED
        assert isinstance(result.results[0].error, ChangeRejected)
        tiered = SSMConfigStore(ssm_client, root=ssm_root)
        assert tiered.apply([change(tenant, "paramconfig:big", 1, "x" * 5000)]).ok
        item = tiered.get(tenant, ConfigKey("paramconfig", "big"))
        assert item is not None and item.value == "x" * 5000
        huge = tiered.apply([change(tenant, "paramconfig:huge", 1, "x" * 9000)])
        assert isinstance(huge.results[0].error, ChangeRejected)

    def test_names_ssm_cannot_hold_are_rejected(self, store: SSMConfigStore) -> None:
        deep = "/".join(["d"] * 14)
        results = store.apply(
            [
                change("bad tenant", "paramconfig:k", 1, "v"),
                change(new_tenant(), f"paramconfig:{deep}", 1, "v"),
                change(new_tenant(), "tenantconfig:k", 1, "v"),
            ]
        ).results
        assert [r.outcome for r in results] == [Outcome.FAILED] * 3
        assert all(isinstance(r.error, ChangeRejected) for r in results)


class _ThrottlingSSM:
    """An SSM client double that throttles the first ``n`` calls of every operation."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: dict[str, int] = {}
        self.parameters: dict[str, str] = {}

    def _maybe_throttle(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        if self.calls[operation] <= self.n:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, operation)

    def get_parameters(self, **request: Any) -> dict[str, Any]:
        self._maybe_throttle("GetParameters")
        names: list[str] = request["Names"]
        found = [{"Name": n, "Value": self.parameters[n]} for n in names if n in self.parameters]
        return {"Parameters": found, "InvalidParameters": [n for n in names if n not in self.parameters]}

    def put_parameter(self, **request: Any) -> dict[str, Any]:
        self._maybe_throttle("PutParameter")
        self.parameters[request["Name"]] = request["Value"]
        return {"Version": 1}


def test_ssm_backs_off_while_throttled_then_succeeds() -> None:
    sleeps: list[float] = []
    client = _ThrottlingSSM(n=2)
    store = SSMConfigStore(client, sleep=sleeps.append)  # type: ignore[arg-type]
    changes = [change("t", "paramconfig:k", v, v) for v in (1, 3, 2)]
    result = store.apply(changes)
    assert result.ok
    assert [r.outcome for r in result.results] == [Outcome.STALE, Outcome.APPLIED, Outcome.STALE]
    # coalesced: one read and one write for three changes of one key
    assert client.calls == {"GetParameters": 3, "PutParameter": 3}
    assert len(sleeps) == 4 and sleeps[0] <= sleeps[1] * 2


def test_ssm_reports_throttled_after_its_attempts() -> None:
    client = _ThrottlingSSM(n=100)
    store = SSMConfigStore(client, max_attempts=3, sleep=lambda _: None)  # type: ignore[arg-type]
    result = store.apply([change("t", "paramconfig:k", 1, "v"), change("t", "paramconfig:k", 0 + 2, "w")])
    assert [r.outcome for r in result.results] == [Outcome.FAILED, Outcome.FAILED]
    assert all(isinstance(r.error, StoreThrottled) and r.error.retryable for r in result.results)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ProvisionedThroughputExceededException", 400, StoreThrottled),
        ("ThrottlingException", 400, StoreThrottled),
        ("InternalServerError", 500, StoreUnavailable),
        ("SomethingNew", 503, StoreUnavailable),
        ("ResourceNotFoundException", 400, StoreMisconfigured),
        ("ValidationException", 400, ChangeRejected),
    ],
)
def test_botocore_errors_are_translated_by_code(code: str, status: int, expected: type[Exception]) -> None:
    response: Any = {
        "Error": {"Code": code, "Message": "whatever"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    error = ClientError(response, "PutItem")
    translated = translate(error, store="dynamodb", operation="PutItem")
    assert type(translated) is expected
    assert translated.code == code


def test_dynamodb_scan_pages_through_the_aliased_table_and_skips_foreign_items(
    dynamodb_client: DynamoDBClient, dynamodb_table: str
) -> None:
    alias_table = f"tagbus-aliases-test-{uuid.uuid4().hex[:8]}"
    logical = f"tagbus-logical-{uuid.uuid4().hex[:8]}"
    store = DynamoDBConfigStore(dynamodb_client, table_name=logical, alias_table=alias_table, clock=lambda: STORE_NOW)
    assert store.alias is not None
    store.alias.ensure_table()
    try:
        store.alias.switch(store.alias.read(), dynamodb_table, 1)
        tenant = new_tenant()
        changes = [change(tenant, f"tenantconfig:p/{n}", n + 1, n) for n in range(7)]
        store.apply([*changes, change(tenant, "tenantconfig:p/gone", 2, deleted=True)])
        dynamodb_client.put_item(
            TableName=dynamodb_table, Item={"pk": {"S": "NOT-A-TENANT"}, "sk": {"S": f"{tenant}:x"}}
        )
        dynamodb_client.put_item(
            TableName=dynamodb_table,
            Item={"pk": {"S": f"TENANT#{tenant}"}, "sk": {"S": "tenantconfig:p/broken"}, "version": {"N": "1"}},
        )
        requests: list[dict[str, Any]] = []

        def small_pages(params: dict[str, Any], **_: Any) -> None:
            params["Limit"] = 3
            requests.append(dict(params))

        dynamodb_client.meta.events.register("provide-client-params.dynamodb.Scan", small_pages)
        try:
            scanned = [c for c in store.scan() if c.tenant == tenant]
        finally:
            dynamodb_client.meta.events.unregister("provide-client-params.dynamodb.Scan", small_pages)
        assert {r["TableName"] for r in requests} == {dynamodb_table}
        assert len(requests) > 3 and all(r["ConsistentRead"] for r in requests)
        expected = [*changes, change(tenant, "tenantconfig:p/gone", 2, deleted=True)]
        assert sorted(scanned, key=lambda c: str(c.key)) == sorted(expected, key=lambda c: str(c.key))
    finally:
        dynamodb_client.delete_table(TableName=alias_table)
        dynamodb_client.delete_item(
            TableName=dynamodb_table, Key={"pk": {"S": "NOT-A-TENANT"}, "sk": {"S": f"{tenant}:x"}}
        )


def test_dynamodb_scan_of_a_missing_table_is_misconfigured(dynamodb_client: DynamoDBClient) -> None:
    store = DynamoDBConfigStore(dynamodb_client, table_name=f"tagbus-missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreMisconfigured):
        list(store.scan())
