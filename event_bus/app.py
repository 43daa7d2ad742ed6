"""The ingest HTTP app: CloudEvents in, ``201`` only after the events table committed them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import quote

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from event_bus.admission import Admission, InFlightLimit
from event_bus.backpressure import pipeline_lag
from event_bus.group_commit import GroupCommitter
from event_bus.logs import AccessLog, request_id
from event_bus.openapi import BATCH_TYPES, MAX_PAGE, SINGLE_TYPES, describe
from event_bus.partitions import PartitionKeeper
from event_bus.problems import (
    PROBLEM_CONTENT_TYPE,
    FieldError,
    Problem,
    conflict,
    from_auth,
    invalid,
    not_found,
    request_timeout,
    too_large,
    unavailable,
    unsupported_media_type,
)
from event_bus.quotas import QuotaGate
from event_bus.settings import BusSettings
from event_bus.store import AppendResult, EventStore, IdConflict, StoreUnavailable, VersionConflict
from event_bus.validation import (
    MAX_ID_CHARS,
    NewEvent,
    decode_json,
    may_prefix_config_key,
    parse_config_key,
    parse_event,
)
from kernel.auth import AuthError, Principal, TokenVerifier
from kernel.gc_tuning import quiet_collector

log = logging.getLogger("tagbus.bus")

#: A page of a stream stops growing past this many bytes of events (its ``next`` says where
#: the rest begins), and the rows behind it are read this many at a time.
_MAX_PAGE_BYTES = 4 * 1_048_576
_READ_CHUNK = 64


class ConfigReader(Protocol):
    """Reads config keys from their read models; implemented by the projections' router."""

    def get(self, tenant: str, key: str) -> Mapping[str, Any] | None: ...

    def list(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None
    ) -> tuple[list[Mapping[str, Any]], str | None]: ...


@dataclass(frozen=True, slots=True)
class _Metrics:
    registry: CollectorRegistry
    requests: Counter
    events: Counter
    latency: Histogram
    batch_size: Histogram

    @classmethod
    def create(cls) -> _Metrics:
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("tagbus_http_requests", "HTTP requests", ["route", "status", "tier"], registry=registry),
            Counter("tagbus_events_appended", "Events committed to the events table", ["tier"], registry=registry),
            Histogram(
                "tagbus_http_request_seconds",
                "HTTP request latency",
                ["route"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                registry=registry,
            ),
            Histogram(
                "tagbus_commit_batch_events",
                "Events per committed transaction",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500),
                registry=registry,
            ),
        )


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem.to_json()),
        status_code=problem.status,
        headers=dict(problem.headers),
        media_type=PROBLEM_CONTENT_TYPE,
    )


Handler = Callable[..., Awaitable[Response]]

#: (method, path, handler, summary, success status), in the order they are matched.
_ROUTES = (
    ("POST", "/v1/events", "post_event", "Append one CloudEvent", 201),
    ("POST", "/v1/events:batch", "post_batch", "Append up to 500 CloudEvents atomically", 201),
    ("GET", "/v1/events/{event_id:path}", "get_event", "Read one stored event of the caller's tenant", 200),
    ("GET", "/v1/streams/{stream:path}", "get_stream", "Read a stream's events in version order", 200),
    ("GET", "/v1/config/{key:path}", "get_config", "Current value of a config key", 200),
    ("GET", "/v1/config", "list_config", "Config keys under a prefix", 200),
    ("GET", "/healthz", "healthz", "Liveness", 200),
    ("GET", "/readyz", "readyz", "Readiness: the database answers", 200),
    ("GET", "/metrics", "prometheus_metrics", "Prometheus metrics", 200),
)
#: Operability routes: no metrics, access line or problem wrapping of their own.
_UNOBSERVED = frozenset({"healthz", "readyz", "prometheus_metrics"})


