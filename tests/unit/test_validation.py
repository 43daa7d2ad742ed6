"""The body decoder's edge rules, without HTTP: integers orjson holds exactly (-2**63 … 2**64 - 1),
and U+0000."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from event_bus.problems import Problem
from event_bus.validation import MAX_INT, MIN_INT, decode_json


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
