"""Sync and async clients that post CloudEvents to the bus and retry safely.

A retry resends the very same envelope (same ``id``), so the bus answers an already stored
event with ``200`` instead of storing it twice. ``429`` and ``503`` are retried after the
server's ``Retry-After``; connection errors with exponential backoff and jitter; any other
4xx is the caller's mistake and raised at once as :class:`EventRejected`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from kernel.retry import Backoff, Jitter

TokenProvider = Callable[[], str]

_RETRY_STATUSES = frozenset({429, 502, 503, 504})


class TagbusError(Exception):
    """Base of the SDK's errors."""


class EventRejected(TagbusError):
    """The bus refused the request (4xx other than 429); ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem.get('title')}")
        self.status = status
        self.problem = problem


class TagbusUnavailable(TagbusError):
    """The bus stayed unavailable (or kept pushing back) through every retry."""


def new_event(
    type: str,
    source: str,
    data: Any = None,
    *,
    id: str | None = None,
    subject: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    """A CloudEvents 1.0 envelope with a fresh id (the idempotency key)."""
    event: dict[str, Any] = {"specversion": "1.0", "id": id or str(uuid.uuid4()), "source": source, "type": type}
    if subject is not None:
        event["subject"] = subject
    if data is not None:
        event["data"] = data
    event.update(extensions)
    return event


class _Policy:
    def __init__(self, attempts: int, base_delay: float, max_delay: float) -> None:
        self.attempts, self.max_delay = attempts, max_delay
        self.backoff = Backoff(base_delay, max_delay, Jitter.FULL)

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                return min(float(retry_after), self.max_delay)
        return self.backoff.delay(attempt + 1)

    def outcome(self, response: httpx.Response) -> Any:
        """The parsed success body, ``None`` to retry, or raise for a client error."""
        if response.status_code in (200, 201):
            return response.json()
        if response.status_code in _RETRY_STATUSES:
            return None
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.text[:200]}
        raise EventRejected(response.status_code, problem)


class TagbusClient:
    """Blocking client: ``post(event)``, ``post_batch(events)``."""

    def __init__(
        self,
        base_url: str,
        token: TokenProvider,
        *,
        attempts: int = 6,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        self._token = token
        self._policy = _Policy(attempts, base_delay, max_delay)

    def post(self, event: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._send("/v1/events", event, "application/cloudevents+json")
        return result

    def post_batch(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        body = self._send("/v1/events:batch", list(events), "application/cloudevents-batch+json")
        results: list[dict[str, Any]] = body["results"]
        return results

    def _send(self, path: str, body: Any, content_type: str) -> Any:
        response: httpx.Response | None = None
        for attempt in range(self._policy.attempts):
            try:
                response = self._http.post(path, json=body, headers=self._headers(content_type))
            except httpx.TransportError:
                response = None
            else:
                result = self._policy.outcome(response)
                if result is not None:
                    return result
            time.sleep(self._policy.delay(attempt, response))
        raise TagbusUnavailable(f"gave up after {self._policy.attempts} attempts")

    def _headers(self, content_type: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}", "Content-Type": content_type}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TagbusClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncTagbusClient:
    """Asyncio client with the same behaviour as :class:`TagbusClient`."""

    def __init__(
        self,
        base_url: str,
        token: TokenProvider,
        *,
        attempts: int = 6,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, limits=limits)
        self._token = token
        self._policy = _Policy(attempts, base_delay, max_delay)

    async def post(self, event: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._send("/v1/events", event, "application/cloudevents+json")
        return result

    async def post_batch(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        body = await self._send("/v1/events:batch", list(events), "application/cloudevents-batch+json")
        results: list[dict[str, Any]] = body["results"]
        return results

    async def _send(self, path: str, body: Any, content_type: str) -> Any:
        response: httpx.Response | None = None
        for attempt in range(self._policy.attempts):
            headers = {"Authorization": f"Bearer {self._token()}", "Content-Type": content_type}
            try:
                response = await self._http.post(path, json=body, headers=headers)
            except httpx.TransportError:
                response = None
            else:
                result = self._policy.outcome(response)
                if result is not None:
                    return result
            await asyncio.sleep(self._policy.delay(attempt, response))
        raise TagbusUnavailable(f"gave up after {self._policy.attempts} attempts")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTagbusClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
