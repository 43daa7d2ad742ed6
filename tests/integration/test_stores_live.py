"""The DynamoDB and SSM store suites against real emulators: DynamoDB Local and moto's server.

The unit tests run the same suites against moto's in-process ``mock_aws``; here they meet
the endpoints in ``AWS_ENDPOINT_URL_DYNAMODB`` and ``AWS_ENDPOINT_URL_SSM`` (the local stack
sets them; skipped when unset), with the store's concurrent writes. Each run works in its own
tables and parameter root and removes them after.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from tests.fixtures.store_suite import DynamoDBStoreSuite, SSMStoreSuite

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

pytestmark = pytest.mark.stack


def emulator(variable: str) -> dict[str, Any]:
    """A client's arguments for the emulator at the endpoint in ``variable``; skips without it."""
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
    return boto3.client("dynamodb", **emulator("AWS_ENDPOINT_URL_DYNAMODB"))


@pytest.fixture(scope="module")
def ssm_client() -> SSMClient:
    return boto3.client("ssm", **emulator("AWS_ENDPOINT_URL_SSM"))


class TestDynamoDBLocal(DynamoDBStoreSuite):
    in_process = False


class TestMotoServerSSM(SSMStoreSuite):
    pass
