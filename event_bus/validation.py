"""Validation of incoming CloudEvents into :class:`NewEvent` records ready to append.

Everything a producer can get wrong is caught here, before the database is touched, and
reported as a problem naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from event_bus.problems import FieldError, Problem, bad_json, forbidden, invalid, too_large
from kernel.auth import Principal
from kernel.envelope import CONFIG_DELETED, CONFIG_SET, CONFIG_TYPES, SPECVERSION
from kernel.keys import MAX_KEY_CHARS, may_prefix_key, split_key

MAX_ID_CHARS = 128
MAX_STREAM_CHARS = MAX_KEY_CHARS
#: PostgreSQL refuses a time zone displacement of 16 hours or more.
_MAX_UTC_OFFSET = timedelta(hours=16)
#: The bus keeps an event well under Kinesis's 1 MiB record limit so that the record's
#: added fields (version, recordedat, position, tenant and stream) always fit.
MAX_EVENT_BYTES = 1_048_576 - 8_192

#: Integers outside this range cannot be written by orjson (which encodes the jsonb column,
#: the API answers and the Kinesis records), and orjson silently reads them as floats.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1

_CORE = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
_OURS = {"tenantid", "streamid", "expectedversion", "correlationid", "causationid"}
#: Attributes the bus adds to stored and streamed events: a producer's extension of the
#: same name would override them in the Kinesis record (e.g. a forged ``version``).
_ASSIGNED = {"version", "recordedat", "position"}
# Used with ``fullmatch``: ``$`` would also match before a trailing newline ("a\n").
_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
_SOURCE = re.compile(r"\S+")
# Ids and streams are addressed by URL paths (``GET /v1/events/{id}``, where a newline cannot
# be routed), echoed in ``Location`` headers and logged: no C0/C1 control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# JSON can carry U+0000 only as this escape, and an integer beyond 64 bits only as a run of
# at least 19 digits: both byte searches are cheap, so the exact (slow) checks run only
# for the rare bodies that contain one.
_NUL_ESCAPE = b"\\u0000"
#: A run of 19 digits (the shortest integer literal that can leave the 64-bit range) is found
#: by mapping every digit to "0" and searching for 19 zeros: far cheaper than a regex scan,
#: which cost more than orjson's whole decode of a large batch.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


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
    #: ``"data": null`` was sent: a null payload, distinct from none (CloudEvents JSON format,
    #: 3.1.1). The store should write it as JSON ``null`` rather than SQL NULL (open).
    has_data: bool = field(default=False)


def decode_json(raw: bytes) -> Any:
    """Decode a request body, refusing what the events table or orjson cannot hold as is.

    Not JSON (including invalid UTF-8, lone surrogates, nesting past orjson's 1024 levels)
    is a 400; U+0000 in any string (PostgreSQL's text and jsonb refuse it) and integers
    beyond the 64-bit range (orjson would silently round them to floats) are a 422.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_json(str(e)) from e
    if _NUL_ESCAPE in raw:
        where = _find_nul(value, "")
        if where is not None:
            raise invalid([FieldError(where or "/", "strings must not contain U+0000 (NUL)")])
    if _LONG_DIGITS in raw.translate(_DIGITS_TO_ZERO):
        _check_integers(raw)
    return value


def _find_nul(value: Any, where: str) -> str | None:
    """JSON pointer of the first string (or member name) holding U+0000, if any."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for name, member in value.items():
            pointer = f"{where}/{_escape_pointer(name)}"
            if "\x00" in name:
                return pointer
            found = _find_nul(member, pointer)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_nul(item, f"{where}/{i}")
            if found is not None:
                return found
    return None


def _escape_pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _check_integers(raw: bytes) -> None:
    def integer(literal: str) -> int:
        number = int(literal)
        if not MIN_INT <= number <= MAX_INT:
            raise invalid(
                [FieldError("/", f"the integer {literal[:40]} is outside the 64-bit range; send it as a string")]
            )
        return number

    try:
        json.loads(raw, parse_int=integer)
    except RecursionError as e:
        raise invalid([FieldError("/", "the body nests JSON too deeply")]) from e
    except ValueError as e:  # ``int()``'s digit limit: such a literal is far beyond 64 bits too
        raise invalid([FieldError("/", "an integer is outside the 64-bit range; send it as a string")]) from e


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
    try:
        size = len(orjson.dumps(body))
    except orjson.JSONEncodeError as e:
        # What orjson decoded it can encode again, except nesting past its encoder's limit.
        raise invalid([FieldError(where or "/", "the event nests JSON too deeply")]) from e
    if size > max_event_bytes:
        raise too_large(f"event{where and ' ' + where} is {size} bytes; the limit is {max_event_bytes}")
    errors: list[FieldError] = []

    def err(name: str, message: str) -> None:
        errors.append(FieldError(f"{where}/{name}", message))

    def text(name: str, *, required: bool, limit: int | None = None, plain: bool = False) -> str | None:
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
        if plain and _CONTROL.search(value):
            err(name, "must not contain control characters")
            return None
        return value

    if body.get("specversion") != SPECVERSION:
        err("specversion", f'must be "{SPECVERSION}"')
    event_id = text("id", required=True, limit=MAX_ID_CHARS, plain=True)
    source = text("source", required=True)
    if source is not None and not _SOURCE.fullmatch(source):
        err("source", "must be a URI-reference without whitespace")
    event_type = text("type", required=True, limit=256)
    subject = text("subject", required=False, limit=MAX_STREAM_CHARS, plain=True)
    content_type = text("datacontenttype", required=False, limit=256)
    occurred = _time(body.get("time"), err)
    tenant = body.get("tenantid")
    if tenant is not None and tenant != principal.tenant:
        raise forbidden("tenantid differs from the token's tenant")
    stream = text("streamid", required=False, limit=MAX_STREAM_CHARS, plain=True)
    expected = body.get("expectedversion")
    if expected is not None and (
        not isinstance(expected, int) or isinstance(expected, bool) or not 0 <= expected < 2**63
    ):
        err("expectedversion", "must be a non-negative 64-bit integer")
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
        if name in _CORE or name in _OURS or value is None:
            # An attribute sent as null is unset (CloudEvents JSON format, 2.2).
            continue
        if name == "data_base64":
            err(name, "binary data is not supported; send JSON in 'data'")
        elif name in _ASSIGNED:
            err(name, "is assigned by the bus and cannot be sent")
        elif not _EXTENSION_NAME.fullmatch(name):
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
        has_data="data" in body,
    )


def parse_config_key(key: str, tags: Collection[str]) -> tuple[str, str]:
    """Split ``<tag>:<path>``; raise ``ValueError`` with a one-line reason if invalid."""
    return split_key(key, tags)


def may_prefix_config_key(prefix: str, tags: Collection[str]) -> bool:
    """Whether some valid config key starts with ``prefix`` (else a listing is empty as is)."""
    return may_prefix_key(prefix, tags)


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
                offset = moment.utcoffset()
                if offset is not None and abs(offset) >= _MAX_UTC_OFFSET:
                    # RFC 3339 allows it, PostgreSQL's timestamptz does not: it would fail the insert.
                    err("time", "must have a UTC offset within ±15:59:59")
                    return None
                try:
                    moment.astimezone(UTC)
                except OverflowError:
                    # Readable in PostgreSQL, but not back into Python: a poison row.
                    err("time", "must lie between the years 1 and 9999 in UTC")
                    return None
                return moment
    err("time", "must be an RFC 3339 timestamp with a time zone")
    return None


def _digest(body: Mapping[str, Any]) -> str:
    # What the event says, not how it was spelled: an attribute sent as null is the same as
    # one left out, so a repeat that leaves it out is an exact repeat. ``data`` is the
    # exception: a null payload is distinct from none (CloudEvents JSON format, 3.1.1).
    canonical = {k: v for k, v in body.items() if k != "tenantid" and (v is not None or k == "data")}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


__all__ = [
    "MAX_EVENT_BYTES",
    "NewEvent",
    "Problem",
    "decode_json",
    "may_prefix_config_key",
    "parse_config_key",
    "parse_event",
]
