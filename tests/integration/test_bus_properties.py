"""Hypothesis properties of the ingest API over real HTTP on a real PostgreSQL.

Valid generated envelopes round-trip exactly through ``POST /v1/events`` and
``GET /v1/events/{id}``; invalid ones (and random JSON or bytes) get a 4xx problem, never a
5xx. One bus serves the whole module so that a few hundred examples stay within seconds;
every example uses fresh ids, so examples never see each other's events.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.postgres_cluster import cloned_database
from event_bus.settings import BusSettings
from event_bus.validation import MAX_INT, MIN_INT
from kernel.auth import AuthSettings
from tests.fixtures.bus import SECRET, TAGS, RunningBus, running_bus

TENANT = "props"
PROBLEM = "application/problem+json"
RESERVED = {
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "tenantid",
    "streamid",
    "expectedversion",
    "correlationid",
    "causationid",
    "version",
    "recordedat",
    "position",
}

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module")
def module_bus(pg_server_url: str) -> Iterator[RunningBus]:
    """One bus (and one database) for the whole module."""
    with cloned_database(pg_server_url) as url:
        bus_settings = BusSettings(database_url=url, auth=AuthSettings(jwt_secret=SECRET), pool_size=8)
        with running_bus(bus_settings) as running:
            yield running


@pytest.fixture(scope="module")
def client(module_bus: RunningBus) -> Iterator[httpx.Client]:
    with module_bus.client(TENANT) as c:
        yield c


# --- strategies -------------------------------------------------------------------------

# Any Unicode scalar value but U+0000 (which PostgreSQL cannot store; see the regression
# tests below): surrogates cannot be encoded as UTF-8 at all.
text_chars = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.text(text_chars, max_size=40)
non_empty = st.text(text_chars, min_size=1, max_size=40)
# Ids and streams are addressed by URL paths: no control characters (see the regression tests).
plain_chars = st.characters(codec="utf-8", exclude_categories=["Cc"])
json_scalars = (
    st.none() | st.booleans() | st.integers(MIN_INT, MAX_INT) | st.floats(allow_nan=False, allow_infinity=False) | texts
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=5),
    max_leaves=25,
)
extension_names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(lambda n: n not in RESERVED)
extension_values = st.one_of(non_empty, st.integers(MIN_INT, MAX_INT), st.booleans())
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets | st.just(UTC))
path_segments = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
config_keys = st.tuples(st.sampled_from(TAGS), st.lists(path_segments, min_size=1, max_size=4)).map(
    lambda t: f"{t[0]}:{'/'.join(t[1])}"
)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid CloudEvent with any mix of optional and extension attributes."""
    body: dict[str, Any] = {
        "specversion": "1.0",
        # The id's random part comes later (per example), so repeats never collide.
        "id": draw(st.text(plain_chars, max_size=60)),
        "source": draw(st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1)),
        "type": draw(st.text(text_chars, min_size=1, max_size=256)),
    }
    kind = draw(st.sampled_from(["plain", "config.set", "config.deleted"]))
    if kind == "plain":
        if draw(st.booleans()):
            body["data"] = draw(json_values)
        if draw(st.booleans()):
            body["subject"] = draw(st.text(plain_chars, min_size=1, max_size=200))
        if draw(st.booleans()):
            body["streamid"] = draw(st.text(plain_chars, min_size=1, max_size=200))
    else:
        key = draw(config_keys)
        body["type"] = kind
        body["data"] = {"key": key, "value": draw(json_values)} if kind == "config.set" else {"key": key}
        if draw(st.booleans()):
            body["streamid"] = key
    if draw(st.booleans()):
        body["time"] = draw(moments).isoformat()
    if draw(st.booleans()):
        body["datacontenttype"] = draw(st.sampled_from(["application/json", "text/plain; charset=utf-8"]))
    for name in ("correlationid", "causationid"):
        if draw(st.booleans()):
            body[name] = draw(non_empty)
    if draw(st.booleans()):
        body["tenantid"] = TENANT
    body.update(draw(st.dictionaries(extension_names, extension_values, max_size=4)))
    # Attributes sent as null are unset (CloudEvents JSON format): any unused one may be.
    unset = sorted(NULLABLE - body.keys()) + draw(st.lists(extension_names, max_size=2))
    for name in draw(st.lists(st.sampled_from(unset), max_size=4, unique=True)):
        body.setdefault(name, None)
    return body


