"""The stream generation's bookkeeping: the rotation policy and the counts kept across tailer restarts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagbus.generations import Generation, RotationPolicy

RECORDS_VAR = "TAGBUS_KINESIS_ROTATE_RECORDS"
BYTES_VAR = "TAGBUS_KINESIS_ROTATE_BYTES"

# -- RotationPolicy -------------------------------------------------------------------------


def test_policy_from_env_reads_both_bounds() -> None:
    policy = RotationPolicy.from_env({RECORDS_VAR: "1200", BYTES_VAR: "4096"})
    assert policy == RotationPolicy(max_records=1200, max_bytes=4096)


def test_policy_from_env_keeps_the_defaults_for_unset_or_empty_variables() -> None:
    assert RotationPolicy.from_env({}) == RotationPolicy()
    assert RotationPolicy.from_env({RECORDS_VAR: "", BYTES_VAR: "7"}) == RotationPolicy(
        max_records=RotationPolicy().max_records, max_bytes=7
    )


def test_policy_zero_turns_a_bound_off() -> None:
    records_only = RotationPolicy.from_env({BYTES_VAR: "0", RECORDS_VAR: "10"})
    assert records_only.max_bytes == 0
    assert not records_only.due(Generation(records=9, bytes=10**12))
    assert records_only.due(Generation(records=10, bytes=0))

    nothing = RotationPolicy.from_env({BYTES_VAR: "0", RECORDS_VAR: "0"})
    assert not nothing.due(Generation(records=10**12, bytes=10**12))


@pytest.mark.parametrize("var", [RECORDS_VAR, BYTES_VAR])
@pytest.mark.parametrize("raw", ["ten", "-5", "1.5", "1e6", " 12", "12 ", "0x10", "²"])
def test_policy_from_env_refuses_what_is_not_a_whole_number_and_names_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ValueError, match=var):
        RotationPolicy.from_env({var: raw})


@given(
    max_records=st.integers(0, 1000),
    max_bytes=st.integers(0, 1000),
    records=st.integers(0, 2000),
    size=st.integers(0, 2000),
)
def test_policy_is_due_past_either_bound_that_is_on(max_records: int, max_bytes: int, records: int, size: int) -> None:
    policy = RotationPolicy(max_records=max_records, max_bytes=max_bytes)
    expected = (max_records > 0 and records >= max_records) or (max_bytes > 0 and size >= max_bytes)
    assert policy.due(Generation(records=records, bytes=size)) is expected


# -- Generation.counted --------------------------------------------------------------------


def test_counted_adds_what_the_counters_gained() -> None:
    generation = Generation(records=100, bytes=5000, seen_records=10.0, seen_bytes=400.0)
    counted = generation.counted(25.0, 1000.0)
    assert (counted.records, counted.bytes) == (115, 5600)
    assert (counted.seen_records, counted.seen_bytes) == (25.0, 1000.0)
    assert counted.counted(25.0, 1000.0) == counted  # nothing new, nothing added


def test_counted_takes_a_counter_that_went_back_as_a_restarted_tailer() -> None:
    generation = Generation(records=100, bytes=5000, seen_records=40.0, seen_bytes=4000.0)
    counted = generation.counted(3.0, 300.0)
    assert (counted.records, counted.bytes) == (103, 5300)
    assert (counted.seen_records, counted.seen_bytes) == (3.0, 300.0)


def test_counted_restarts_both_counters_when_either_went_back() -> None:
    # The restarted tailer has sent fewer records than before, but larger ones: its bytes
    # counter is already past the old reading; it counts from zero all the same.
    generation = Generation(records=0, bytes=0, seen_records=40.0, seen_bytes=4000.0)
    counted = generation.counted(3.0, 6000.0)
    assert (counted.records, counted.bytes) == (3, 6000)


def test_counted_keeps_since() -> None:
    since = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert Generation(since=since).counted(1.0, 1.0).since == since


@st.composite
def tailer_runs(draw: st.DrawFn) -> list[list[int]]:
    """The counter readings of successive tailer processes: each run starts from zero and only
    grows, and a restart shows as a reading below the previous one (a run that had counted
    nothing when it ended cannot be told apart from its successor, so every run but the last
    counted something)."""
    runs: list[list[int]] = []
    for _ in range(draw(st.integers(1, 6))):
        floor = 0
        if runs:
            floor = draw(st.integers(0, runs[-1][-1] - 1))  # below where the last run ended
        steps = draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=8))
        readings = [floor + sum(steps[: i + 1]) - steps[0] for i in range(len(steps))]
        if readings[-1] == 0:
            readings.append(draw(st.integers(1, 10_000)))
        runs.append(readings)
    return runs


@given(records=tailer_runs(), bytes_per_record=st.integers(1, 1000))
def test_counted_total_is_the_sum_of_what_each_tailer_run_counted(
    records: list[list[int]], bytes_per_record: int
) -> None:
    generation = Generation()
    for run in records:
        for reading in run:
            generation = generation.counted(float(reading), float(reading * bytes_per_record))
    # Every run counts from zero, so each adds its last reading.
    expected = sum(run[-1] for run in records)
    assert generation.records == expected
    assert generation.bytes == expected * bytes_per_record


# -- save / load ---------------------------------------------------------------------------


@given(
    since=st.none() | st.datetimes(timezones=st.just(UTC)),
    records=st.integers(0, 2**53),
    size=st.integers(0, 2**53),
    seen_records=st.integers(0, 2**40).map(float),
    seen_bytes=st.integers(0, 2**40).map(float),
)
def test_save_then_load_gives_the_same_generation(
    tmp_path_factory: pytest.TempPathFactory,
    since: datetime | None,
    records: int,
    size: int,
    seen_records: float,
    seen_bytes: float,
) -> None:
    path = tmp_path_factory.mktemp("generation") / "generation.json"
    generation = Generation(since=since, records=records, bytes=size, seen_records=seen_records, seen_bytes=seen_bytes)
    generation.save(path)
    assert Generation.load(path) == generation
    assert [p.name for p in path.parent.iterdir()] == ["generation.json"]  # no temporary left


def test_save_replaces_the_previous_generation(tmp_path: Path) -> None:
    path = tmp_path / "generation.json"
    Generation(records=5).save(path)
    Generation(records=7, since=datetime(2024, 5, 1, tzinfo=UTC)).save(path)
    assert Generation.load(path) == Generation(records=7, since=datetime(2024, 5, 1, tzinfo=UTC))


def test_load_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert Generation.load(tmp_path / "generation.json") is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"records": 12, "byt',
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b"null",
        b'{"records": "many"}',
        b'{"since": "yesterday"}',
        b'{"seen_bytes": [1]}',
    ],
)
def test_load_of_a_corrupt_file_is_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "generation.json"
    path.write_bytes(content)
    assert Generation.load(path) is None
