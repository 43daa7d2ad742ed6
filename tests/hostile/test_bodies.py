"""Hostile bodies and connections: oversize, deeply nested, not UTF-8, wrongly typed, slow.

Each answer is the contract's 4xx as problem+json (``408``/``431`` for what the server
itself cuts off), never a 5xx; slow clients are cut off by timeouts instead of holding the
server; and the bus still answers ``/healthz`` afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest

from devtools.ports import free_port
from event_bus.server import ServerSettings, build_server
from tests.fixtures.waiting import wait_for
from tests.hostile.conftest import BODY_TIMEOUT, HEADER_TIMEOUT, HostileBus, HostileTally, assert_problem

MIB = 1_048_576


def event(**fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/hostile", "type": "thing.happened"} | fields


@pytest.fixture(scope="module")
def writer(hostile_bus: HostileBus) -> Iterator[httpx.Client]:
    with hostile_bus.client(hostile_bus.hs256("bodies")) as client:
        yield client


def post_raw(client: httpx.Client, path: str, raw: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": content_type})


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + b"1" + close * depth


def test_oversize_bodies_are_413(writer: httpx.Client, tally: HostileTally, hostile_bus: HostileBus) -> None:
    cases = {
        "single over 1 MiB": ("/v1/events", orjson.dumps(event(data={"blob": "x" * (MIB + 10)}))),
        "single just over 1 MiB after escaping": ("/v1/events", orjson.dumps(event(data={"q": '"' * (MIB // 2 + 10)}))),
        "batch over 5 MiB": ("/v1/events:batch", orjson.dumps([event(data={"b": "x" * 600_000}) for _ in range(9)])),
        "batch of 501": ("/v1/events:batch", orjson.dumps([event() for _ in range(501)])),
        "batch of 5000 tiny": ("/v1/events:batch", orjson.dumps([{} for _ in range(5000)])),
        "body of 20 MiB": ("/v1/events", b"[" + b"0," * (10 * MIB) + b"0]"),
    }
    for path, raw in cases.values():
        response = tally.response("oversize_body", post_raw(writer, path, raw))
        assert_problem(response, 413)
    assert hostile_bus.healthy()


def test_chunked_oversize_body_is_413(hostile_bus: HostileBus, tally: HostileTally) -> None:
    # No Content-Length: the bus counts as it reads and stops at the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"specversion":"1.0","id":"c","source":"/s","type":"t","data":"'
        for _ in range(40):
            yield b"x" * 65_536
        yield b'"}'

    with hostile_bus.client(hostile_bus.hs256("bodies")) as client:
        response = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(tally.response("oversize_body", response), 413)


def test_deep_nesting_is_4xx(writer: httpx.Client, tally: HostileTally) -> None:
    head = b'{"specversion":"1.0","id":"%s","source":"/s","type":"t","data":'
    for depth in (300, 1_100, 100_000):
        for open_, close in ((b"[", b"]"), (b'{"a":', b"}")):
            raw = head % str(uuid.uuid4()).encode() + nested(depth, open_, close) + b"}"
            response = tally.response("deep_nesting", post_raw(writer, "/v1/events", raw))
            assert_problem(response, 400, 422)
            batch = tally.response("deep_nesting", post_raw(writer, "/v1/events:batch", b"[" + raw + b"]"))
            assert_problem(batch, 400, 422)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"specversion":"1.0","id":"\xc3\x28","source":"/s","type":"t"}',
        b'{"specversion":"1.0","id":"x","source":"/s","type":"\xed\xa0\x80"}',
        b'{"specversion":"1.0","id":"x","source":"/s","type":"\xf4\x90\x80\x80"}',
        b'{"specversion":"1.0","id":"x","source":"/s","type":"\\udc00"}',
        b"\xef\xbb\xbf" + b'{"specversion":"1.0","id":"x","source":"/s","type":"t"}',
        '{"specversion":"1.0","id":"x","source":"/s","type":"t"}'.encode("utf-16"),
        b'{"a":1,"a":2',
        b"\x00" * 64,
    ],
)
def test_invalid_utf8_and_broken_json_are_400(writer: httpx.Client, tally: HostileTally, raw: bytes) -> None:
    for path in ("/v1/events", "/v1/events:batch"):
        assert_problem(tally.response("invalid_utf8", post_raw(writer, path, raw)), 400)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/cloudevents-batch+json",  # a batch type on the single route
        "application/jsonx",
        "",
    ],
)
def test_wrong_content_types_are_415(writer: httpx.Client, tally: HostileTally, content_type: str) -> None:
    raw = orjson.dumps(event())
    response = tally.response("wrong_content_type", post_raw(writer, "/v1/events", raw, content_type))
    assert_problem(response, 415)
    if content_type != "application/cloudevents-batch+json":
        batch = tally.response(
            "wrong_content_type", post_raw(writer, "/v1/events:batch", b"[" + raw + b"]", content_type)
        )
        assert_problem(batch, 415)


def test_content_type_parameters_and_case_are_accepted(writer: httpx.Client) -> None:
    raw = orjson.dumps(event())
    response = post_raw(writer, "/v1/events", raw, "Application/CloudEvents+JSON; charset=utf-8")
    assert response.status_code == 201, response.text


# --- raw sockets: what an HTTP client library would not send ------------------------------


@contextmanager
def connection(bus: HostileBus) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", bus.server_settings.port), timeout=15)
    try:
        yield sock
    finally:
        sock.close()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one answer, read until the server closes or the body ends."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65_536)
        if not chunk:
            raise ConnectionError(f"closed without an answer: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65_536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_raw_problem(answer: tuple[int, dict[str, str], bytes], status: int) -> None:
    code, headers, body = answer
    assert code == status, answer
    assert headers["content-type"] == "application/problem+json", headers
    assert orjson.loads(body)["status"] == status


def closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (after whatever answer it sent)."""
    sock.settimeout(HEADER_TIMEOUT + 2)
    try:
        while sock.recv(65_536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_huge_headers_are_431(hostile_bus: HostileBus, tally: HostileTally) -> None:
    limit = hostile_bus.server_settings.max_header_bytes
    cases = {
        "one huge header": b"X-Big: " + b"a" * (limit + 1) + b"\r\n",
        "many headers": b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(limit // 100)),
        "huge url": b"",
    }
    for name, headers in cases.items():
        path = b"/healthz" if name != "huge url" else b"/v1/events/" + b"a" * (limit + 1)
        with connection(hostile_bus) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            answer = read_answer(sock)
            tally.record("huge_headers", server_error=answer[0] >= 500)
            assert_raw_problem(answer, 431)
    assert hostile_bus.healthy()


def test_malformed_requests_are_400_problems(hostile_bus: HostileBus, tally: HostileTally) -> None:
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
    ):
        with connection(hostile_bus) as sock:
            sock.sendall(raw)
            answer = read_answer(sock)
            tally.record("malformed_http", server_error=answer[0] >= 500)
            assert_raw_problem(answer, 400)
    assert hostile_bus.healthy()


def test_slow_headers_are_cut_off(hostile_bus: HostileBus, tally: HostileTally) -> None:
    """Slowloris: a request head trickling in a byte at a time is answered 408 and closed."""
    with connection(hostile_bus) as sock:
        started = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        answer: tuple[int, dict[str, str], bytes] | None = None
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)  # the attack itself: a byte every 50 ms
            if time.monotonic() - started > HEADER_TIMEOUT + 0.5:
                break
        answer = read_answer(sock)
        tally.record("slow_headers", server_error=answer[0] >= 500)
        assert_raw_problem(answer, 408)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2
        assert closed(sock)


