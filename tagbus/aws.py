"""boto3 clients built from the settings (endpoint overrides included), never at import time."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from tagbus.settings import Settings


def client(settings: Settings, service: str, **config: Any) -> Any:
    """A boto3 client for ``service``; local endpoints come from ``AWS_ENDPOINT_URL_<SERVICE>``."""
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
