"""The config server's HTTP side: the watch as Server-Sent Events, health and metrics.

``GET /v1/config:watch?prefix=…&prefix=…&since=N`` streams ``text/event-stream``: events
``snapshot``, ``set``, ``delete``, ``progress`` and ``resync``, each with one JSON ``data:``
line shaped like the gRPC messages (the value as JSON, not as text). ``id:`` is the position
on ``set``, ``delete``, ``progress`` and the last ``snapshot`` chunk, so a client resumes with
``Last-Event-ID`` (or ``?since=``, which wins when both are given); a ``resync`` clears it
(an empty ``id:``), so an ``EventSource`` reconnects without it and lists again. Without a
``prefix`` the stream watches every key of the tenant. Comment lines keep a quiet stream
open through proxies. Authentication and tenant rules are those of the gRPC service;
refusals are ``application/problem+json`` (401, 403, 422, 429, 503) before the stream starts.

The stream is a plain ASGI endpoint, not a ``StreamingResponse`` or ``sse-starlette``:
it needs its own task to be the one writing (a watcher that stops reading is cut by
cancelling that write), and one task per stream besides the writer (listening for the
disconnect) rather than the two or three a response class starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from config_server.access import Access, Refusal, Refused, invalid
from config_server.settings import ConfigServerSettings
from config_server.state import ConfigState, Entry
from config_server.watch import (
    Frame,
    Keepalive,
    ProgressFrame,
    ResyncFrame,
    ServiceStats,
    SnapshotFrame,
    StreamSlots,
    WatchSession,
)

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
WATCH_PATH = "/v1/config:watch"
_TYPE_BASE = "https://tagbus.dev/problems/"
_MAX_POSITION = 2**64 - 1
_STATUSES = {
    Refusal.UNAUTHENTICATED: (401, "unauthorized", "Authentication failed"),
    Refusal.PERMISSION_DENIED: (403, "forbidden", "Not allowed"),
    Refusal.INVALID: (422, "bad-parameter", "Bad query parameter"),
    Refusal.NOT_FOUND: (404, "not-found", "Not found"),
    Refusal.EXHAUSTED: (429, "too-many-streams", "Too many watch streams"),
    Refusal.UNAVAILABLE: (503, "unavailable", "Service unavailable"),
}
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx buffers a response unless told not to; a watch must not wait in a proxy.
    (b"x-accel-buffering", b"no"),
]
_ENCODED_CHANGES = 4_096


def create_app(
    state: ConfigState,
    access: Access,
    *,
    slots: StreamSlots,
    settings: ConfigServerSettings,
    stats: ServiceStats,
    registry: CollectorRegistry,
) -> Starlette:
    """The HTTP app: the SSE watch, ``/healthz``, ``/readyz`` and ``/metrics``."""

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.ready:
            return _json({"status": "ready", "position": state.position})
        return problem(Refused(Refusal.UNAVAILABLE, "the config server is still loading its state", retry_after=1))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    watch = SseWatch(state, access, slots=slots, settings=settings, stats=stats)
    return Starlette(
        routes=[
            Route(WATCH_PATH, watch, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


class SseWatch:
    """The ASGI endpoint of ``GET /v1/config:watch``."""

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        try:
            caller = await self._access.authorize(request.headers.get("authorization"), watch=True)
            params = request.query_params
            prefixes = self._access.prefixes(params.getlist("prefix") if "prefix" in params else [""])
            since = _position(params["since"], "since") if "since" in params else None
            if since is None and request.headers.get("last-event-id"):
                since = _position(request.headers["last-event-id"], "Last-Event-ID")
            session = WatchSession.open(
                self._state,
                caller=caller,
                prefixes=prefixes,
                since=since,
                slots=self._slots,
                settings=self._settings,
                stats=self._stats,
                protocol="sse",
            )
        except Refused as e:
            self._stats.requests["Watch", e.refusal.value] += 1
            await problem(e)(scope, receive, send)
            return
        self._stats.requests["Watch", "ok"] += 1
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if task is not None:
                task.cancel()

        listener = asyncio.create_task(listen())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
            async with contextlib.aclosing(
                session.frames(keepalive_seconds=self._settings.sse_keepalive_seconds)
            ) as frames:
                async for frame in frames:
                    chunk = self._encode(frame)
                    with session.writing():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    session.sent(frame)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (gone.is_set() or session.interrupted):
                raise
            if task is not None:
                task.uncancel()
            # Gone, or cut and not reading: returning with the response unfinished closes
            # the connection.
        finally:
            listener.cancel()
            session.close()

    def _encode(self, frame: Frame) -> bytes:
        if isinstance(frame, Entry):
            slot = (frame.tenant, frame.key, frame.version)
            encoded = self._encoded.get(slot)
            if encoded is None:
                encoded = _change(frame)
                if len(self._encoded) >= _ENCODED_CHANGES:
                    del self._encoded[next(iter(self._encoded))]
                self._encoded[slot] = encoded
            return encoded
        if isinstance(frame, SnapshotFrame):
            data = {"entries": [_entry(e) for e in frame.entries], "position": frame.position, "done": frame.done}
            return _event(b"snapshot", data, frame.position if frame.done else None)
        if isinstance(frame, ProgressFrame):
            data = {"position": frame.position, "at": _iso(frame.at), "source_lag_ms": frame.source_lag_ms}
            return _event(b"progress", data, frame.position)
        if isinstance(frame, Keepalive):
            return b": keepalive\n\n"
        assert isinstance(frame, ResyncFrame)
        data = {"reason": frame.reason, "oldest_position": frame.oldest_position, "detail": frame.detail}
        return b"event: resync\nid:\ndata: " + orjson.dumps(data) + b"\n\n"


def problem(refused: Refused) -> Response:
    """A refusal as ``application/problem+json``."""
    status, slug, title = _STATUSES[refused.refusal]
    headers: dict[str, str] = {}
    if refused.refusal is Refusal.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    if refused.retry_after is not None:
        headers["Retry-After"] = str(refused.retry_after)
    body = {"type": _TYPE_BASE + slug, "title": title, "status": status, "detail": refused.detail}
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


def _position(text: str, name: str) -> int:
    text = text.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 20 or int(text) > _MAX_POSITION:
        raise invalid(f"{name}: a position, an integer from 0 to {_MAX_POSITION}")
    return int(text)


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _iso(at: Any) -> str:
    return str(at.isoformat().replace("+00:00", "Z"))


def _entry(entry: Entry) -> dict[str, Any]:
    return {
        "key": entry.key,
        "value": orjson.Fragment(entry.value_json),
        "version": entry.version,
        "position": entry.position,
        "updated_at": _iso(entry.updated_at),
        "tenant": entry.tenant,
    }


def _change(entry: Entry) -> bytes:
    if entry.deleted:
        data: dict[str, Any] = {
            "key": entry.key,
            "version": entry.version,
            "position": entry.position,
            "updated_at": _iso(entry.updated_at),
            "tenant": entry.tenant,
        }
        return _event(b"delete", data, entry.position)
    return _event(b"set", _entry(entry), entry.position)


def _event(name: bytes, data: dict[str, Any], position: int | None) -> bytes:
    head = b"event: " + name + b"\n"
    if position is not None:
        head += b"id: %d\n" % position
    return head + b"data: " + orjson.dumps(data) + b"\n\n"
