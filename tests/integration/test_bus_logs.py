"""The bus's access log: one JSON line per request, with ids to follow it, and no secrets."""

from __future__ import annotations

import logging
import uuid

import orjson
import pytest

from event_bus.logs import ACCESS_LOGGER
from tests.fixtures.bus import SECRET, RunningBus


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


def test_one_json_line_per_request_with_ids_and_no_token(bus: RunningBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    token = bus.token("acme", tier="premium")
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "correlationid": "corr-42"}
    with bus.client("acme", tier="premium") as client:
        created = client.post("/v1/events", json=sent, headers={"X-Request-Id": "req-123"})
        generated = client.get(f"/v1/events/{sent['id']}")
        hostile = client.get("/v1/events/nope", headers={"X-Request-Id": 'x" {"forged": true} ' + "z" * 200})
        unauthorized = client.get("/v1/events/nope", headers={"Authorization": "Bearer not-a-token"})
    assert created.status_code == 201 and created.headers["x-request-id"] == "req-123"
    assert len(generated.headers["x-request-id"]) == 32

    lines = access_lines(caplog)
    assert len(lines) == 4
    post, get, not_found, refused = lines
    assert post["request_id"] == "req-123" and post["correlation_id"] == "corr-42"
    assert post["method"] == "POST" and post["route"] == "post_event" and post["status"] == 201
    assert post["tenant"] == "acme" and post["tier"] == "premium"
    assert isinstance(post["latency_ms"], float) and post["latency_ms"] >= 0
    assert get["request_id"] == generated.headers["x-request-id"] and "correlation_id" not in get
    # A request id that is not a plain token is replaced, never echoed into the log.
    assert not_found["status"] == 404 and not_found["request_id"] == hostile.headers["x-request-id"] != 'x"'
    assert refused["status"] == 401 and refused["tenant"] is None and unauthorized.status_code == 401

    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert token not in everything and token.split(".")[2] not in everything
    assert SECRET not in everything and "not-a-token" not in everything


def test_nothing_is_built_when_info_is_off(bus: RunningBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)
    with bus.client("acme") as client:
        assert client.get("/v1/events/nope").status_code == 404
    assert access_lines(caplog) == []


def test_batch_lines_carry_the_correlation_id(bus: RunningBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    batch = [
        {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "correlationid": "batch-7"}
        for _ in range(3)
    ]
    with bus.client("acme") as client:
        assert client.post("/v1/events:batch", json=batch).status_code == 201
    [line] = access_lines(caplog)
    assert line["route"] == "post_batch" and line["correlation_id"] == "batch-7" and line["status"] == 201