#: Optional attributes, and ours, that a producer may send as null to mean "unset".
NULLABLE = {"subject", "time", "datacontenttype", "tenantid", "streamid", "expectedversion"} | {
    "correlationid",
    "causationid",
    "version",
    "recordedat",
    "position",
    "data_base64",
}


def same_json(sent: Any, back: Any) -> bool:
    """JSON equality: numbers by value (jsonb keeps numerics, not int/float), bools by identity."""
    if isinstance(sent, bool) or isinstance(back, bool):
        return type(sent) is type(back) and sent == back
    if isinstance(sent, int | float) and isinstance(back, int | float):
        # The same decimal number: 6.390409146187642e16 is stored as numeric and read back
        # as the integer 63904091461876420, which is that decimal, not the float's binary value.
        return _decimal(sent) == _decimal(back)
    if isinstance(sent, dict) and isinstance(back, dict):
        return sent.keys() == back.keys() and all(same_json(v, back[k]) for k, v in sent.items())
    if isinstance(sent, list) and isinstance(back, list):
        return len(sent) == len(back) and all(same_json(a, b) for a, b in zip(sent, back, strict=True))
    return type(sent) is type(back) and bool(sent == back)


def _decimal(number: float) -> Decimal:
    return Decimal(repr(number)) if isinstance(number, float) else Decimal(number)


def unique(body: dict[str, Any]) -> dict[str, Any]:
    return body | {"id": f"{body['id']}{uuid.uuid4()}"}


def assert_problem(response: httpx.Response, *allowed: int) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if allowed:
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == PROBLEM, response.headers
    problem = response.json()
    assert problem["status"] == response.status_code and problem["type"] and problem["title"]


def post(client: httpx.Client, body: Any, path: str = "/v1/events") -> httpx.Response:
    return client.post(path, json=body)


# --- valid envelopes round-trip -----------------------------------------------------------


@PROPERTY_SETTINGS
@given(body=envelopes())
def test_valid_envelopes_round_trip_exactly(client: httpx.Client, body: dict[str, Any]) -> None:
    sent = unique(body)
    created = post(client, sent)
    assert created.status_code == 201, created.text
    result = created.json()
    stream = sent.get("streamid") or (sent["data"]["key"] if sent["type"].startswith("config.") else None)
    stream = stream or sent.get("subject") or sent["id"]
    assert (result["id"], result["tenant"], result["stream"]) == (sent["id"], TENANT, stream)
    assert result["version"] >= 1

    read = client.get(created.headers["location"])
    assert read.status_code == 200, read.text
    back = read.json()
    added = {"version": result["version"], "recordedat": back["recordedat"], "tenantid": TENANT, "streamid": stream}
    # Null attributes are unset, except ``data``: a null payload comes back as ``"data": null``.
    expected = {k: v for k, v in sent.items() if k != "time" and (v is not None or k == "data")} | added
    actual = {k: v for k, v in back.items() if k != "time"}
    assert same_json(expected, actual), (expected, actual)
    if sent.get("time") is not None:  # an instant: the bus answers it in UTC
        assert datetime.fromisoformat(back["time"]) == datetime.fromisoformat(sent["time"])
    else:
        assert "time" not in back
    # An exact repeat is answered from the stored row, also when it leaves out what was null.
    again = post(client, sent)
    assert again.status_code == 200 and again.json() == result
    spelled_otherwise = {k: v for k, v in sent.items() if v is not None or k == "data"}
    assert post(client, spelled_otherwise).json() == result


