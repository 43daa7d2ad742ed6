"""Structured access logs of the bus: one JSON line per request, never a token or a secret.

A line holds what an operator needs to follow one request across services (request id,
correlation id) and to slice traffic (route, status, tenant, tier, latency). The request
headers are never logged, so the ``Authorization`` header cannot leak through them.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

import orjson

ACCESS_LOGGER = "tagbus.bus.access"

# A caller's request id is echoed in a response header and logged, so keep it short and
# plain; anything else is replaced by a fresh id rather than trusted.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MAX_CORRELATION_CHARS = 256


def request_id(header: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a new random id."""
    if header is not None and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class AccessLog:
    """Writes one JSON line per request at INFO, and builds nothing when INFO is off."""

    logger: logging.Logger

    @classmethod
    def named(cls, name: str = ACCESS_LOGGER) -> AccessLog:
        return cls(logging.getLogger(name))

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def request(
        self,
        *,
        request_id: str,
        method: str,
        route: str,
        status: int,
        latency_seconds: float,
        tenant: str | None,
        tier: str | None,
        correlation_id: str | None,
    ) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        line = {
            "event": "http_request",
            "request_id": request_id,
            "method": method,
            "route": route,
            "status": status,
            "latency_ms": round(latency_seconds * 1000, 3),
            "tenant": tenant,
            "tier": tier,
        }
        if correlation_id is not None:
            line["correlation_id"] = correlation_id[:_MAX_CORRELATION_CHARS]
        # The JSON line is the message itself, so any handler or formatter prints it whole;
        # orjson escapes control characters, so a hostile value cannot forge a second line.
        self.logger.info("%s", orjson.dumps(line).decode())