def create_app(
    settings: BusSettings,
    *,
    tags: Collection[str],
    config_reader: ConfigReader | None = None,
    store: EventStore | None = None,
    verifier: TokenVerifier | None = None,
    body_timeout_seconds: float = 30.0,
) -> FastAPI:
    """Build the bus app; the composition root passes the tags and the config read side.

    ``body_timeout_seconds`` bounds how long one request body may take to arrive (``408``
    after it): the server bounds request heads, the app the bodies it reads.
    """
    bus = _Bus(
        settings,
        tags=frozenset(tags),
        config_reader=config_reader,
        store=store or EventStore(settings.database_url, pool_size=settings.pool_size),
        verifier=verifier or TokenVerifier(settings.auth),
        body_timeout_seconds=body_timeout_seconds,
    )
    # No slash redirects: an API answers the path it was asked, and a 307 is no problem+json.
    # FastAPI's native OpenTelemetry asks the global providers (environment lookups) on every
    # request, which showed in the bus's CPU profile. The bus exports Prometheus metrics.
    no_otel: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="tagbus event bus", version="0.1.0", lifespan=bus.lifespan, redirect_slashes=False, telemetry=no_otel
    )

    # Past this many requests in progress the bus answers 503 at once (health and metrics exempt).
    # The bus's HTTP server refuses on the same count before it makes a task (``build_server``).
    shed = bus.metrics.requests.labels("admission", "503", "none")
    admission = Admission(settings.max_in_flight, exempt=("/healthz", "/readyz", "/metrics"), on_shed=shed.inc)
    app.state.admission = admission
    app.add_middleware(InFlightLimit, admission=admission)
    app.add_exception_handler(Problem, _on_problem)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]

    handlers: dict[str, Handler] = {}
    for method, path, name, summary, status in _ROUTES:
        handler = getattr(bus, name)
        if name not in _UNOBSERVED:
            handler = bus.observed(name, handler)
        handlers[name] = handler
        route_name = "metrics" if name == "prometheus_metrics" else name
        app.add_api_route(path, handler, methods=[method], summary=summary, status_code=status, name=route_name)

    # The two ingest routes are also mounted as plain Starlette routes ahead of FastAPI's:
    # they parse their own bodies, so FastAPI's per-request dependency solving only cost
    # CPU, a large share of the bus's time under load. FastAPI's routes stay for /docs.
    app.router.routes[0:0] = [
        Route("/v1/events", handlers["post_event"], methods=["POST"]),
        Route("/v1/events:batch", handlers["post_batch"], methods=["POST"]),
    ]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _on_problem(_: Request, problem: Problem) -> Response:
    return _problem_response(problem)


async def _on_http_error(_: Request, error: StarletteHTTPException) -> Response:
    # Unrouted paths and methods answer in the contract's error format too.
    slug = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http-error")
    try:
        title = HTTPStatus(error.status_code).phrase
    except ValueError:
        title = "HTTP error"
    headers = dict(error.headers or {})
    return _problem_response(Problem(error.status_code, slug, title, str(error.detail), headers=headers))


