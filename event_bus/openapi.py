"""The bus's OpenAPI document.

The handlers read their own requests (no pydantic on the hot path), so FastAPI cannot infer
bodies, parameters or answers: they are kept here, by hand, and ``tests/hostile`` holds them
to the routes and the server's answers (schemathesis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from event_bus.problems import PROBLEM_CONTENT_TYPE

SINGLE_TYPES = ("application/cloudevents+json", "application/json")
BATCH_TYPES = ("application/cloudevents-batch+json", "application/json")
#: The most items one page of a stream or a config listing holds.
MAX_PAGE = 1_000
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_NAME = {"type": "string", "minLength": 1}
_EXTENSION_VALUE = {"type": ["string", "integer", "boolean", "null"]}
_CLOUDEVENT_PROPERTIES: dict[str, Any] = {
    "specversion": {"type": "string", "enum": ["1.0"]},
    "id": {"type": "string", "minLength": 1, "maxLength": 128, "description": "Idempotency key, unique per tenant."},
    "source": {"type": "string", "minLength": 1, "description": "URI-reference."},
    "type": {"type": "string", "minLength": 1, "maxLength": 256},
    "subject": {"type": ["string", "null"], "minLength": 1, "maxLength": 512},
    "time": {"type": ["string", "null"], "format": "date-time"},
    "datacontenttype": {"type": ["string", "null"], "minLength": 1, "maxLength": 256},
    "data": {"description": "Any JSON; for config.set {key, value}, for config.deleted {key}."},
    "tenantid": {"type": ["string", "null"], "description": "Must equal the token's tenant if sent."},
    "streamid": {"type": ["string", "null"], "minLength": 1, "maxLength": 512},
    "expectedversion": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**63 - 1},
    "correlationid": {"type": ["string", "null"], "minLength": 1, "maxLength": 256},
    "causationid": {"type": ["string", "null"], "minLength": 1, "maxLength": 256},
}
_SCHEMAS: dict[str, Any] = {
    "CloudEvent": {
        "type": "object",
        "description": "A CloudEvents 1.0 JSON envelope with tagbus's extensions.",
        "required": ["specversion", "id", "source", "type"],
        "properties": _CLOUDEVENT_PROPERTIES,
        "patternProperties": {"^[a-z0-9]{1,20}$": _EXTENSION_VALUE},
        "additionalProperties": False,
    },
    "StoredEvent": {
        "type": "object",
        "required": ["specversion", "id", "source", "type", "tenantid", "streamid", "version", "recordedat"],
        "properties": {
            "specversion": {"type": "string", "enum": ["1.0"]},
            "id": {"type": "string"},
            "source": {"type": "string"},
            "type": {"type": "string"},
            "tenantid": {"type": "string"},
            "streamid": {"type": "string"},
            "version": {"type": "integer", "minimum": 1},
            "recordedat": {"type": "string", "format": "date-time"},
            "subject": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"type": "string"},
            "correlationid": {"type": "string"},
            "causationid": {"type": "string"},
            "position": {"type": "integer"},
            "data": {},
        },
        "additionalProperties": {"type": ["string", "integer", "boolean"]},
    },
    "AppendResult": {
        "type": "object",
        "required": ["id", "tenant", "stream", "version", "recorded_at"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "stream": {"type": "string"},
            "version": {"type": "integer", "minimum": 1},
            "recorded_at": {"type": "string", "format": "date-time"},
        },
    },
    "BatchResults": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "allOf": [
                        {"$ref": "#/components/schemas/AppendResult"},
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"type": "integer", "enum": [200, 201]}},
                        },
                    ]
                },
            }
        },
    },
    "StreamPage": {
        "type": "object",
        "required": ["stream", "events", "next"],
        "properties": {
            "stream": {"type": "string"},
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/StoredEvent"}},
            "next": {"type": ["integer", "null"], "description": "from_version of the next page"},
        },
    },
    "ConfigItem": {
        "type": "object",
        "required": ["key", "value", "version", "updated_at"],
        "properties": {
            "key": {"type": "string"},
            "value": {},
            "version": {"type": "integer", "minimum": 1},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "ConfigPage": {
        "type": "object",
        "required": ["prefix", "items", "next"],
        "properties": {
            "prefix": {"type": "string"},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ConfigItem"}},
            "next": {"type": ["string", "null"], "description": "the 'after' of the next page"},
        },
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
}
_SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
_PROBLEM_TEXT = {
    400: "The body is not JSON (or not UTF-8).",
    401: "Token missing, malformed, with a bad signature or algorithm, expired, or of the wrong iss/aud.",
    403: "A scope is missing, or the envelope's tenantid is not the token's tenant.",
    404: "Unknown, or another tenant's.",
    408: "The body did not arrive in time.",
    409: "expectedversion is not the stream's version (body has current_version), or an id reused with other content.",
    413: "An event over 1 MiB, or a batch over 500 events or 5 MiB.",
    415: "Another content type.",
    422: "The envelope, its data or a parameter is invalid (errors names the fields).",
    429: "The tenant is over its quota.",
    503: "Overloaded, or a backing store is unreachable: retry after Retry-After.",
}
_RETRY_AFTER = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}}
_RATE_LIMIT = _RETRY_AFTER | {
    name: {"required": True, "schema": {"type": "integer", "minimum": 0}}
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
}


def _json_content(schema: Mapping[str, Any], *types: str) -> dict[str, Any]:
    return {t: {"schema": dict(schema)} for t in types or ("application/json",)}


def _problems(*statuses: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": _PROBLEM_TEXT[status],
            "content": {PROBLEM_CONTENT_TYPE: {"schema": _PROBLEM_REF}},
        }
        if status in (429, 503):
            response["headers"] = _RATE_LIMIT if status == 429 else _RETRY_AFTER
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
        responses[str(status)] = response
    return responses


def _operation(
    ok: Mapping[str, Any],
    problems: tuple[int, ...],
    *,
    body: Mapping[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    secured: bool = True,
) -> dict[str, Any]:
    """``openapi_extra`` of one route: its parameters, body and every answer it can give."""
    operation: dict[str, Any] = {"responses": dict(ok) | _problems(*problems)}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": dict(body)}
    if parameters:
        operation["parameters"] = parameters
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _NAME}


def _query_int(name: str, minimum: int, maximum: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _ok(status: int, schema_name: str, **headers: Any) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": "OK",
        "content": _json_content({"$ref": f"#/components/schemas/{schema_name}"}),
    }
    if headers:
        response["headers"] = headers
    return {str(status): response}


_LOCATION = {"required": True, "schema": {"type": "string"}}
_CLOUDEVENT_REF = {"$ref": "#/components/schemas/CloudEvent"}
_WRITE_PROBLEMS = (400, 401, 403, 408, 409, 413, 415, 422, 429, 503)
_READ_PROBLEMS = (401, 403, 404, 503)
OPERATIONS: dict[str, dict[str, Any]] = {
    "post_event": _operation(
        _ok(201, "AppendResult", Location=_LOCATION) | _ok(200, "AppendResult", Location=_LOCATION),
        _WRITE_PROBLEMS,
        body=_json_content(_CLOUDEVENT_REF, *SINGLE_TYPES),
    ),
    "post_batch": _operation(
        _ok(201, "BatchResults"),
        _WRITE_PROBLEMS,
        body=_json_content({"type": "array", "items": _CLOUDEVENT_REF, "minItems": 1, "maxItems": 500}, *BATCH_TYPES),
    ),
    "get_event": _operation(
        _ok(200, "StoredEvent"), _READ_PROBLEMS, parameters=[_path_param("event_id", "The event's id.")]
    ),
    "get_stream": _operation(
        _ok(200, "StreamPage"),
        (*_READ_PROBLEMS, 422),
        parameters=[
            _path_param("stream", "The stream's id."),
            _query_int("from_version", 1),
            _query_int("limit", 1, MAX_PAGE),
        ],
    ),
    "get_config": _operation(
        _ok(200, "ConfigItem"), _READ_PROBLEMS, parameters=[_path_param("key", "A config key, '<tag>:<path>'.")]
    ),
    "list_config": _operation(
        _ok(200, "ConfigPage"),
        (401, 403, 422, 503),
        parameters=[
            {"name": "prefix", "in": "query", "required": False, "schema": {"type": "string"}},
            _query_int("limit", 1, MAX_PAGE),
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
        ],
    ),
    "healthz": _operation(_ok(200, "Status"), (), secured=False),
    "readyz": _operation(_ok(200, "Status"), (503,), secured=False),
    "metrics": _operation(
        {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        (),
        secured=False,
    ),
}


def describe(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's paths, with the hand-kept operations of ``OPERATIONS``."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.name not in OPERATIONS:
            continue
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            operation.pop("responses", None)
            operation.update(OPERATIONS[route.name])
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(_SCHEMAS)
    components["securitySchemes"] = _SECURITY_SCHEMES
    return schema
