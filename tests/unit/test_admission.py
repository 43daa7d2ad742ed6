"""Admission control at both of its layers: the HTTP protocol (before a task exists) and the
ASGI middleware (what reaches the app anyway, or the app under another server)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from devtools.ports import free_port
from event_bus.admission import Admission, InFlightLimit
from tests.fixtures.bus import serve
from tests.fixtures.waiting import wait_for_async

PROBLEM = "application/problem+json"


class HeldApp:
    """An ASGI app behind :class:`InFlightLimit` whose ``/hold`` requests wait until released;
    it counts the requests that reach it (the middleware included)."""

    def __init__(self, admission: Admission) -> None:
        self.calls = 0
        self.held = threading.Semaphore(0)
        self.release = threading.Event()
        self.state = type("State", (), {"admission": admission})()
        self._app = InFlightLimit(self._serve, admission=admission)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            return
        self.calls += 1
        await self._app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/hold":
            self.held.release()
            # A slow endpoint, until the test's thread lets it answer.
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def served(limit: int) -> Iterator[tuple[HeldApp, list[int], str]]:
    shed: list[int] = []
    app = HeldApp(Admission(limit, exempt=("/healthz",), on_shed=lambda: shed.append(1)))
    port = free_port()
    stop = serve(app, port)
    try:
        yield app, shed, f"http://127.0.0.1:{port}"
    finally:
        app.release.set()
        stop()


def _hold(base: str, count: int, app: HeldApp) -> list[threading.Thread]:
    threads = [threading.Thread(target=httpx.get, args=(f"{base}/hold",), kwargs={"timeout": 30}) for _ in range(count)]
    for thread in threads:
        thread.start()
    for _ in range(count):
        assert app.held.acquire(timeout=10), "a held request never reached the app"
    return threads


def test_the_protocol_refuses_past_the_limit_without_calling_the_app_and_keeps_the_connection() -> None:
    with served(limit=2) as (app, shed, base):
        threads = _hold(base, 2, app)
        calls = app.calls
        with httpx.Client(base_url=base, timeout=10) as client:
            refused = client.post("/v1/events", content=b'{"big": "' + b"x" * 200_000 + b'"}')
            again = client.get("/other")
            health = client.get("/healthz")  # exempt, on the same kept-alive connection
        assert app.calls == calls + 1  # only the health check reached the app, not even its middleware
        app.release.set()
        for thread in threads:
            thread.join(10)
        with httpx.Client(base_url=base, timeout=10) as client:
            after = client.get("/other")
    for response in (refused, again):
        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["retry-after"] == "1"
        assert "in progress" in response.json()["detail"]
    assert health.status_code == 200 and health.text == "ok"
    assert len(shed) == 2
    assert after.status_code == 200  # below the limit again


@pytest.mark.parametrize(
    "request_head",
    [b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n"],
    ids=["connection-close", "http-1.0"],
)
def test_a_refused_request_that_asked_to_close_gets_its_answer_then_the_close(request_head: bytes) -> None:
    with served(limit=1) as (app, _, base):
        threads = _hold(base, 1, app)
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_head)
            answer = b""
            while chunk := sock.recv(65536):  # ends when the server closes
                answer += chunk
        app.release.set()
        for thread in threads:
            thread.join(10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nconnection: close" in head.lower()
    assert orjson.loads(body)["status"] == 503


def test_the_middleware_refuses_what_reaches_the_app_past_the_limit() -> None:
    shed: list[int] = []
    admission = Admission(1, exempt=("/metrics",), on_shed=lambda: shed.append(1))
    entered = asyncio.Event()
    release = asyncio.Event()
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = InFlightLimit(app, admission=admission)

    async def call(path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        await limit({"type": "http", "path": path}, receive, send)
        return sent

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
        first = asyncio.create_task(call("/v1/events"))
        await entered.wait()
        refused = await call("/v1/events")
        exempt = asyncio.create_task(call("/metrics"))
        await wait_for_async(lambda: "/metrics" in reached, "the exempt request to reach the app")
        in_flight = admission.in_flight
        release.set()
        return await first, refused, await exempt, in_flight

    first, refused, exempt, in_flight = asyncio.run(scenario())
    assert first[0]["status"] == 200 and exempt[0]["status"] == 200
    assert refused[0]["status"] == 503
    assert dict(refused[0]["headers"])[b"retry-after"] == b"1"
    assert orjson.loads(refused[1]["body"])["status"] == 503
    assert in_flight == 1  # exempt paths are not counted
    assert admission.in_flight == 0
    assert len(shed) == 1


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)
