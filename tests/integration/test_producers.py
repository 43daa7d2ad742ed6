"""The producer SDK against a real bus: posts, safe retries, back pressure and rejections."""

from __future__ import annotations

import asyncio

import pytest

from producers import AsyncTagbusClient, EventRejected, TagbusClient, new_event
from tests.fixtures.bus import RunningBus


def test_sync_client_posts_and_repeats_safely(bus: RunningBus) -> None:
    event = new_event("order.placed", "/shop", {"total": 12}, subject="order/1")
    with TagbusClient(bus.base_url, lambda: bus.token("acme")) as client:
        first = client.post(event)
        again = client.post(event)
        batch = client.post_batch([new_event("order.paid", "/shop", subject="order/1") for _ in range(3)])
    assert first == again and first["version"] == 1
    assert [r["version"] for r in batch] == [2, 3, 4]


def test_sync_client_raises_on_client_errors(bus: RunningBus) -> None:
    with TagbusClient(bus.base_url, lambda: bus.token("acme")) as client, pytest.raises(EventRejected) as info:
        client.post({"specversion": "1.0", "id": "x"})
    assert info.value.status == 422 and info.value.problem["errors"]


def test_async_client_waits_out_429(bus: RunningBus) -> None:
    async def run() -> list[int]:
        async with AsyncTagbusClient(bus.base_url, lambda: bus.token("tight", tier="basic"), attempts=20) as client:
            results = await asyncio.gather(*(client.post(new_event("ping", "/p", subject="s")) for _ in range(8)))
        return sorted(r["version"] for r in results)

    # The basic tier in the test settings allows a burst of 5 at 5 events/s: the last three are
    # answered 429 at first and go through after Retry-After.
    assert asyncio.run(run()) == list(range(1, 9))
