"""Reader SDK for tagbus config: a local cache kept current by the config service's Watch.

``ConfigCache`` (threads) and ``AsyncConfigCache`` (asyncio) list the config under some key
prefixes, then apply every change the server pushes; ``get`` answers from memory. After a
disconnect they resume from their last position, re-list when the server answers "resync",
and meanwhile keep serving the last known values, with ``state`` and ``age`` saying how
current they are.

Depends only on ``grpcio``, ``protobuf``, ``orjson`` and the generated ``config_api.v1``
modules, so services can install it without the server's dependencies.
"""

from config_client._backoff import Backoff
from config_client._state import CacheStats, ChangeEvent, Item, State, TokenSource
from config_client.aio import AsyncConfigCache
from config_client.cache import ConfigCache
from config_client.errors import (
    CacheClosed,
    ConfigClientError,
    Disconnected,
    InvalidRequest,
    NotReady,
    PermissionDenied,
    ProtocolError,
    Stalled,
    TokenUnavailable,
    Unauthenticated,
    WatchRejected,
)

__all__ = [
    "AsyncConfigCache",
    "Backoff",
    "CacheClosed",
    "CacheStats",
    "ChangeEvent",
    "ConfigCache",
    "ConfigClientError",
    "Disconnected",
    "InvalidRequest",
    "Item",
    "NotReady",
    "PermissionDenied",
    "ProtocolError",
    "Stalled",
    "State",
    "TokenSource",
    "TokenUnavailable",
    "Unauthenticated",
    "WatchRejected",
]
