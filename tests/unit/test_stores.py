"""The shared store suite against every adapter, plus adapter-specific behaviour, without emulators.

DynamoDB and SSM run against moto's in-process ``mock_aws``; the same suites run against
DynamoDB Local and moto's server in ``tests/integration/test_stores_live.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from projections.errors import ChangeRejected, StoreError, StoreMisconfigured, StoreThrottled, StoreUnavailable
from projections.stores.base import Outcome
from projections.stores.botocore_errors import translate
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.memory import MemoryConfigStore
from projections.stores.ssm import SSMConfigStore
from tests.fixtures.in_process_aws import in_process
from tests.fixtures.store_suite import ConfigStoreSuite, DynamoDBStoreSuite, SSMStoreSuite, change

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient


@pytest.fixture(scope="module")
def aws() -> Iterator[None]:
    """moto's in-process AWS for this module: no request leaves the process."""
    with mock_aws():
        yield


@pytest.fixture(scope="module")
def dynamodb_client(aws: None) -> DynamoDBClient:
    return boto3.client("dynamodb", **in_process("dynamodb"))


@pytest.fixture(scope="module")
def ssm_client(aws: None) -> SSMClient:
    return boto3.client("ssm", **in_process("ssm"))


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


class TestDynamoDBStore(DynamoDBStoreSuite):
    in_process = True


class TestSSMStore(SSMStoreSuite):
    pass


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


class _UnprocessingDynamoDB:
    """A DynamoDB client double whose ``BatchWriteItem`` leaves one item unprocessed ``n`` times."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.requests: list[int] = []
        self.written: list[dict[str, Any]] = []

    def batch_write_item(self, **request: Any) -> dict[str, Any]:
        [(table, puts)] = request["RequestItems"].items()
        self.requests.append(len(puts))
        if len(self.requests) <= self.n:
            self.written += [p["PutRequest"]["Item"] for p in puts[1:]]
            return {"UnprocessedItems": {table: puts[:1]}}
        self.written += [p["PutRequest"]["Item"] for p in puts]
        return {"UnprocessedItems": {}}


def test_dynamodb_bulk_put_sends_unprocessed_items_again_backing_off() -> None:
    client = _UnprocessingDynamoDB(n=2)
    store = DynamoDBConfigStore(client, alias_table=None, bulk_write="batch")  # type: ignore[arg-type]
    sleeps: list[float] = []
    changes = [change("t", f"tenantconfig:k{i}", 1, i) for i in range(3)]
    assert store.bulk_put(changes, table="fresh", base_delay=0.1, max_delay=0.15, sleep=sleeps.append) == 3
    assert client.requests == [3, 1, 1] and len(client.written) == 3
    # equal jitter: each pause lies in the upper half of its (capped, doubling) ceiling
    assert 0.05 <= sleeps[0] <= 0.1 and 0.075 <= sleeps[1] <= 0.15


def test_dynamodb_bulk_put_gives_up_after_its_attempts() -> None:
    client = _UnprocessingDynamoDB(n=100)
    store = DynamoDBConfigStore(client, alias_table=None, bulk_write="batch")  # type: ignore[arg-type]
    sleeps: list[float] = []
    with pytest.raises(StoreError, match="unprocessed after 3 BatchWriteItem attempts"):
        store.bulk_put([change("t", "tenantconfig:k", 1, "v")], table="fresh", max_attempts=3, sleep=sleeps.append)
    assert len(client.requests) == 3 and len(sleeps) == 2
