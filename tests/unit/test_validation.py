"""The body decoder's edge rules, without HTTP: integers orjson holds exactly (-2**63 … 2**64 - 1),
and U+0000."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from event_bus.problems import Problem
from event_bus.validation import MAX_INT, MIN_INT, decode_json, parse_event
from kernel.auth import Principal


@given(st.integers(MIN_INT, MAX_INT))
def test_every_integer_in_range_is_kept_exactly(number: int) -> None:
    assert decode_json(b'{"data": {"n": %d}}' % number) == {"data": {"n": number}}


@given(st.one_of(st.integers(max_value=MIN_INT - 1), st.integers(min_value=MAX_INT + 1)))
def test_integers_outside_64_bits_are_refused_not_rounded(number: int) -> None:
    with pytest.raises(Problem) as refused:
        decode_json(b'[{"data": [1, %d]}]' % number)
    assert refused.value.status == 422
    assert "64-bit range" in refused.value.errors[0].message


def test_long_digit_runs_inside_strings_and_floats_are_not_integers() -> None:
    body = {"id": "1" * 40, "data": {"f": 12345678901234567890.5}}
    assert decode_json(orjson.dumps(body)) == body


def test_nul_in_a_string_is_refused_with_its_pointer() -> None:
    with pytest.raises(Problem) as refused:
        decode_json(b'{"data": {"a/b": "x\\u0000y"}}')
    assert refused.value.status == 422
    assert refused.value.errors[0].field == "/data/a~1b"


@pytest.mark.parametrize(
    ("offset", "accepted"), [("-15:59", True), ("+15:59", True), ("+16:00", False), ("-20:57", False)]
)
def test_time_offsets_postgresql_cannot_store_are_refused(offset: str, accepted: bool) -> None:
    principal = Principal(subject="s", tenant="acme", tier="basic", scopes=frozenset({"events:write"}))
    body = {"specversion": "1.0", "id": "e1", "source": "/t", "type": "t", "time": f"2026-01-01T00:00:00{offset}"}
    if accepted:
        assert parse_event(body, principal, tags={"tenantconfig"}, max_event_bytes=10_000).time is not None
        return
    with pytest.raises(Problem) as refused:
        parse_event(body, principal, tags={"tenantconfig"}, max_event_bytes=10_000)
    assert refused.value.status == 422 and refused.value.errors[0].field.endswith("time")