class _Bus:
    """The bus's request handlers, with what they share: the store, the committer, quotas, auth."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        tags: frozenset[str],
        config_reader: ConfigReader | None,
        store: EventStore,
        verifier: TokenVerifier,
        body_timeout_seconds: float,
    ) -> None:
        self.settings = settings
        self.tags = tags
        self.config_reader = config_reader
        self.store = store
        self.verifier = verifier
        self.body_timeout_seconds = body_timeout_seconds
        self.metrics = _Metrics.create()
        self.committer = GroupCommitter(
            store,
            workers=settings.commit_workers,
            max_group=settings.max_commit_group,
            max_waiting=settings.max_waiting,
            max_delay=settings.max_queue_delay_seconds,
            on_commit=self.metrics.batch_size.observe,
        )
        # Makes this month's partition of events and the next ones at start, then daily.
        self.keeper = PartitionKeeper(settings.database_url)
        self.quotas = QuotaGate(settings.tiers)
        # Sheds ingest by tier while the tailer's slot is behind; None when back pressure is off.
        self.pipeline = pipeline_lag(settings, self.metrics.registry)
        self.access_log = AccessLog.named()

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.store.open()
        await self.keeper.start()
        await self.committer.start()
        if self.pipeline is not None:
            await self.pipeline.start()
        quiet_collector()  # the default collector's pauses were most of the bus's p99
        try:
            yield
        finally:
            if self.pipeline is not None:
                await self.pipeline.stop()
            await self.committer.stop()
            await self.keeper.stop()
            await self.store.close()

    def observed(self, route: str, handler: Handler) -> Handler:
        """``handler`` answering every failure as problem+json, with its metrics and access line."""
        metrics, access_log = self.metrics, self.access_log

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            rid = request_id(request.headers.get("x-request-id"))
            try:
                response = await handler(request)
            except Problem as problem:
                response = _problem_response(problem)
            except StoreUnavailable as e:
                log.warning("database unavailable: %s (request %s)", e, rid)
                response = _problem_response(unavailable("the event store is unavailable; retry later"))
            except Exception:
                # Still one problem+json, one metric and one access line, also for a bug.
                log.exception("unhandled error (request %s)", rid)
                response = _problem_response(Problem(500, "internal", "Internal error", f"request {rid}"))
            response.headers["X-Request-Id"] = rid
            state = request.state
            tier = getattr(state, "tier", "none")
            elapsed = time.perf_counter() - started
            metrics.requests.labels(route, str(response.status_code), tier).inc()
            metrics.latency.labels(route).observe(elapsed)
            if access_log.enabled():
                access_log.request(
                    request_id=rid,
                    method=request.method,
                    route=route,
                    status=response.status_code,
                    latency_seconds=elapsed,
                    tenant=getattr(state, "tenant", None),
                    tier=getattr(state, "tier", None),
                    correlation_id=getattr(state, "correlation_id", None),
                )
            return response

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    async def authorize(self, request: Request, scope: str) -> Principal:
        authorization = request.headers.get("authorization")
        try:
            if self.verifier.may_block():
                principal = await anyio.to_thread.run_sync(self.verifier.verify, authorization)
            else:
                principal = self.verifier.verify(authorization)
            request.state.tier = principal.tier
            request.state.tenant = principal.tenant
            principal.require(scope)
        except AuthError as e:
            raise from_auth(e) from e
        return principal

    async def read_json(self, request: Request, allowed: tuple[str, ...], limit: int) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in allowed:
            raise unsupported_media_type(f"send one of: {', '.join(allowed)}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(f"the body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        try:
            # asyncio's timeout rather than anyio's: it costs half as much, on every POST.
            async with asyncio.timeout(self.body_timeout_seconds):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_large(f"the body exceeds the limit of {limit} bytes")
        except TimeoutError as e:
            raise request_timeout(f"the body did not arrive within {self.body_timeout_seconds:g} s") from e
        except ClientDisconnect as e:
            # Nobody reads the answer; it keeps a client's hang-up out of the 500s and the error log.
            raise Problem(400, "client-disconnected", "Client disconnected", "the body was not complete") from e
        return decode_json(bytes(body))

    async def append(self, principal: Principal, events: list[NewEvent]) -> list[AppendResult]:
        try:
            if len(events) == 1:
                results = [await self.committer.append(events[0])]
            else:
                results = await self.store.append(events)
                self.metrics.batch_size.observe(len(events))
        except VersionConflict as e:
            raise conflict(
                "version-conflict",
                f"stream {e.stream!r} is at version {e.current}, not {e.expected}",
                index=e.index,
                stream=e.stream,
                current_version=e.current,
            ) from e
        except IdConflict as e:
            raise conflict(
                "id-conflict", f"event id {e.event_id!r} was already used with different content", index=e.index
            ) from e
        self.metrics.events.labels(principal.tier).inc(sum(r.created for r in results))
        return results

    async def post_event(self, request: Request) -> Response:
        principal = await self.authorize(request, "events:write")
        if self.pipeline is not None:
            self.pipeline.policy.check(principal.tier)  # 503 while the pipeline is behind
        # The quota is taken before the body is read: a tenant over its quota costs the bus
        # as little as possible, which keeps other tenants' latency down.
        self.quotas.admit(principal, 1)
        body = await self.read_json(request, SINGLE_TYPES, self.settings.max_event_bytes)
        if isinstance(body, dict) and isinstance(body.get("correlationid"), str):
            request.state.correlation_id = body["correlationid"]
        event = parse_event(body, principal, tags=self.tags, max_event_bytes=self.settings.max_event_bytes)
        [result] = await self.append(principal, [event])
        status = 201 if result.created else 200
        # Ids may hold any character: the header is ASCII, and '/' must not split the path.
        return _json(result.to_json(), status, {"Location": f"/v1/events/{quote(result.id, safe='')}"})

    async def post_batch(self, request: Request) -> Response:
        principal = await self.authorize(request, "events:write")
        if self.pipeline is not None:
            self.pipeline.policy.check(principal.tier)
        self.quotas.admit(principal, 0)  # an empty bucket refuses before the body is read
        body = await self.read_json(request, BATCH_TYPES, self.settings.max_batch_bytes)
        if not isinstance(body, list):
            raise invalid([], "a batch is a JSON array of events")
        if not body:
            raise invalid([], "a batch holds at least one event")
        first = body[0]
        if isinstance(first, dict) and isinstance(first.get("correlationid"), str):
            request.state.correlation_id = first["correlationid"]
        if len(body) > self.settings.max_batch_events:
            raise too_large(f"a batch holds at most {self.settings.max_batch_events} events")
        events: list[NewEvent] = []
        errors: list[FieldError] = []
        for i, item in enumerate(body):
            try:
                events.append(
                    parse_event(
                        item, principal, tags=self.tags, max_event_bytes=self.settings.max_event_bytes, where=f"/{i}"
                    )
                )
            except Problem as problem:
                if problem.status != 422:
                    raise
                errors.extend(problem.errors)
        if errors:
            raise invalid(errors, "one or more events of the batch are invalid; nothing was written")
        self.quotas.admit(principal, len(events))
        results = await self.append(principal, events)
        return _json({"results": [r.to_json() | {"status": 201 if r.created else 200} for r in results]}, 201)

    async def get_event(self, request: Request) -> Response:
        principal = await self.authorize(request, "events:read")
        event_id = request.path_params["event_id"]
        event = await self.store.get(principal.tenant, event_id) if _storable(event_id, MAX_ID_CHARS) else None
        if event is None:
            raise not_found(f"no event {event_id!r}")
        return _json(event.to_cloudevent())

    async def get_stream(self, request: Request) -> Response:
        principal = await self.authorize(request, "events:read")
        stream = request.path_params["stream"]
        from_version = _int_param(request, "from_version", 1, minimum=1)
        limit = _int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
        page, nxt = (
            await self.read_page(principal.tenant, stream, from_version, limit) if "\x00" not in stream else ([], None)
        )
        if not page and from_version == 1:
            raise not_found(f"no stream {stream!r}")
        return _json({"stream": stream, "events": page, "next": nxt})

    async def read_page(self, tenant: str, stream: str, from_version: int, limit: int) -> tuple[list[Any], int | None]:
        """Up to ``limit`` events and the next page's version, within ``_MAX_PAGE_BYTES``.

        Events may be 1 MiB each: a page of 1,000 read at once could hold a gigabyte in the
        bus's memory. Rows are read in chunks and the page ends where its size would pass
        the budget (always with at least one event, so paging moves on).
        """
        page: list[Any] = []
        size = 0
        version = from_version
        while True:
            want = min(_READ_CHUNK, limit + 1 - len(page))
            chunk = await self.store.read_stream(tenant, stream, version, want)
            for event in chunk:
                body = event.to_cloudevent()
                cost = len(orjson.dumps(body))
                if len(page) == limit or (page and size + cost > _MAX_PAGE_BYTES):
                    return page, event.version
                page.append(body)
                size += cost
            if len(chunk) < want:
                return page, None
            version = chunk[-1].version + 1

    async def get_config(self, request: Request) -> Response:
        principal = await self.authorize(request, "config:read")
        key = request.path_params["key"]
        try:
            parse_config_key(key, self.tags)
        except ValueError as e:
            raise not_found(f"no config key {key!r}: {e}") from e
        reader = _reader(self.config_reader)
        try:
            item = await anyio.to_thread.run_sync(reader.get, principal.tenant, key)
        except Exception as e:
            raise _read_model_unavailable(e) from e
        if item is None:
            raise not_found(f"no config key {key!r}")
        return _json(dict(item))

    async def list_config(self, request: Request) -> Response:
        principal = await self.authorize(request, "config:read")
        prefix = request.query_params.get("prefix", "")
        if not prefix.isprintable():
            raise Problem(422, "bad-parameter", "Bad query parameter", "prefix: control characters are not allowed")
        limit = _int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
        start_after = request.query_params.get("after")
        if start_after is not None:
            try:
                parse_config_key(start_after, self.tags)
            except ValueError as e:
                detail = f"after: a key, the 'next' of the previous page ({e})"
                raise Problem(422, "bad-parameter", "Bad query parameter", detail) from e
        reader = _reader(self.config_reader)
        if start_after is not None and not start_after.startswith(prefix):
            # A cursor outside the prefix's range (DynamoDB refuses such a start key): before
            # it, the page starts at the range's first key; after it, the range is done.
            if start_after > prefix:
                return _json({"prefix": prefix, "items": [], "next": None})
            start_after = None
        if not may_prefix_config_key(prefix, self.tags):
            # No key can start with it: nothing to ask the read models (an unknown tag, a
            # character no key holds, a path no store should be handed).
            return _json({"prefix": prefix, "items": [], "next": None})

        def page() -> tuple[list[Mapping[str, Any]], str | None]:
            return reader.list(principal.tenant, prefix, limit=limit, start_after=start_after)

        try:
            items, nxt = await anyio.to_thread.run_sync(page)
        except ValueError as e:
            raise Problem(422, "bad-parameter", "Bad query parameter", f"prefix: {e}") from e
        except Exception as e:
            raise _read_model_unavailable(e) from e
        return _json({"prefix": prefix, "items": [dict(i) for i in items], "next": nxt})

    async def healthz(self) -> Response:
        return _json({"status": "ok"})

    async def readyz(self) -> Response:
        if await self.store.ping():
            return _json({"status": "ready"})
        return _problem_response(unavailable("the database is unreachable"))

    async def prometheus_metrics(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _reader(reader: ConfigReader | None) -> ConfigReader:
    if reader is None:
        raise unavailable("no config read model is configured")
    return reader


def _storable(name: str, limit: int) -> bool:
    """Whether an id could have been stored; a probe of one that could not costs no query.

    No stored id holds U+0000 (PostgreSQL text cannot, and the driver refuses to send it)
    or is longer than validation has always allowed.
    """
    return len(name) <= limit and "\x00" not in name


def _read_model_unavailable(error: Exception) -> Problem:
    # The read models' errors are the projections' types, which the bus does not import:
    # whatever fails behind the port (a store down, throttled) is answered as unavailable.
    log.warning("config read model failed: %s: %s", type(error).__name__, error)
    return unavailable("the config read model is unavailable; retry later", retry_after=2)


def _int_param(request: Request, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise Problem(422, "bad-parameter", "Bad query parameter", f"{name} must be an integer ≥ {minimum}{bound}")
    return value
