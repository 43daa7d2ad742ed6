"""Admission control: a bound on the requests the bus works on at once.

The group committer sheds requests that wait too long for the database. Under a flood the
bus runs out of CPU before that: every request admitted shares one event loop with all the
others (parsing, token checks, validation), so latency grows with the number in progress,
and past a few thousand the clients time out before the database sees anything.

:class:`Admission` is the bound: a request that arrives while ``limit`` others are in
progress is answered ``503`` + ``Retry-After`` at once, before any of that work. It is
enforced in two places that share one count:

- the bus's HTTP protocol (``event_bus.server``) refuses right after parsing the request
  head, before uvicorn makes a task for it: a refusal then costs a few microseconds, so the
  bus can refuse many times its capacity and still serve at that capacity;
- :class:`InFlightLimit`, a pure ASGI middleware, counts the requests in progress and
  refuses whatever reaches the app past the bound anyway (a request the protocol let through
  just before the bound was reached, or the app served by another ASGI server).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from event_bus.problems import PROBLEM_CONTENT_TYPE, unavailable


class Admission:
    """At most ``limit`` requests in progress; ``exempt`` paths (health, metrics) always pass.

    ``on_shed`` is called once per refused request (a metric). ``body`` and ``headers`` are
    the refusal, rendered once: a ``503`` problem+json with ``Retry-After``.
    """

    def __init__(self, limit: int, *, exempt: Collection[str] = (), on_shed: Callable[[], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.in_flight = 0
        self.exempt = frozenset(exempt)
        self._on_shed = on_shed
        problem = unavailable(f"the bus is at its limit of {limit} requests in progress; retry later")
        self.body = orjson.dumps(problem.to_json())
        self.headers: list[tuple[bytes, bytes]] = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(len(self.body)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in problem.headers.items()),
        ]

    @property
    def full(self) -> bool:
        """Whether ``limit`` requests are in progress: a request arriving now is refused
        unless its path is exempt."""
        return self.in_flight >= self.limit

    def refuses(self, path: str) -> bool:
        """Whether a request for ``path`` arriving now is refused (and counted as shed)."""
        if not self.full or path in self.exempt:
            return False
        if self._on_shed is not None:
            self._on_shed()
        return True


class InFlightLimit:
    """Pure ASGI middleware that keeps the count of :class:`Admission` and refuses past it."""

    def __init__(self, app: ASGIApp, *, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = self.admission
        if scope["type"] != "http" or scope["path"] in admission.exempt:
            await self.app(scope, receive, send)
            return
        if admission.refuses(scope["path"]):
            # The body is not read: the server discards it and keeps the connection.
            await send({"type": "http.response.start", "status": 503, "headers": admission.headers})
            await send({"type": "http.response.body", "body": admission.body})
            return
        admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            admission.in_flight -= 1
