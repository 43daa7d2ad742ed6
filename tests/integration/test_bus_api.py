"""The bus's HTTP contract against a real PostgreSQL over real HTTP: every status code."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import psycopg

from devtools.ports import free_port
from event_bus.app import create_app
from event_bus.settings import BusSettings
from kernel.auth import issue_dev_token
from tests.fixtures.bus import SECRET, TAGS, RunningBus, serve


def event(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/test", "type": "thing.happened"}
    body.update(fields)
    return body


def config_set(key: str, value: Any, **fields: Any) -> dict[str, Any]:
    return event(type="config.set", data={"key": key, "value": value}, **fields)


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def test_post_then_read_back(bus: RunningBus, database_url: str) -> None:
    sent = config_set("tenantconfig:features/dark-mode", {"on": True}, correlationid="c-1")
    with bus.client("acme") as client:
        created = client.post("/v1/events", json=sent)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["id"] == sent["id"] and body["tenant"] == "acme" and body["version"] == 1
        assert body["stream"] == "tenantconfig:features/dark-mode"
        assert created.headers["location"] == f"/v1/events/{sent['id']}"
        stored = client.get(created.headers["location"]).json()
    assert stored["data"] == sent["data"] and stored["correlationid"] == "c-1" and stored["tenantid"] == "acme"
    [(sub,)] = rows(database_url, "SELECT metadata->>'sub' FROM events WHERE event_id = %s", sent["id"])
    assert sub == "dev"


def test_exact_repeat_is_200_and_changed_repeat_is_409(bus: RunningBus, database_url: str) -> None:
    sent = event(subject="orders/1")
    with bus.client("acme") as client:
        first = client.post("/v1/events", json=sent)
        again = client.post("/v1/events", json=sent)
        changed = client.post("/v1/events", json=sent | {"data": {"different": True}})
    assert (first.status_code, again.status_code, changed.status_code) == (201, 200, 409)
    assert again.json() == first.json()
    assert changed.headers["content-type"] == "application/problem+json"
    assert rows(database_url, "SELECT count(*) FROM events WHERE event_id = %s", sent["id"]) == [(1,)]


def test_concurrent_repeats_store_one_row(bus: RunningBus, database_url: str) -> None:
    sent = event(subject="orders/2")
    with bus.client("acme") as client, ThreadPoolExecutor(16) as pool:
        statuses = sorted(pool.map(lambda _: client.post("/v1/events", json=sent).status_code, range(32)))
    assert statuses == [200] * 31 + [201]
    assert rows(database_url, "SELECT count(*) FROM events WHERE event_id = %s", sent["id"]) == [(1,)]


def test_repeats_among_new_events_leave_no_gap(bus: RunningBus, database_url: str) -> None:
    # Groups and batches are written without looking their ids up first; a repeat among them
    # fails that attempt, and the retry must neither lose the new events nor skip versions.
    first = [event(subject="mix/1") for _ in range(20)]
    fresh = [event(subject="mix/1") for _ in range(20)]
    with bus.client("acme") as client, ThreadPoolExecutor(16) as pool:
        originals = list(pool.map(lambda body: client.post("/v1/events", json=body), first))
        assert {r.status_code for r in originals} == {201}
        mixed = list(pool.map(lambda body: client.post("/v1/events", json=body), [*first, *fresh]))
        repeat_in_batch = client.post("/v1/events:batch", json=[*[event(subject="mix/1") for _ in range(3)], first[0]])
    assert [r.status_code for r in mixed] == [200] * 20 + [201] * 20
    assert [r.json() for r in mixed[:20]] == [r.json() for r in originals]
    assert repeat_in_batch.status_code == 201, repeat_in_batch.text
    assert [r["version"] for r in repeat_in_batch.json()["results"]] == [41, 42, 43, originals[0].json()["version"]]
    versions = rows(database_url, "SELECT version FROM events WHERE stream_id = 'mix/1' ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, 44))


def test_concurrent_writers_get_gapless_versions(bus: RunningBus) -> None:
    with bus.client("acme") as client, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: client.post("/v1/events", json=event(subject="cart/9")), range(60)))
        assert {r.status_code for r in results} == {201}
        versions = sorted(r.json()["version"] for r in results)
        stream = client.get("/v1/streams/cart/9", params={"limit": 1000}).json()
    assert versions == list(range(1, 61))
    assert [e["version"] for e in stream["events"]] == list(range(1, 61))


def test_expected_version_conflict_reports_current(bus: RunningBus) -> None:
    with bus.client("acme") as client:
        assert client.post("/v1/events", json=event(subject="acct/1", expectedversion=0)).status_code == 201
        assert client.post("/v1/events", json=event(subject="acct/1", expectedversion=0)).status_code == 409
        ok = client.post("/v1/events", json=event(subject="acct/1", expectedversion=1))
        stale = client.post("/v1/events", json=event(subject="acct/1", expectedversion=1))
    assert ok.status_code == 201 and ok.json()["version"] == 2
    assert stale.status_code == 409 and stale.json()["current_version"] == 2


def test_stream_pages_are_bounded_in_bytes(bus: RunningBus) -> None:
    # A page of 1,000 events of up to 1 MiB each was read and serialized at once.
    blob = "x" * 900_000
    with bus.client("acme") as client:
        sent = [event(subject="big/1", data={"blob": blob, "n": n}) for n in range(7)]
        for body in sent:
            assert client.post("/v1/events", json=body).status_code == 201
        seen: list[int] = []
        params: dict[str, int] = {"from_version": 1, "limit": 1000}
        while True:
            response = client.get("/v1/streams/big/1", params=params)
            assert response.status_code == 200 and len(response.content) < 5 * 1_048_576
            page = response.json()
            assert page["events"], page["next"]
            seen += [e["data"]["n"] for e in page["events"]]
            if page["next"] is None:
                break
            assert page["next"] == page["events"][-1]["version"] + 1
            params["from_version"] = page["next"]
    assert seen == list(range(7))
    assert len(seen) > len(page["events"])  # it took more than one page


def test_batch_is_all_or_nothing(bus: RunningBus, database_url: str) -> None:
    good = [event(subject="b/1") for _ in range(3)]
    with bus.client("acme") as client:
        bad = client.post("/v1/events:batch", json=[*good, event(subject="b/1", expectedversion=7)])
        assert bad.status_code == 409
        assert rows(database_url, "SELECT count(*) FROM events WHERE stream_id = 'b/1'") == [(0,)]
        invalid = client.post("/v1/events:batch", json=[*good, {"id": "x"}])
        assert invalid.status_code == 422
        assert {e["field"].split("/")[1] for e in invalid.json()["errors"]} == {"3"}
        ok = client.post("/v1/events:batch", json=good, headers={"content-type": "application/cloudevents-batch+json"})
    assert ok.status_code == 201
    assert [r["version"] for r in ok.json()["results"]] == [1, 2, 3]


def test_batch_limits(bus: RunningBus) -> None:
    with bus.client("acme") as client:
        too_many = client.post("/v1/events:batch", json=[event() for _ in range(501)])
        empty = client.post("/v1/events:batch", json=[])
    assert too_many.status_code == 413 and empty.status_code == 422


def test_other_tenants_ids_are_404(bus: RunningBus) -> None:
    sent = event(subject="secret/1")
    with bus.client("acme") as acme, bus.client("globex") as globex:
        assert acme.post("/v1/events", json=sent).status_code == 201
        assert globex.get(f"/v1/events/{sent['id']}").status_code == 404
        assert globex.get("/v1/streams/secret/1").status_code == 404
        # The same id is free for another tenant: ids are unique per tenant.
        assert globex.post("/v1/events", json=sent).status_code == 201


def test_tenant_comes_from_the_token(bus: RunningBus) -> None:
    with bus.client("acme") as client:
        response = client.post("/v1/events", json=event(tenantid="globex"))
    assert response.status_code == 403


def test_scopes_are_enforced(bus: RunningBus) -> None:
    with bus.client("acme", scope="events:read") as reader:
        assert reader.post("/v1/events", json=event()).status_code == 403
    with bus.client("acme", scope="events:write") as writer:
        assert writer.get("/v1/events/nope").status_code == 403


def test_bad_tokens_are_401(bus: RunningBus) -> None:
    now = int(time.time())
    claims = {"sub": "s", "tenant_id": "acme", "tier": "basic", "scope": "events:write", "exp": now + 60}
    tokens = {
        "missing": None,
        "garbage": "not.a.token",
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "wrong key": jwt.encode(claims, "another-secret-that-is-long-enough-x", algorithm="HS256"),
        "expired": jwt.encode(claims | {"exp": now - 3600}, SECRET, algorithm="HS256"),
        "future nbf": jwt.encode(claims | {"nbf": now + 3600}, SECRET, algorithm="HS256"),
        "no tenant": jwt.encode({k: v for k, v in claims.items() if k != "tenant_id"}, SECRET, algorithm="HS256"),
    }
    for name, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.post(f"{bus.base_url}/v1/events", json=event(), headers=headers)
        assert response.status_code == 401, name
        assert response.headers["content-type"] == "application/problem+json", name


def test_body_errors(bus: RunningBus) -> None:
    with bus.client("acme") as client:
        not_json = client.post("/v1/events", content=b"{nope", headers={"content-type": "application/json"})
        wrong_type = client.post("/v1/events", content=b"{}", headers={"content-type": "text/plain"})
        huge = client.post("/v1/events", json=event(data={"blob": "x" * 1_100_000}))
        missing = client.post("/v1/events", json={"specversion": "1.0"})
        unknown_tag = client.post("/v1/events", json=config_set("nosuchtag:a", 1))
        mismatch = client.post("/v1/events", json=config_set("tenantconfig:a", 1, streamid="other"))
        bad_path = client.post("/v1/events", json=config_set("tenantconfig:a//b", 1))
    assert not_json.status_code == 400
    assert wrong_type.status_code == 415
    assert huge.status_code == 413
    assert missing.status_code == 422
    assert {e["field"] for e in missing.json()["errors"]} == {"/id", "/source", "/type"}
    assert unknown_tag.status_code == 422 and mismatch.status_code == 422 and bad_path.status_code == 422


def test_quota_answers_429_with_headers(bus: RunningBus) -> None:
    statuses: list[httpx.Response] = []
    with bus.client("small", tier="basic") as client:
        # Past the burst of 5 the bucket refills at 5/s: on a busy machine a request may take
        # longer than that, so send until one is refused rather than a fixed 8.
        while len(statuses) < 60 and not any(r.status_code == 429 for r in statuses):
            statuses.append(client.post("/v1/events", json=event()))
    limited = [r for r in statuses if r.status_code == 429]
    assert [r.status_code for r in statuses[:5]] == [201] * 5 and limited
    assert int(limited[0].headers["retry-after"]) >= 1
    assert limited[0].headers["ratelimit-limit"] == "5"


def test_a_batch_over_the_burst_is_413_not_a_retryable_429(bus: RunningBus) -> None:
    # Was a 429 with Retry-After: a batch larger than the burst can never be admitted, and
    # the producers SDK retried it for as long as it was told to.
    with bus.client("batcher", tier="basic") as client:
        response = client.post("/v1/events:batch", json=[event() for _ in range(6)])
        assert response.status_code == 413, response.text
        assert "retry-after" not in response.headers and "burst of 5" in response.json()["detail"]
        assert client.post("/v1/events:batch", json=[event() for _ in range(5)]).status_code == 201


def test_quota_claim_overrides_tier(bus: RunningBus) -> None:
    with bus.client("roomy", tier="basic", quota={"events_per_second": 1000, "burst": 50}) as client:
        statuses = {client.post("/v1/events", json=event()).status_code for _ in range(20)}
    assert statuses == {201}


def test_operability_endpoints(bus: RunningBus) -> None:
    assert httpx.get(f"{bus.base_url}/healthz").status_code == 200
    assert httpx.get(f"{bus.base_url}/readyz").status_code == 200
    assert "/v1/events" in httpx.get(f"{bus.base_url}/openapi.json").json()["paths"]
    with bus.client("acme") as client:
        client.post("/v1/events", json=event())
    metrics = httpx.get(f"{bus.base_url}/metrics").text
    assert 'tagbus_http_requests_total{route="post_event",status="201",tier="enterprise"}' in metrics


class _FailingReader:
    """A config read side whose store is down."""

    def get(self, tenant: str, key: str) -> Mapping[str, Any] | None:
        raise ConnectionError("read model unreachable")

    def list(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None
    ) -> tuple[list[Mapping[str, Any]], str | None]:
        raise ConnectionError("read model unreachable")


class _UnknownTagReader(_FailingReader):
    """Lists like the tag router: a prefix naming an unregistered tag raises (not a ValueError)."""

    def list(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None
    ) -> tuple[list[Mapping[str, Any]], str | None]:
        if ":" in prefix and prefix.partition(":")[0] not in TAGS:
            raise LookupError(f"no store for {prefix}")
        return [], None


def _bus_with_reader(bus_settings: BusSettings, reader: Any) -> Iterator[str]:
    port = free_port()
    stop = serve(create_app(bus_settings, tags=TAGS, config_reader=reader), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop()


def test_config_read_model_failures_are_503(bus_settings: BusSettings) -> None:
    # Were 500s: the read side's errors escaped the handlers.
    for base_url in _bus_with_reader(bus_settings, _FailingReader()):
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {_token('acme')}"}) as client:
            for response in (client.get("/v1/config/tenantconfig:a"), client.get("/v1/config?prefix=tenantconfig:")):
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/problem+json"
                assert int(response.headers["retry-after"]) >= 1


def test_config_listing_checks_prefix_and_cursor(bus_settings: BusSettings) -> None:
    for base_url in _bus_with_reader(bus_settings, _UnknownTagReader()):
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {_token('acme')}"}) as client:
            # Was a 500 (the router's UnknownTag): no key can start with it, so the page is empty.
            for prefix in ("acme:", "nosuchtag:x", "tenantconfig:a b", "tenantconfig:" + "a" * 600, "tenant"):
                response = client.get("/v1/config", params={"prefix": prefix})
                assert response.status_code == 200 and response.json()["items"] == [], (prefix, response.text)
            # The cursor is a key (the previous page's ``next``): anything else went to the stores as is.
            for after in ("", "%", "tenantconfig:", "x" * 2_000):
                response = client.get("/v1/config", params={"prefix": "tenantconfig:", "after": after})
                assert response.status_code == 422 and "after" in response.json()["detail"], after
            # A cursor outside the prefix's range never reaches the store (DynamoDB refused it: 500).
            outside = {"prefix": "tenantconfig:b", "after": "tenantconfig:c"}
            assert client.get("/v1/config", params=outside).json() == {
                "prefix": "tenantconfig:b",
                "items": [],
                "next": None,
            }
            before = client.get("/v1/config", params={"prefix": "tenantconfig:b", "after": "tenantconfig:a"})
            assert before.status_code == 200
            # A key longer than any stream cannot exist: 404 without asking the read model.
            assert client.get("/v1/config/tenantconfig:" + "a" * 600).status_code == 404


def _token(tenant: str) -> str:
    return issue_dev_token(SECRET, tenant=tenant, tier="enterprise", scope="config:read", now=time.time())
