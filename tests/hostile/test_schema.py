"""``/openapi.json`` describes every route, and the bus keeps to it under schemathesis.

The ingest routes are plain Starlette routes whose schema is kept by hand (they parse their
own bodies): the first test holds that description to the routes the app really serves;
schemathesis then sends what the schema allows and what it does not, with a valid token
and without one, and checks every answer against the schema: no 5xx, documented status
codes, content types, headers and bodies.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from event_bus.app import create_app
from event_bus.settings import BusSettings
from kernel.auth import AuthSettings
from tests.fixtures.bus import SECRET, TAGS
from tests.hostile.conftest import HostileBus, HostileTally

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def test_every_route_is_documented_with_its_answers() -> None:
    app = create_app(BusSettings(database_url="postgresql://unused/x", auth=AuthSettings(jwt_secret=SECRET)), tags=TAGS)
    document = app.openapi()
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, Route) or route.path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            continue
        path = route.path_format if hasattr(route, "path_format") else route.path
        served |= {(m, path) for m in route.methods or () if m != "HEAD"}
    assert served == _documented(document)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert any(s.startswith("2") for s in responses), (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    ref = response["content"]["application/problem+json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Problem", (method, path, status)
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearer": []}]
                assert {"401", "403", "503"} <= responses.keys(), (method, path)
            if method == "post":
                assert {"400", "408", "409", "413", "415", "422", "429"} <= responses.keys()
                assert operation["requestBody"]["content"]
    batch = document["paths"]["/v1/events:batch"]["post"]["requestBody"]["content"]
    assert batch["application/cloudevents-batch+json"]["schema"]["maxItems"] == 500


def test_docs_page_is_served(hostile_bus: HostileBus) -> None:
    docs = httpx.get(f"{hostile_bus.base_url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def _offline_document() -> dict[str, Any]:
    settings = BusSettings(database_url="postgresql://unused/x", auth=AuthSettings(jwt_secret=SECRET))
    return create_app(settings, tags=TAGS).openapi()


def test_the_served_document_is_the_one_tested(hostile_bus: HostileBus) -> None:
    # schemathesis loads the document at import time (its lazy fixture loader does not run
    # on this pytest), from an app that is never served: it must be what the bus serves.
    assert httpx.get(f"{hostile_bus.base_url}/openapi.json").json() == _offline_document()


schema = schemathesis.openapi.from_dict(_offline_document())


@schema.parametrize()
@EXAMPLES
def test_schema_holds_with_a_valid_token(case: Any, hostile_bus: HostileBus, tally: HostileTally) -> None:
    token = hostile_bus.hs256("schemathesis", scope="events:write events:read config:read")
    response = case.call(base_url=hostile_bus.base_url, headers={"Authorization": f"Bearer {token}"})
    tally.record("schemathesis_with_token", server_error=response.status_code >= 500 and response.status_code != 503)
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@EXAMPLES
def test_schema_holds_without_a_token(case: Any, hostile_bus: HostileBus, tally: HostileTally) -> None:
    response = case.call(base_url=hostile_bus.base_url)
    tally.record("schemathesis_without_token", server_error=response.status_code >= 500)
    case.validate_response(response, checks=CHECKS)
    if case.path.startswith("/v1/"):
        assert response.status_code in (401, 404, 405, 408, 413, 415), response.text[:300]
