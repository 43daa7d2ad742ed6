"""Cross-tenant probes on every read path: another tenant's data is never returned.

``acme`` stores events and config keys holding a marker; ``globex`` (and tenants whose
names are built to collide with acme's in string keys) probe for them by id, stream, key
and prefix, including LIKE/glob wildcards, path tricks, encodings and paging cursors. Ids
and keys answer ``404``, lists answer only the caller's own items, and no answer holds the
marker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import HostileBus, HostileTally, assert_problem

RUN = uuid.uuid4().hex[:8]
#: Tenants of this run: the stack's read models outlive it, so names must not repeat.
ACME, GLOBEX = f"acme{RUN}", f"globex{RUN}"
MARKER = f"acme-secret-{uuid.uuid4().hex}"
KEYS = [
    "tenantconfig:features/dark-mode",
    "tenantconfig:features/beta_flag",
    "tenantconfig:a_b/x",
    "tenantconfig:limits/seats",
    "paramconfig:app/db/password",
    "paramconfig:app/db_url",
]
PROBERS = [
    GLOBEX,
    ACME[:-1],
    ACME + " ",
    ACME.upper(),
    ACME + "/x",
    ACME + "/app",  # its SSM path would be acme's "app/" level
    ACME + "%",
    ACME + "_",
    "%",
    "_",
    "*",
    ".",
    "..",
    f"TENANT#{ACME}",
    "a",
]


@pytest.fixture(scope="module", params=["memory", pytest.param("stack", marks=pytest.mark.stack)])
def bus(request: pytest.FixtureRequest) -> HostileBus:
    """The bus on in-memory read models, and on the local stack's DynamoDB Local and SSM."""
    fixture = "hostile_bus" if request.param == "memory" else "stack_bus"
    bus: HostileBus = request.getfixturevalue(fixture)
    return bus


