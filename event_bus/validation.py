"""Validation of incoming CloudEvents into :class:`NewEvent` records ready to append.

Everything a producer can get wrong is caught here, before the database is touched, and
reported as a problem naming the field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from event_bus.auth import Principal
from event_bus.envelope import CONFIG_DELETED, CONFIG_SET, CONFIG_TYPES, SPECVERSION
from event_bus.problems import FieldError, Problem, forbidden, invalid, too_large

MAX_ID_CHARS = 128
MAX_STREAM_CHARS = 512
#: The bus keeps an event well under Kinesis's 1 MiB record limit so that the record's
#: added fields (version, recordedat, position, tenant and stream) always fit.
MAX_EVENT_BYTES = 1_048_576 - 8_192

_CORE = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
_OURS = {"tenantid", "streamid", "expectedversion", "correlationid", "causationid"}
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_SOURCE = re.compile(r"^\S+$")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A validated event, not yet stored."""

    id: str
    tenant: str
    stream: str
    type: str
    source: str
    subject: str | None
    time: datetime | None
    data: Any
    metadata: dict[str, Any]
    expected_version: int | None
    digest: str
    size: int = field(default=0)


def parse_event(
    body: object,
    principal: Principal,
    *,
    tags: Collection[str],
    max_event_bytes: int = MAX_EVENT_BYTES,
    where: str = "",
) -> NewEvent:
    """Validate one CloudEvent (already JSON-decoded) sent by ``principal``."""
    if not isinstance(body, Mapping):
        raise invalid([FieldError(where or "/", "an event must be a JSON object")])
    size = len(orjson.dumps(body))
    if size > max_event_bytes:
        raise too_large(f"event{where and ' ' + where} is {size} bytes; the limit is {max_event_bytes}")
    errors: list[FieldError] = []

    def err(name: str, message: str) -> None:
        errors.append(FieldError(f"{where}/{name}", message))

    def text(name: str, *, required: bool, limit: int | None = None) -> str | None:
        value = body.get(name)
        if value is None:
            if required:
                err(name, "is required")
            return None
        if not isinstance(value, str) or not value:
            err(name, "must be a non-empty string")
            return None
        if limit is not None and len(value) > limit:
            err(name, f"must be at most {limit} characters")
            return None
        return value

    if body.get("specversion") != SPECVERSION:
        err("specversion", f'must be "{SPECVERSION}"')
    event_id = text("id", required=True, limit=MAX_ID_CHARS)
    source = text("source", required=True)
    if source is not None and not _SOURCE.match(source):
        err("source", "must be a URI-reference without whitespace")
    event_type = text("type", required=True, limit=256)
    subject = text("subject", required=False, limit=MAX_STREAM_CHARS)
    content_type = text("datacontenttype", required=False, limit=256)
    occurred = _time(body.get("time"), err)
    tenant = body.get("tenantid")
    if tenant is not None and tenant != principal.tenant:
        raise forbidden("tenantid differs from the token's tenant")
    stream = text("streamid", required=False, limit=MAX_STREAM_CHARS)
    expected = body.get("expectedversion")
    if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 0):
        err("expectedversion", "must be a non-negative integer")
        expected = None
    metadata: dict[str, Any] = {"sub": principal.subject}
    for name in ("correlationid", "causationid"):
        value = text(name, required=False, limit=256)
        if value is not None:
            metadata[name] = value
    if content_type is not None:
        metadata["datacontenttype"] = content_type
    extensions: dict[str, Any] = {}
    for name, value in body.items():
        if name in _CORE or name in _OURS:
            continue
        if name == "data_base64":
            err(name, "binary data is not supported; send JSON in 'data'")
        elif not _EXTENSION_NAME.match(name):
            err(name, "extension attribute names are 1-20 lowercase letters or digits")
        elif not isinstance(value, str | int | bool) or isinstance(value, float):
            err(name, "extension attributes must be strings, integers or booleans")
        else:
            extensions[name] = value
    if extensions:
        metadata["extensions"] = extensions
    data = body.get("data")
    if event_type in CONFIG_TYPES:
        key = _config_key(event_type, data, tags, err)
        if key is not None:
            if stream is not None and stream != key:
                err("streamid", "a config event's stream is its key")
            stream = key
    if errors:
        raise invalid(errors)
    assert event_id is not None and source is not None and event_type is not None
    stream = stream or subject or event_id
    return NewEvent(
        id=event_id,
        tenant=principal.tenant,
        stream=stream,
        type=event_type,
        source=source,
        subject=subject,
        time=occurred,
        data=data,
        metadata=metadata,
        expected_version=expected,
        digest=_digest(body),
        size=size,
    )


def parse_config_key(key: str, tags: Collection[str]) -> tuple[str, str]:
    """Split ``<tag>:<path>``; raise ``ValueError`` with a one-line reason if invalid."""
    tag, sep, path = key.partition(":")
    if not sep or not tag:
        raise ValueError("a config key is '<tag>:<path>'")
    if tag not in tags:
        raise ValueError(f"unknown tag {tag!r}; registered: {', '.join(sorted(tags))}")
    segments = path.split("/")
    if not path or not all(_PATH_SEGMENT.match(s) for s in segments):
        raise ValueError("the path is '/'-separated segments of letters, digits, '_', '.' and '-'")
    return tag, path


def _config_key(event_type: str, data: object, tags: Collection[str], err: Any) -> str | None:
    if not isinstance(data, Mapping):
        err("data", "a config event's data is an object with 'key'")
        return None
    key = data.get("key")
    if not isinstance(key, str):
        err("data/key", "is required and must be a string")
        return None
    try:
        parse_config_key(key, tags)
    except ValueError as e:
        err("data/key", str(e))
        return None
    if event_type == CONFIG_SET and "value" not in data:
        err("data/value", "is required for config.set")
    if event_type == CONFIG_DELETED and "value" in data:
        err("data/value", "config.deleted carries no value")
    return key


def _time(value: object, err: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                return moment
    err("time", "must be an RFC 3339 timestamp with a time zone")
    return None


def _digest(body: Mapping[str, Any]) -> str:
    canonical = {k: v for k, v in body.items() if k != "tenantid"}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


__all__ = ["MAX_EVENT_BYTES", "NewEvent", "Problem", "parse_config_key", "parse_event"]
