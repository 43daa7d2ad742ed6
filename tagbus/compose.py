"""Wiring: builds each part from the settings. The only module that knows every component.

The tag registry lives here (:func:`tag_router`): every part that needs the tags — the bus
(which keys it accepts), the KCL processor (where they are projected), the config server
(what it snapshots and serves), replay — takes them from this one function.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from config_server.access import REPLICATE_SCOPE
from consumers.daemon import APPLICATION_NAME as CONSUMER_APPLICATION
from consumers.processor import ConfigProjectionProcessor, build_processor
from event_bus.app import create_app
from kernel.auth import TokenVerifier, issue_dev_token
from projections.errors import InvalidConfigKey, UnknownTag
from projections.model import ConfigItem
from projections.router import TagRouter
from projections.stores.dynamodb import DynamoDBConfigStore
from projections.stores.ssm import SSMConfigStore
from tagbus import aws
from tagbus.settings import Settings, SettingsError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

    from config_server.source import ChangeSource


#: The tenant a chained server's development token names (its scope makes it span every tenant).
REPLICA_TENANT = "config-replica"


def tag_router(dynamodb: DynamoDBClient, ssm: SSMClient) -> TagRouter:
    """The tag registry: which read model holds each tag's keys. Adding a tag is one line here."""
    router = TagRouter()
    router.register("tenantconfig", DynamoDBConfigStore(dynamodb))
    router.register("paramconfig", SSMConfigStore(ssm))
    return router


def build_router(settings: Settings) -> TagRouter:
    """The tag router with the built-in read models, on clients built from the settings."""
    return tag_router(aws.client(settings, "dynamodb"), aws.client(settings, "ssm"))


def shard_processor(settings: Settings) -> ConfigProjectionProcessor:
    """The KCL record processor of one shard (``python -m tagbus.processor``)."""
    dynamodb = aws.client(settings, "dynamodb")
    return build_processor(tag_router(dynamodb, aws.client(settings, "ssm")), dynamodb)


class RouterConfigReader:
    """Adapts the tag router to the bus's ``ConfigReader`` port (JSON-ready mappings)."""

    def __init__(self, router: TagRouter) -> None:
        self._router = router

    def get(self, tenant: str, key: str) -> Mapping[str, Any] | None:
        try:
            item = self._router.get(tenant, key)
        except (InvalidConfigKey, UnknownTag):
            return None
        return _item_json(item) if item else None

    def list(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None
    ) -> tuple[list[Mapping[str, Any]], str | None]:
        if ":" in prefix:
            page = self._router.list(tenant, prefix, limit=limit, start_after=start_after)
            return [_item_json(i) for i in page.items], page.next_token
        # No tag in the prefix: walk the tags it matches in key order, one page across them.
        items: list[ConfigItem] = []
        for tag in sorted(t for t in self._router.registered_tags if t.startswith(prefix)):
            if start_after and start_after.partition(":")[0] > tag:
                continue
            after = start_after if start_after and start_after.startswith(tag + ":") else None
            page = self._router.list(tenant, tag + ":", limit=limit - len(items), start_after=after)
            items.extend(page.items)
            if page.next_token:
                return [_item_json(i) for i in items], page.next_token
            if len(items) >= limit:
                return [_item_json(i) for i in items], str(items[-1].key)
        return [_item_json(i) for i in items], None


def _item_json(item: ConfigItem) -> dict[str, Any]:
    return {
        "key": str(item.key),
        "value": item.value,
        "version": item.version,
        "updated_at": item.updated_at.isoformat().replace("+00:00", "Z"),
    }


def bus_app(settings: Settings) -> FastAPI:
    router = build_router(settings)
    return create_app(settings.bus(), tags=router.registered_tags, config_reader=RouterConfigReader(router))


def config_source(settings: Settings, router: TagRouter) -> ChangeSource:
    """Where the config server's changes come from: the Kinesis stream, or an upstream server.

    From Kinesis, the server starts at the KCL consumer's checkpoints (its lease table), after
    a snapshot of the read models through ``router``. With ``TAGBUS_CONFIG_UPSTREAM`` it
    watches that server instead, with a ``config:replicate`` token.
    """
    from config_server.kinesis import KinesisChangeSource
    from config_server.upstream import UpstreamChangeSource

    if settings.config_upstream:
        return UpstreamChangeSource(settings.config_upstream, replicate_token(settings))

    # The source retries with its own per-shard backoff; botocore's retries would only hide
    # an endpoint that hangs from it.
    kinesis = aws.client(
        settings, "kinesis", connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 1}
    )
    return KinesisChangeSource(
        kinesis,
        aws.client(settings, "dynamodb"),
        router,
        stream_name=settings.stream_name,
        lease_table=CONSUMER_APPLICATION,
    )


def replicate_token(settings: Settings) -> Callable[[], str]:
    """The token a chained server watches its upstream with: the configured one, or a dev token.

    A development token is made anew for each watch, so it never expires under a long chain.
    """
    configured = settings.config_upstream_token
    if configured:
        return lambda: configured
    secret = settings.auth.jwt_secret
    if not secret:
        raise SettingsError(
            "TAGBUS_CONFIG_UPSTREAM needs TAGBUS_CONFIG_UPSTREAM_TOKEN (scope config:replicate),"
            " or TAGBUS_JWT_SECRET to make a development one"
        )
    return lambda: issue_dev_token(
        secret,
        tenant=REPLICA_TENANT,
        subject=f"config-server@{socket.gethostname()}",
        scope=REPLICATE_SCOPE,
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        now=time.time(),
    )


def run_config_server(settings: Settings) -> int:
    """Run the config server until SIGTERM/SIGINT (``tagbus config-server``); its exit code."""
    from config_server.server import run

    router = build_router(settings)
    return run(
        settings.config_server(),
        source=config_source(settings, router),
        verifier=TokenVerifier(settings.auth),
        tags=router.registered_tags,
    )
