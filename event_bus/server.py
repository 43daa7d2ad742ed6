"""The bus's HTTP server: uvicorn with the limits that keep a hostile client from holding it.

uvicorn bounds an idle kept-alive connection, but not a request whose line and headers
trickle in (slowloris): a fresh connection, or one that sent the first byte of its next
request, could hold a socket and a parser forever, and its headers could grow without
limit. :class:`BoundedHttpProtocol` adds both bounds and answers them, like every parser
error, in the contract's ``application/problem+json``. A slow *body* is bounded by the app
(``create_app(..., body_timeout_seconds=…)`` answers ``408``), which owns body reading.

It also enforces the app's :class:`~event_bus.admission.Admission` bound where it is
cheapest: a request that arrives while the bus is at its limit is answered ``503`` right
after its head is parsed, with no task, no ASGI call and no body read, so that a flood of
several times the bus's capacity is refused at a small fraction of a served request's cost.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from event_bus.admission import Admission
from event_bus.problems import PROBLEM_CONTENT_TYPE, Problem

_HEADER_TIMEOUT_SECONDS = 10.0
_MAX_HEADER_BYTES = 64 * 1024
_MAX_CONNECTIONS = 2_048


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the bus listens and the limits its HTTP server enforces per connection."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: A request's line and headers must arrive within this time, on a new connection and
    #: on a kept-alive one alike.
    header_timeout_seconds: float = _HEADER_TIMEOUT_SECONDS
    #: Request line plus headers; past it the answer is ``431``.
    max_header_bytes: int = _MAX_HEADER_BYTES
    #: Open connections past which a new one is answered ``503`` and closed: with the head
    #: deadline this bounds what a flood of slow clients can hold (sockets, parsers).
    max_connections: int = _MAX_CONNECTIONS
    #: Idle time between two requests of one connection (uvicorn's own timer).
    keep_alive_seconds: int = 5
    graceful_shutdown_seconds: int = 10
    log_level: str = "warning"


class _NoEvent:
    def set(self) -> None:
        pass


class _Answered:
    """Stands in for uvicorn's request cycle of a request the protocol answered itself.

    uvicorn drops the body of a request whose response is complete, and starts the next
    request of the connection after it, which is what a refused request needs.
    """

    response_complete = True
    keep_alive = True
    disconnected = False
    message_event = _NoEvent()


_ANSWERED = _Answered()


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on request heads, and
    admission control before a request becomes a task."""

    header_timeout_seconds: float = _HEADER_TIMEOUT_SECONDS
    max_header_bytes: int = _MAX_HEADER_BYTES
    max_connections: int = _MAX_CONNECTIONS
    admission: Admission | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_started = False
        self._head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            detail = f"more than {self.max_connections} connections are open; retry later"
            self._write_problem(
                Problem(503, "unavailable", "Service unavailable", detail, headers={"Retry-After": "1"})
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_started = True
        self._head_too_large = False
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_started = False
        admission = self.admission
        idle = self.cycle is None or self.cycle.response_complete  # not behind a pipelined request
        if admission is not None and idle and admission.full:
            path = urllib.parse.unquote(httptools.parse_url(self.url).path.decode("ascii"))
            if admission.refuses(path):
                self._refuse(admission)
                return
        super().on_headers_complete()

    def _refuse(self, admission: Admission) -> None:
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        # Set first either way: the parser goes on with the rest of the data it holds (the body).
        self.cycle = _ANSWERED  # type: ignore[assignment]
        self._write(b"HTTP/1.1 503 Service Unavailable", admission.headers, admission.body, close=not keep_alive)
        if keep_alive:
            self.on_response_complete()  # reads on: the body is dropped, the next request served

    def send_400_response(self, msg: str) -> None:
        # Every request uvicorn refuses before the app sees it (bad syntax, a head too large).
        if self._head_too_large:
            problem = Problem(
                431,
                "headers-too-large",
                "Request header fields too large",
                f"the limit is {self.max_header_bytes} bytes",
            )
        else:
            problem = Problem(400, "bad-request", "Bad request", msg)
        self._write_problem(problem)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            # httptools turns an exception raised in a callback into a parser error, which
            # uvicorn answers through ``send_400_response`` and then stops reading.
            raise ValueError("request head too large")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_seconds, self._on_head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            timeout = f"the request head did not arrive within {self.header_timeout_seconds:g} s"
            self._write_problem(Problem(408, "request-timeout", "Request timeout", timeout))
        else:
            self.transport.close()  # a connection that never sent a byte gets no answer

    def _write_problem(self, problem: Problem) -> None:
        body = orjson.dumps(problem.to_json())
        headers = [(name.encode(), value.encode()) for name, value in problem.headers.items()]
        headers.append((b"content-type", PROBLEM_CONTENT_TYPE.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        self._write(f"HTTP/1.1 {problem.status} {problem.title}".encode(), headers, body, close=True)

    def _write(self, status_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool) -> None:
        """An answer written by the protocol itself, with the server's default headers; ``close``
        closes the connection after it."""
        head = [status_line]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [name + b": " + value for name, value in headers]
        if close:
            head.append(b"connection: close")
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if close:
            self.transport.close()


def build_server(app: Any, settings: ServerSettings) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the bus's limits (not started).

    The app's admission bound (``app.state.admission``, set by ``create_app``) is enforced
    by the protocol too, before a refused request costs a task.
    """
    state = getattr(app, "state", None)
    protocol = type(
        "BusHttpProtocol",
        (BoundedHttpProtocol,),
        {
            "header_timeout_seconds": settings.header_timeout_seconds,
            "max_header_bytes": settings.max_header_bytes,
            "max_connections": settings.max_connections,
            "admission": getattr(state, "admission", None),
        },
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(app: Any, settings: ServerSettings) -> None:
    """Run the bus in the foreground until SIGINT/SIGTERM."""
    build_server(app, settings).run()