def test_idle_and_kept_alive_connections_are_closed(hostile_bus: HostileBus, tally: HostileTally) -> None:
    with connection(hostile_bus) as silent:
        started = time.monotonic()
        assert closed(silent)  # a connection that never sends a byte
        assert time.monotonic() - started < HEADER_TIMEOUT + 2
        tally.record("slow_headers")
    with connection(hostile_bus) as sock:
        # A second request on a kept-alive connection trickles too: bounded the same way.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        answer = read_answer(sock)
        tally.record("slow_headers", server_error=answer[0] >= 500)
        assert_raw_problem(answer, 408)


def test_slow_bodies_are_cut_off(hostile_bus: HostileBus, tally: HostileTally) -> None:
    token = hostile_bus.hs256("bodies")
    body = orjson.dumps(event())
    for path in (b"/v1/events", b"/v1/events:batch"):
        with connection(hostile_bus) as sock:
            started = time.monotonic()
            sock.sendall(
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body[:10]
            )
            for byte in body[10:40]:  # a byte every 0.1 s: slower than the deadline allows
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.1)
            answer = read_answer(sock)
            tally.record("slow_body", server_error=answer[0] >= 500)
            assert_raw_problem(answer, 408)
            assert time.monotonic() - started < BODY_TIMEOUT + 3