@PROPERTY_SETTINGS
@given(bodies=st.lists(envelopes(), min_size=1, max_size=5))
def test_valid_batches_round_trip(client: httpx.Client, bodies: list[dict[str, Any]]) -> None:
    sent = [unique(b) for b in bodies]
    created = client.post("/v1/events:batch", json=sent)
    assert created.status_code == 201, created.text
    results = created.json()["results"]
    assert [r["id"] for r in results] == [b["id"] for b in sent]
    for body in sent:
        back = client.get(f"/v1/events/{_quote(body['id'])}")
        assert back.status_code == 200, back.text
        assert same_json(body.get("data"), back.json().get("data"))


def _quote(event_id: str) -> str:
    from urllib.parse import quote

    return quote(event_id, safe="")


# --- invalid input is a 4xx problem, never a 5xx ----------------------------------------

not_a_string = st.one_of(
    st.integers(MIN_INT, MAX_INT),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
non_string_or_empty = not_a_string | st.just("") | st.dictionaries(texts, json_scalars, max_size=2)


@st.composite
def invalid_envelopes(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid envelope broken in exactly one way the contract calls invalid."""
    body = unique(draw(envelopes()))
    body.pop("tenantid", None)
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "wrong type",
                "specversion",
                "long id",
                "time",
                "expectedversion",
                "extension name",
                "extension value",
                "assigned name",
                "config key",
                "config shape",
                "nul",
                "source",
                "control",
            ]
        )
    )
    if kind == "missing":
        del body[draw(st.sampled_from(["specversion", "id", "source", "type"]))]
    elif kind == "wrong type":
        name = draw(st.sampled_from(["id", "source", "type", "subject", "streamid", "correlationid", "causationid"]))
        body[name] = draw(non_string_or_empty.filter(lambda v: v is not None))
    elif kind == "specversion":
        body["specversion"] = draw(json_values.filter(lambda v: v != "1.0" and v is not None))
    elif kind == "long id":
        body["id"] = draw(st.text(text_chars, min_size=129, max_size=300))
    elif kind == "time":
        body["time"] = draw(
            st.one_of(
                not_a_string,
                st.text(text_chars, min_size=1, max_size=30).filter(lambda t: not _is_aware(t)),
                moments.map(lambda m: m.replace(tzinfo=None).isoformat()),
                st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]),
            )
        )
    elif kind == "expectedversion":
        body["expectedversion"] = draw(
            st.one_of(
                st.integers(MIN_INT, -1),
                st.integers(2**63, MAX_INT),
                st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=5),
                st.booleans(),
            )
        )
    elif kind == "extension name":
        name = draw(st.text(text_chars, min_size=1, max_size=25).filter(lambda n: n not in RESERVED))
        if name == "data_base64" or re.fullmatch(r"[a-z0-9]{1,20}", name):
            name = name + "-X"
        body[name] = "x"
    elif kind == "extension value":
        body[draw(extension_names)] = draw(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.lists(st.integers(), max_size=2),
                st.dictionaries(texts, texts, max_size=2),
            )
        )
    elif kind == "assigned name":
        body[draw(st.sampled_from(["version", "recordedat", "position"]))] = draw(extension_values)
    elif kind == "config key":
        body["type"] = draw(st.sampled_from(["config.set", "config.deleted"]))
        bad_key = draw(
            st.one_of(
                st.text(text_chars, max_size=30).filter(lambda k: ":" not in k),
                st.builds(lambda p: f"nosuchtag:{p}", path_segments),
                st.builds(lambda t, p: f"{t}:{p}", st.sampled_from(TAGS), st.text(text_chars, max_size=20)).filter(
                    lambda k: not _valid_path(k.partition(":")[2])
                ),
                not_a_string,
            )
        )
        body["data"] = {"key": bad_key, "value": 1}
    elif kind == "config shape":
        body["type"] = draw(st.sampled_from(["config.set", "config.deleted"]))
        key = draw(config_keys)
        right = {"key": key, "value": 1} if body["type"] == "config.set" else {"key": key}
        wrong = {"key": key} if body["type"] == "config.set" else {"key": key, "value": 1}
        body["data"] = draw(st.one_of(json_scalars, st.just(wrong), st.just({"value": 1}), st.just(right)))
        if body["data"] == right:  # the right shape, on another stream than its key
            body["streamid"] = draw(non_empty.filter(lambda s: s != key))
    elif kind == "nul":
        where = draw(st.sampled_from(["id", "source", "type", "data", "key", "extension", "correlationid"]))
        nul = draw(texts) + "\x00" + draw(texts)
        if where == "data":
            body["data"] = {"deep": [1, {"x": nul}]}
        elif where == "key":
            body["data"] = {nul: 1}
            body["type"] = "thing.happened"
        elif where == "extension":
            body[draw(extension_names)] = nul
        else:
            body[where] = nul[:128]
    elif kind == "source":
        body["source"] = draw(texts) + draw(st.sampled_from([" ", "\n", "\t", "\u2003"])) + draw(texts)
    elif kind == "control":
        name = draw(st.sampled_from(["id", "subject", "streamid"]))
        char = draw(st.characters(categories=["Cc"], exclude_characters="\x00"))
        body[name] = draw(texts) + char + draw(texts)
    return kind, body


def _is_aware(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def _valid_path(path: str) -> bool:

    return bool(path) and all(re.fullmatch(r"[A-Za-z0-9_.-]+", s) for s in path.split("/"))


@PROPERTY_SETTINGS
@given(case=invalid_envelopes())
def test_invalid_envelopes_are_4xx_problems(client: httpx.Client, case: tuple[str, dict[str, Any]]) -> None:
    kind, body = case
    response = post(client, body)
    assert_problem(response, 422, 413)
    # Nothing was written.
    if isinstance(body.get("id"), str) and "\x00" not in body["id"]:
        assert client.get(f"/v1/events/{_quote(body['id'])}").status_code == 404, kind


@PROPERTY_SETTINGS
@given(body=json_values)
def test_random_json_is_a_4xx_problem(client: httpx.Client, body: Any) -> None:
    assert_problem(post(client, body))
    assert_problem(client.post("/v1/events:batch", json=body))
    assert_problem(client.post("/v1/events:batch", json=[body]))


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_bytes_are_a_4xx_problem(client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/events", "/v1/events:batch"):
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert_problem(response)


@PROPERTY_SETTINGS
@given(event_id=st.text(st.characters(codec="utf-8"), min_size=0, max_size=200), stream=texts, key=texts)
def test_reads_of_unknown_things_are_404(client: httpx.Client, event_id: str, stream: str, key: str) -> None:
    # The prefix keeps them apart from what the other properties stored.
    paths = (f"/v1/events/unknown{_quote(event_id)}", f"/v1/streams/unknown{_quote(stream)}")
    for path in paths:
        assert_problem(client.get(path), 404)
    # 404 for a malformed key; 503 for a well-formed one: this bus has no config read model.
    config = client.get(f"/v1/config/{_quote(key)}")
    assert config.status_code in (404, 503) and config.headers["content-type"] == PROBLEM, config.text


# --- regression tests of defects these properties found ---------------------------------


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_is_4xx_never_5xx(client: httpx.Client) -> None:
    ok = post(client, {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "data": nested(200)})
    assert ok.status_code == 201, ok.text
    # Decodable, but past orjson's encoder limit (254 levels): was a 500.
    deep = post(
        client, {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "data": nested(600)}
    )
    assert_problem(deep, 422)
    # Past orjson's decoder limit (1024 levels): not JSON the bus can read.
    raw = b'{"specversion":"1.0","id":"deep","source":"/t","type":"t","data":' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert_problem(client.post("/v1/events", content=raw, headers={"content-type": "application/json"}), 400)
    batch = b"[" + raw.replace(b'"deep"', b'"deep2"') + b"]"
    assert_problem(client.post("/v1/events:batch", content=batch, headers={"content-type": "application/json"}), 400)
    deep_batch = [{"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "data": nested(600)}]
    assert_problem(client.post("/v1/events:batch", json=deep_batch), 422)


@pytest.mark.parametrize(
    "literal", [b"18446744073709551616", b"-9223372036854775809", b"123456789012345678901234567890", b"9" * 300]
)
def test_integers_beyond_64_bits_are_422_not_rounded(client: httpx.Client, literal: bytes) -> None:
    event_id = str(uuid.uuid4())
    raw = b'{"specversion":"1.0","id":"%s","source":"/t","type":"t","data":{"n":%s}}' % (event_id.encode(), literal)
    response = client.post("/v1/events", content=raw, headers={"content-type": "application/json"})
    assert_problem(response, 422)
    assert client.get(f"/v1/events/{event_id}").status_code == 404


def test_64_bit_extremes_round_trip(client: httpx.Client) -> None:
    event_id = str(uuid.uuid4())
    data = {"min": MIN_INT, "max": MAX_INT, "digits": "12345678901234567890123", "f": 1.5e300, "tiny": 5e-324}
    created = post(client, {"specversion": "1.0", "id": event_id, "source": "/t", "type": "t", "data": data})
    assert created.status_code == 201, created.text
    assert client.get(f"/v1/events/{event_id}").json()["data"] == data


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"text": "a\x00b"}},
        {"data": {"a\x00": 1}},
        {"source": "/a\x00"},
        {"type": "t\x00"},
        {"subject": "s\x00"},
        {"correlationid": "c\x00"},
        {"ext": "e\x00"},
        {"id": "id\x00"},
    ],
)
def test_nul_characters_are_422_not_500(client: httpx.Client, body: dict[str, Any]) -> None:
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t"} | body
    assert_problem(post(client, sent), 422)
    assert_problem(client.post("/v1/events:batch", json=[sent]), 422)
    # The escaped backslash followed by "u0000" is no NUL: it is stored like any text.
    fine = sent | {"id": str(uuid.uuid4()), "data": {"text": "\\u0000"}}
    fine = {k: v for k, v in fine.items() if not (isinstance(v, str) and "\x00" in v)}
    fine = {k: v for k, v in fine.items() if k != "ext"} | {"source": "/t", "type": "t", "id": str(uuid.uuid4())}
    assert post(client, fine).status_code == 201


def test_nul_in_read_paths_is_404_not_500(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/events/a%00b"), 404)
    assert_problem(client.get("/v1/streams/a%00b"), 404)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"specversion":"1.0","id":"x","source":"/t","type":"\\ud800"}',  # lone surrogate escape
        b'{"specversion":"1.0","id":"x","source":"/t","type":"\xff\xfe"}',  # invalid UTF-8
        b'{"specversion":"1.0","id":"x","source":"/t","type":"\xed\xa0\x80"}',  # UTF-8 encoded surrogate
        b'{"specversion":"1.0","id":"x","source":"/t","type":"t","data":NaN}',
        b'{"specversion":"1.0","id":"x","source":"/t","type":"t","data":1e400}',
        b"",
    ],
)
def test_undecodable_bodies_are_400(client: httpx.Client, raw: bytes) -> None:
    assert_problem(client.post("/v1/events", content=raw, headers={"content-type": "application/json"}), 400)


def test_non_ascii_and_slashed_ids_are_readable_at_their_location(client: httpx.Client) -> None:
    for event_id in (f"日本/{uuid.uuid4()}", f"a b?c#d%2F/{uuid.uuid4()}", f"ümlaut {uuid.uuid4()}"):
        created = post(client, {"specversion": "1.0", "id": event_id, "source": "/t", "type": "t"})
        # A non-Latin-1 id in the Location header was a 500.
        assert created.status_code == 201, created.text
        back = client.get(created.headers["location"])
        assert back.status_code == 200 and back.json()["id"] == event_id


@pytest.mark.parametrize("field", ["id", "subject", "streamid"])
@pytest.mark.parametrize("char", ["\n", "\r", "\x1f", "\x85"])
def test_control_characters_in_addressed_names_are_422(client: httpx.Client, field: str, char: str) -> None:
    # An id with a newline was stored but could never be read: the route cannot match it.
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t"}
    sent[field] = f"a{char}{uuid.uuid4()}"
    response = post(client, sent)
    assert_problem(response, 422)
    assert response.json()["errors"][0]["field"] == f"/{field}"


def test_unrouted_paths_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert_problem(client.put("/v1/events"), 405)
    # Was a 307 slash redirect (the route's ``$`` matches before a trailing newline).
    assert_problem(client.get("/v1/streams/a%0A/"), 404)
    assert_problem(client.get("/v1/events:batch/"), 404)


def test_time_beyond_the_python_range_in_utc_is_422(client: httpx.Client) -> None:
    for moment in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "time": moment}
        # Was stored, and then every read of it (and the tailer) failed.
        assert_problem(post(client, sent), 422)


def test_extensions_cannot_forge_bus_attributes(client: httpx.Client) -> None:
    for name in ("version", "recordedat", "position"):
        sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", name: 999}
        response = post(client, sent)
        assert_problem(response, 422)
        assert response.json()["errors"][0]["field"] == f"/{name}"


def test_trailing_newlines_do_not_pass_the_patterns(client: httpx.Client) -> None:
    base = {"specversion": "1.0", "source": "/t", "type": "t"}
    cases = [
        base | {"id": str(uuid.uuid4()), "source": "/t\n"},
        base | {"id": str(uuid.uuid4()), "ext\n": "x"},
        base | {"id": str(uuid.uuid4()), "type": "config.set", "data": {"key": "tenantconfig:a\n", "value": 1}},
    ]
    for sent in cases:
        assert_problem(post(client, sent), 422)


def test_null_attributes_are_unset_not_invalid(client: httpx.Client) -> None:
    # Extensions sent as null were a 422, and a repeat without the null attributes a 409.
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "subject": None}
    sent |= {"myext": None, "version": None, "data_base64": None, "Bad-Name": None, "tenantid": None}
    created = post(client, sent)
    assert created.status_code == 201, created.text
    assert post(client, {k: v for k, v in sent.items() if v is not None}).status_code == 200
    back = client.get(created.headers["location"]).json()
    assert not {"myext", "version", "data_base64", "Bad-Name", "subject"} & {k for k, v in back.items() if v is None}
    assert "myext" not in back and back["version"] == 1


def test_null_data_is_not_absent_data(client: httpx.Client) -> None:
    # CloudEvents JSON format 3.1.1: a null payload is distinct from no payload.
    event_id = str(uuid.uuid4())
    assert (
        post(client, {"specversion": "1.0", "id": event_id, "source": "/t", "type": "t", "data": None}).status_code
        == 201
    )
    without = post(client, {"specversion": "1.0", "id": event_id, "source": "/t", "type": "t"})
    assert_problem(without, 409)


def test_null_data_round_trips(client: httpx.Client) -> None:
    event_id = str(uuid.uuid4())
    created = post(client, {"specversion": "1.0", "id": event_id, "source": "/t", "type": "t", "data": None})
    back = client.get(created.headers["location"]).json()
    assert "data" in back and back["data"] is None
    absent = post(client, {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t"})
    assert "data" not in client.get(absent.headers["location"]).json()
    # Both in one group-committed batch too (the set-based insert).
    batch = [
        {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t", "data": None},
        {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "t"},
    ]
    response = client.post(
        "/v1/events:batch", content=orjson.dumps(batch), headers={"Content-Type": "application/cloudevents-batch+json"}
    )
    assert response.status_code == 201, response.text
    first, second = (client.get(f"/v1/events/{e['id']}").json() for e in batch)
    assert "data" in first and first["data"] is None
    assert "data" not in second


def test_config_keys_longer_than_a_stream_are_422(client: httpx.Client) -> None:
    # Was stored, and then refused by DynamoDB (sort keys ≤ 1,024 bytes) on every projection.
    key = "tenantconfig:" + "a" * 600
    sent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "config.set"}
    response = post(client, sent | {"data": {"key": key, "value": 1}})
    assert_problem(response, 422)
    assert response.json()["errors"][0]["field"] == "/data/key"
