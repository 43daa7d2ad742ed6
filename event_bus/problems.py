"""RFC 9457 problem details: the one error type the HTTP edge answers with.

Every failure a client can cause or must react to is raised as a :class:`Problem` (or a
subclass) and rendered as ``application/problem+json`` by the app's exception handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel.auth import AuthError, KeysUnavailable, PermissionDenied

PROBLEM_CONTENT_TYPE = "application/problem+json"
_TYPE_BASE = "https://tagbus.dev/problems/"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of the request body (JSON pointer style location)."""

    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@dataclass(eq=False)
class Problem(Exception):
    """An HTTP problem: status, a stable type slug, a human title and detail."""

    status: int
    slug: str
    title: str
    detail: str = ""
    errors: Sequence[FieldError] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.title}: {self.detail}")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": _TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = [e.to_json() for e in self.errors]
        body.update(self.extra)
        return body


def bad_json(detail: str) -> Problem:
    return Problem(400, "malformed-json", "Body is not valid JSON", detail)


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Authentication failed", detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", "Not allowed", detail)


def not_found(detail: str) -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def conflict(slug: str, detail: str, **extra: Any) -> Problem:
    return Problem(409, slug, "Conflict", detail, extra=extra)


def request_timeout(detail: str) -> Problem:
    # The connection is closed after it: the rest of a slow body is not worth reading.
    return Problem(408, "request-timeout", "Request timeout", detail, headers={"Connection": "close"})


def too_large(detail: str) -> Problem:
    return Problem(413, "too-large", "Payload too large", detail)


def unsupported_media_type(detail: str) -> Problem:
    return Problem(415, "unsupported-media-type", "Unsupported media type", detail)


def invalid(errors: Sequence[FieldError], detail: str = "The event envelope is invalid") -> Problem:
    return Problem(422, "invalid-event", "Invalid event", detail, errors=errors)


def from_auth(error: AuthError) -> Problem:
    """The HTTP problem of a refused caller (the kernel's verifier knows no HTTP)."""
    if isinstance(error, PermissionDenied):
        return forbidden(error.detail)
    if isinstance(error, KeysUnavailable):
        return unavailable(error.detail, retry_after=error.retry_after or 1)
    return unauthorized(error.detail)


def unavailable(detail: str, retry_after: int = 1) -> Problem:
    return Problem(503, "unavailable", "Service unavailable", detail, headers={"Retry-After": str(retry_after)})
