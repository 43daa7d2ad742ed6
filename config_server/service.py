"""``tagbus.config.v1.ConfigService`` over ``grpc.aio``: Get and List from memory, and Watch.

The tenant comes from the JWT in the call's ``authorization`` metadata, verified by the
same :class:`~kernel.auth.TokenVerifier` as the HTTP API (scope ``config:read``); Get and
List answer with the values, versions and tenant rules of ``GET /v1/config`` (deleted keys
are absent, an empty prefix lists every tag). A :class:`~config_server.access.Refused` is
rendered here as its status code, once.

A change fanned out to many watchers is encoded once: its ``WatchResponse`` bytes are kept
in a small cache and the Watch method's serializer passes bytes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from config_api.v1 import config_pb2 as pb
from config_server.access import Access, Refusal, Refused, not_ready
from config_server.settings import ConfigServerSettings
from config_server.state import ConfigState, Entry
from config_server.watch import (
    Frame,
    ProgressFrame,
    ResyncFrame,
    ServiceStats,
    SnapshotFrame,
    StreamSlots,
    WatchSession,
)

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ConfigService"].full_name

_CODES = {
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_RESYNC_REASONS = {
    "HISTORY_TOO_SHORT": pb.Resync.HISTORY_TOO_SHORT,
    "TOO_SLOW": pb.Resync.TOO_SLOW,
}
#: Encoded changes kept for the watchers of the same change: enough for a burst of them.
_ENCODED_CHANGES = 4_096

Context = grpc.aio.ServicerContext[Any, Any]
_Response = TypeVar("_Response", bound=Message)


class ConfigServicer:
    """The three methods of ``ConfigService``, over the server's state."""

    def __init__(
        self,
        state: ConfigState,
        access: Access,
        *,
        slots: StreamSlots,
        settings: ConfigServerSettings,
        stats: ServiceStats,
    ) -> None:
        self._state = state
        self._access = access
        self._slots = slots
        self._settings = settings
        self._stats = stats
        self._encoded: dict[tuple[str, str, int], bytes] = {}

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's method handlers, to add to a ``grpc.aio`` server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Get": grpc.unary_unary_rpc_method_handler(
                    self.get, request_deserializer=pb.GetRequest.FromString, response_serializer=_serialize
                ),
                "List": grpc.unary_unary_rpc_method_handler(
                    self.list, request_deserializer=pb.ListRequest.FromString, response_serializer=_serialize
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=_serialize
                ),
            },
        )

    async def get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        async def answer() -> pb.GetResponse:
            caller = await self._access.authorize(_authorization(context))
            key = self._access.key(request.key)
            if not self._state.ready:
                raise not_ready()
            entry = self._state.get(caller.tenant, key)
            if entry is None:
                raise Refused(Refusal.NOT_FOUND, f"no config key {key!r}")
            return pb.GetResponse(entry=_entry(entry), position=self._state.position)

        return await self._unary("Get", answer, context)

    async def list(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        async def answer() -> pb.ListResponse:
            caller = await self._access.authorize(_authorization(context))
            prefix = self._access.prefix(request.prefix)
            size = self._access.page_size(request.page_size)
            after = self._access.page_token(request.page_token)
            if not self._state.ready:
                raise not_ready()
            entries, following = self._state.page(caller.tenant, prefix, limit=size, start_after=after)
            return pb.ListResponse(
                entries=[_entry(e) for e in entries], next_page_token=following or "", position=self._state.position
            )

        return await self._unary("List", answer, context)

    async def watch(self, request: pb.WatchRequest, context: Context) -> None:
        try:
            caller = await self._access.authorize(_authorization(context), watch=True)
            prefixes = self._access.prefixes(list(request.prefixes))
            since = request.since if request.HasField("since") else None
            session = WatchSession.open(
                self._state,
                caller=caller,
                prefixes=prefixes,
                since=since,
                slots=self._slots,
                settings=self._settings,
                stats=self._stats,
                protocol="grpc",
            )
        except Refused as e:
            self._stats.requests["Watch", e.refusal.value] += 1
            await _abort(context, e)
            return
        self._stats.requests["Watch", "ok"] += 1
        try:
            async with contextlib.aclosing(session.frames()) as frames:
                async for frame in frames:
                    message = self._encode(frame)
                    with session.writing():
                        await context.write(message)
                    session.sent(frame)
        except asyncio.CancelledError:
            if not session.interrupted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            # The client stopped reading. Trailers queue behind the data it does not read, so
            # awaiting an abort would hold this handler (and the tenant's stream slot) as
            # long as the client does; the status is set instead and sent by gRPC if the
            # client ever reads again. What it has is consistent up to its last position.
            context.set_code(grpc.StatusCode.ABORTED)
            context.set_details("the watcher stopped reading and was cut; watch again (resume with since)")
        finally:
            session.close()

    async def _unary(self, method: str, answer: Callable[[], Any], context: Context) -> _Response:
        try:
            response: _Response = await answer()
        except Refused as e:
            self._stats.requests[method, e.refusal.value] += 1
            await _abort(context, e)
            raise AssertionError("abort raises") from e
        self._stats.requests[method, "ok"] += 1
        return response

    def _encode(self, frame: Frame) -> bytes | pb.WatchResponse:
        if isinstance(frame, Entry):
            slot = (frame.tenant, frame.key, frame.version)
            encoded = self._encoded.get(slot)
            if encoded is None:
                encoded = pb.WatchResponse(change=_change(frame)).SerializeToString()
                if len(self._encoded) >= _ENCODED_CHANGES:
                    del self._encoded[next(iter(self._encoded))]
                self._encoded[slot] = encoded
            return encoded
        if isinstance(frame, SnapshotFrame):
            return pb.WatchResponse(
                snapshot=pb.Snapshot(
                    entries=[_entry(e) for e in frame.entries], position=frame.position, done=frame.done
                )
            )
        if isinstance(frame, ProgressFrame):
            return pb.WatchResponse(
                progress=pb.Progress(
                    position=frame.position, at=_timestamp(frame.at), source_lag_ms=frame.source_lag_ms
                )
            )
        assert isinstance(frame, ResyncFrame)
        return pb.WatchResponse(
            resync=pb.Resync(
                reason=_RESYNC_REASONS[frame.reason], oldest_position=frame.oldest_position, detail=frame.detail
            )
        )


def _serialize(message: bytes | Message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _authorization(context: Context) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization":
            return value if isinstance(value, str) else None
    return None


async def _abort(context: Context, refused: Refused) -> None:
    trailers: tuple[tuple[str, str], ...] = ()
    if refused.retry_after is not None:
        trailers = (("retry-after", str(refused.retry_after)),)
    await context.abort(_CODES[refused.refusal], refused.detail, trailers)


def _timestamp(at: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _entry(entry: Entry) -> pb.Entry:
    return pb.Entry(
        key=entry.key,
        value_json=entry.value_json,
        version=entry.version,
        position=entry.position,
        updated_at=_timestamp(entry.updated_at),
        tenant=entry.tenant,
    )


def _change(entry: Entry) -> pb.Change:
    return pb.Change(
        kind=pb.Change.DELETE if entry.deleted else pb.Change.SET,
        key=entry.key,
        value_json=entry.value_json,
        version=entry.version,
        position=entry.position,
        updated_at=_timestamp(entry.updated_at),
        tenant=entry.tenant,
    )
