"""boto3 clients built from the settings (endpoint overrides included), never at import time.

The one factory of AWS clients: components receive them, never build them. The overloads
give each service its typed client (``mypy-boto3-*`` stubs), so adapters are checked
against the real API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

import boto3
from botocore.config import Config

from tagbus.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_kinesis import KinesisClient
    from mypy_boto3_ssm import SSMClient


@overload
def client(settings: Settings, service: Literal["kinesis"], **config: Any) -> KinesisClient: ...
@overload
def client(settings: Settings, service: Literal["dynamodb"], **config: Any) -> DynamoDBClient: ...
@overload
def client(settings: Settings, service: Literal["ssm"], **config: Any) -> SSMClient: ...
@overload
def client(settings: Settings, service: str, **config: Any) -> Any: ...


def client(settings: Settings, service: str, **config: Any) -> Any:
    """A boto3 client for ``service``; local endpoints come from ``AWS_ENDPOINT_URL_<SERVICE>``.

    ``config`` goes to botocore's ``Config`` (timeouts, pool size); retries default to
    botocore's standard mode with 3 attempts, and callers that retry themselves pass their own.
    """
    env = settings.environ
    endpoint = env.get(f"AWS_ENDPOINT_URL_{service.upper()}") or env.get("AWS_ENDPOINT_URL") or None
    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    retries = config.pop("retries", {"mode": "standard", "max_attempts": 3})
    return session.client(service, endpoint_url=endpoint, config=Config(retries=retries, **config))  # type: ignore[call-overload]