@pytest.fixture(scope="module")
def acme_data(bus: HostileBus) -> Iterator[dict[str, Any]]:
    """acme's events and config keys, every one holding the marker."""
    ids = [f"ev-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)] + ["a%b_c", "dup-id", "%", "_"]
    streams = ["orders/1", "a%b_c", "%", "_"]
    with bus.client(bus.rs256(ACME)) as acme:
        for i, event_id in enumerate(ids):
            body = {
                "specversion": "1.0",
                "id": event_id,
                "source": "/acme",
                "type": "order.placed",
                "subject": streams[i % len(streams)],
                "data": {"card": MARKER},
            }
            assert acme.post("/v1/events", json=body).status_code == 201
    # globex owns a key and an event of the same names: it must read its own, never acme's.
    with bus.client(bus.hs256(GLOBEX)) as globex:
        own = {"specversion": "1.0", "id": "dup-id", "source": "/globex", "type": "t", "data": {"mine": True}}
        assert globex.post("/v1/events", json=own).status_code == 201
    for key in KEYS:
        bus.seed_config(ACME, key, {"secret": MARKER})
    bus.seed_config(GLOBEX, "tenantconfig:features/dark-mode", {"mine": True})
    yield {"ids": ids, "streams": streams}


@pytest.fixture(scope="module")
def anon(bus: HostileBus) -> Iterator[httpx.Client]:
    with bus.client() as client:
        yield client


def probe(tally: HostileTally, kind: str, response: httpx.Response) -> httpx.Response:
    tally.response(kind, response, secrets=(MARKER,))
    assert MARKER not in response.text, (kind, response.request.url)
    assert response.status_code < 500, response.text[:300]
    return response


def test_acme_reads_its_own(bus: HostileBus, acme_data: dict[str, Any]) -> None:
    # The probes below mean something only if the data is there to be found.
    with bus.client(bus.rs256(ACME)) as acme:
        for event_id in acme_data["ids"]:
            assert MARKER in acme.get(f"/v1/events/{quote(event_id, safe='')}").text
        for stream in acme_data["streams"]:
            assert MARKER in acme.get(f"/v1/streams/{quote(stream, safe='')}").text
        for key in KEYS:
            assert MARKER in acme.get(f"/v1/config/{key}").text
        listed = acme.get("/v1/config", params={"prefix": "", "limit": 1000}).json()["items"]
        assert {i["key"] for i in listed} == set(KEYS)


def test_ids_and_streams_of_another_tenant_are_404(
    bus: HostileBus, acme_data: dict[str, Any], tally: HostileTally
) -> None:
    variants = lambda s: {s, s.upper(), s + "/", s + "%", s[:-1] + "_", s + "%00", quote(s, safe=""), quote(quote(s))}  # noqa: E731
    for prober in PROBERS:
        with bus.client(bus.hs256(prober)) as client:
            for event_id in acme_data["ids"]:
                for v in variants(event_id):
                    response = probe(tally, "cross_tenant_event", client.get(f"/v1/events/{v}"))
                    if event_id == "dup-id" and prober == GLOBEX and v == event_id:
                        assert response.json()["source"] == "/globex"
                    else:
                        assert_problem(response, 404)
            for stream in acme_data["streams"]:
                for v in variants(stream):
                    for params in ({}, {"from_version": 1, "limit": 1000}, {"from_version": 2}):
                        response = probe(tally, "cross_tenant_stream", client.get(f"/v1/streams/{v}", params=params))
                        assert response.status_code in (200, 404), response.text[:300]
                        if response.status_code == 200:  # a later page of a missing stream is empty
                            assert response.json()["events"] == []


def test_config_keys_of_another_tenant_are_404(bus: HostileBus, acme_data: dict[str, Any], tally: HostileTally) -> None:
    for prober in PROBERS:
        with bus.client(bus.hs256(prober)) as client:
            for key in KEYS:
                tag, _, path = key.partition(":")
                dotted = (f"{tag}:../{ACME}/{path}", f"{tag}:./../{ACME}/{path}", f"{tag}:{ACME}/{path}")
                for v in (key, key.upper(), f"{tag}:{path}/", f"{tag}:%", f"{tag}:{path[:-1]}_", f"{tag}:*", *dotted):
                    response = probe(tally, "cross_tenant_config_key", client.get(f"/v1/config/{v}"))
                    if prober == GLOBEX and v == "tenantconfig:features/dark-mode":
                        assert response.json()["value"] == {"mine": True}
                    else:
                        assert_problem(response, 404)


WILDCARD_PREFIXES = [
    "",
    "%",
    "_",
    "*",
    ".*",
    "%%",
    "tenantconfig",
    "tenantconfig:",
    "tenantconfig:%",
    "tenantconfig:_",
    "tenantconfig:features/%",
    "tenantconfig:features/_",
    "tenantconfig:a%",
    "tenantconfig:a\\%",
    "tenantconfig:features/beta_",
    "paramconfig:",
    "paramconfig:%",
    "paramconfig:app/",
    "paramconfig:../acme/app/",
    "paramconfig:app/../../acme/app/",
    "paramconfig:/",
    f"TENANT#{ACME}",
    ACME,
    f"{ACME}:",
    f"/tagbus/{ACME}/",
    f"paramconfig:../{ACME}/app/",
    "\u0000",
    "x" * 5_000,
]


def test_prefix_listing_never_crosses_tenants(bus: HostileBus, acme_data: dict[str, Any], tally: HostileTally) -> None:
    for prober in PROBERS:
        with bus.client(bus.hs256(prober)) as client:
            for prefix in WILDCARD_PREFIXES:
                for after in (None, "", "tenantconfig:", "%", "paramconfig:app/db/password"):
                    params: dict[str, Any] = {"prefix": prefix, "limit": 1000}
                    if after is not None:
                        params["after"] = after
                    response = probe(tally, "cross_tenant_config_prefix", client.get("/v1/config", params=params))
                    if response.status_code == 200:
                        keys = {i["key"] for i in response.json()["items"]}
                        own = {"tenantconfig:features/dark-mode"} if prober == GLOBEX else set()
                        assert keys <= own, (prober, prefix, keys)
                    else:
                        assert_problem(response, 422)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prober=st.sampled_from(PROBERS),
    probe_text=st.text(st.characters(codec="utf-8"), max_size=60),
    base=st.sampled_from([*KEYS, "tenantconfig:", "paramconfig:", ""]),
)
def test_generated_probes_never_cross_tenants(
    bus: HostileBus,
    anon: httpx.Client,
    acme_data: dict[str, Any],
    tally: HostileTally,
    prober: str,
    probe_text: str,
    base: str,
) -> None:
    headers = {"Authorization": f"Bearer {bus.hs256(prober)}"}
    text = base + probe_text
    for path, params in (
        (f"/v1/events/{quote(text, safe='')}", None),
        (f"/v1/streams/{quote(text, safe='')}", None),
        (f"/v1/config/{quote(text, safe='')}", None),
        ("/v1/config", {"prefix": text}),
        ("/v1/config", {"prefix": base, "after": text}),
    ):
        response = probe(tally, "cross_tenant_generated", anon.get(path, params=params, headers=headers))
        if response.status_code >= 400:
            assert_problem(response)