def test_clients_hanging_up_mid_body_are_no_server_errors(hostile_bus: HostileBus, tally: HostileTally) -> None:
    def answered(status: int) -> float:
        """Requests the bus counted as answered with ``status``, from its ``/metrics``."""
        metrics = httpx.get(f"{hostile_bus.base_url}/metrics").text
        lines = [line for line in metrics.splitlines() if line.startswith("tagbus_http_requests_total{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if f'status="{status}"' in line)

    before, incomplete_before = answered(500), answered(400)
    token = hostile_bus.hs256("bodies")
    for path in (b"/v1/events", b"/v1/events:batch"):
        with connection(hostile_bus) as sock:
            sock.sendall(
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token.encode() + b'\r\nContent-Length: 1000\r\n\r\n{"a":'
            )
            # The hang-up must come while the app reads the body, and nothing outside the bus
            # tells when it started to: time is let pass for it to.
            time.sleep(0.2)
        tally.record("client_hang_up")
    # Each hang-up is settled as a 400 ("the body was not complete"), never an unhandled error.
    wait_for(lambda: answered(400) >= incomplete_before + 2, "both hang-ups to be settled")
    # Was counted (and logged with a traceback) as an unhandled error, a 500.
    assert answered(500) == before
    assert hostile_bus.healthy()


def test_many_slow_clients_at_once_do_not_stop_the_bus(hostile_bus: HostileBus, tally: HostileTally) -> None:
    sockets = [socket.create_connection(("127.0.0.1", hostile_bus.server_settings.port)) for _ in range(200)]
    try:
        for i, sock in enumerate(sockets):
            sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"G")
        # While they hang, others are served promptly.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.get(f"{hostile_bus.base_url}/healthz").status_code, range(40)))
        assert statuses == [200] * 40
        for sock in sockets:  # each closed by its header deadline, which closed() waits past
            tally.record("slow_headers")
            assert closed(sock)
    finally:
        for sock in sockets:
            sock.close()
    assert hostile_bus.healthy()


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_connections_past_the_limit_are_503(tally: HostileTally) -> None:
    settings = ServerSettings(port=free_port(), max_connections=20, header_timeout_seconds=5)
    server = build_server(_hello, settings)
    server.config.lifespan = "off"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    held = [socket.create_connection(("127.0.0.1", settings.port)) for _ in range(20)]
    try:
        wait_for(lambda: len(server.server_state.connections) == 20, "the server to accept them all")
        with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(extra)
            tally.record("connection_flood", server_error=answer[0] != 503)
            assert_raw_problem(answer, 503)
            assert answer[1]["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: not server.server_state.connections, "the server to see them closed")
    try:
        assert httpx.get(f"http://127.0.0.1:{settings.port}/").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
