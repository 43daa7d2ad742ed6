"""Admission control: a bound on the requests the bus works on at once.

The group committer sheds requests that wait too long for the database. Under a flood the
bus runs out of CPU before that: every request admitted shares one event loop with all the
others (parsing, token checks, validation), so latency grows with the number in progress,
and past a few thousand the clients time out before the database sees anything.
:class:`InFlightLimit` answers ``503`` + ``Retry-After`` at once, before any of that work,
to a request that arrives while ``limit`` others are in progress. A refusal costs a small
fraction of a served request, so the bus keeps serving at its capacity with a bounded
latency (``limit`` / capacity) and tells everybody else, quickly, to come back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from event_bus.problems import PROBLEM_CONTENT_TYPE, unavailable


class InFlightLimit:
    """Pure ASGI middleware: at most ``limit`` requests in progress; the rest get ``503`` at once.

    ``exempt`` paths (health, metrics) are always served: an operator must see an overload.
    ``on_shed`` is called once per refused request (a metric).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        exempt: Collection[str] = (),
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.app = app
        self.limit = limit
        self.in_flight = 0
        self._exempt = frozenset(exempt)
        self._on_shed = on_shed
        problem = unavailable(f"the bus is at its limit of {limit} requests in progress; retry later")
        self._body = orjson.dumps(problem.to_json())
        self._headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(len(self._body)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in problem.headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            if self._on_shed is not None:
                self._on_shed()
            # The body is not read: the server discards it and keeps the connection.
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
