"""Hypothesis-generated envelopes and config keys, counted for the reliability report.

The strategies are those of ``tests/integration/test_bus_properties.py`` (which checks
exact round trips in depth); here they run against the hardened server with hostile
additions: keys built from the characters the stores and path routing treat specially.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import HostileBus, HostileTally, assert_problem
from tests.integration.test_bus_properties import envelopes, invalid_envelopes, json_values

EXAMPLES = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
TENANT = "envelopes"
SPECIAL = st.sampled_from(["%", "_", "*", "..", ".", "/", "//", "\\", "#", "?", "~", ":", " ", "\u202e", "\ufeff"])
hostile_paths = st.lists(st.one_of(SPECIAL, st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True)), max_size=8).map(
    "".join
)
hostile_keys = st.tuples(
    st.sampled_from(["tenantconfig", "paramconfig", "nosuchtag", "", "TENANTCONFIG"]), hostile_paths
)


@pytest.fixture(scope="module")
def writer(hostile_bus: HostileBus) -> Any:
    with hostile_bus.client(hostile_bus.hs256(TENANT)) as client:
        yield client


@EXAMPLES
@given(body=envelopes())
def test_generated_valid_envelopes_are_stored(writer: httpx.Client, tally: HostileTally, body: dict[str, Any]) -> None:
    sent = body | {"id": f"{body['id']}{uuid.uuid4()}"}
    sent.pop("tenantid", None)
    response = tally.response("envelope_valid", writer.post("/v1/events", json=sent))
    assert response.status_code == 201, response.text[:300]
    back = tally.response("envelope_valid", writer.get(response.headers["location"]))
    assert back.status_code == 200 and back.json()["id"] == sent["id"]


@EXAMPLES
@given(case=invalid_envelopes())
def test_generated_invalid_envelopes_are_4xx(
    writer: httpx.Client, tally: HostileTally, case: tuple[str, dict[str, Any]]
) -> None:
    _, body = case
    assert_problem(tally.response("envelope_invalid", writer.post("/v1/events", json=body)), 413, 422)
    assert_problem(tally.response("envelope_invalid", writer.post("/v1/events:batch", json=[body])), 413, 422)


@EXAMPLES
@given(value=json_values)
def test_generated_json_is_never_a_5xx(writer: httpx.Client, tally: HostileTally, value: Any) -> None:
    for path, body in (("/v1/events", value), ("/v1/events:batch", value), ("/v1/events:batch", [value])):
        assert_problem(tally.response("json_random", writer.post(path, json=body)))


@EXAMPLES
@given(raw=st.binary(max_size=300))
def test_generated_bytes_are_never_a_5xx(writer: httpx.Client, tally: HostileTally, raw: bytes) -> None:
    for path in ("/v1/events", "/v1/events:batch"):
        response = writer.post(path, content=raw, headers={"content-type": "application/cloudevents+json"})
        if path.endswith(":batch"):
            assert_problem(tally.response("bytes_random", response), 415)
        else:
            assert_problem(tally.response("bytes_random", response), 400, 422)


@EXAMPLES
@given(key=hostile_keys, kind=st.sampled_from(["config.set", "config.deleted"]))
def test_generated_config_keys_are_stored_readable_or_refused(
    writer: httpx.Client, tally: HostileTally, key: tuple[str, str], kind: str
) -> None:
    text = f"{key[0]}:{key[1]}"
    data: dict[str, Any] = {"key": text, "value": 1} if kind == "config.set" else {"key": text}
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/keys", "type": kind, "data": data}
    response = tally.response("config_key_generated", writer.post("/v1/events", json=sent))
    if response.status_code == 201:
        assert response.json()["stream"] == text
        stream = tally.response("config_key_generated", writer.get(f"/v1/streams/{quote(text, safe='')}"))
        assert stream.status_code == 200 and stream.json()["events"][-1]["id"] == sent["id"]
    else:
        assert_problem(response, 422)
        assert response.json()["errors"][0]["field"] == "/data/key"
    read = tally.response("config_key_generated", writer.get(f"/v1/config/{quote(text, safe='')}"))
    assert_problem(read, 404)  # the consumers do not run here: nothing is projected
