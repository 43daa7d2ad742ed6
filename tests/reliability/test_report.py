"""The report renders what was measured, and the ledger reads aggregated Kinesis records (no stack needed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.reliability.faults import FaultResult
from tests.reliability.ledger import _user_records
from tests.reliability.overload import Shot, recovered_after
from tests.reliability.report import HOSTILE_JSON, MARKDOWN, PLOT, DeliveryResult, Results, write_report


def _fault(kind: str, lost: int = 0) -> FaultResult:
    return FaultResult(kind, "how", 3, 500, 2, lost, 0, 0, 7, 4.25, lost == 0)


def _overload() -> dict[str, object]:
    phase = {
        "seconds": 10.0,
        "sent": 100,
        "achieved_rate": 10.0,
        "acked_rate": 9.0,
        "statuses": {"2xx": 90, "503": 10},
        "retry_after": 10,
        "p50_ms": 4.0,
        "p99_ms": 40.0,
    }
    return {
        "capacity": {"events_per_second": 1234.0, "clients": 16, "seconds": 5, "p50_ms": 5.0, "p99_ms": 50.0},
        "soak": phase | {"target_rate": 987.0, "memory": {"bus": {"start": 2**20, "end": 2**20, "growth_percent": 0}}},
        "overload": phase,
        "recovery": phase,
        "series": [{"t": float(t), "p50_ms": 4.0, "p99_ms": 9.0, "slot_lag_bytes": 1024.0 * t} for t in range(5)],
        "phases": [{"t": 0.0, "label": "soak"}],
        "notes": [],
    }


def test_report_has_every_fault_the_hostile_counts_and_a_plot(tmp_path: Path) -> None:
    (tmp_path / HOSTILE_JSON).write_text(
        json.dumps({"kinds": {"jwt": {"tried": 12, "server_errors": 0, "cross_tenant_reads": 0}}})
    )
    results = Results(mode="short", faults=[_fault("kill -9 bus"), _fault("moto stopped 5s", lost=1)])
    results.overload = _overload()
    text = write_report(results, tmp_path).read_text()
    assert "| kill -9 bus | 3 | 500 | 2 | 0 | 0 | 7 | 4.2 |" in text
    assert "| moto stopped 5s | 3 | 500 | 2 | 1 |" in text
    assert "1 lost" in text
    assert "| jwt | 12 | 0 | 0 |" in text
    assert "1234 events/s" in text
    assert (tmp_path / PLOT).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / MARKDOWN).is_file()


def test_report_says_when_the_hostile_suite_did_not_run(tmp_path: Path) -> None:
    text = write_report(Results(mode="short", faults=[_fault("kill -9 tailer")]), tmp_path).read_text()
    assert "not present" in text
    assert not (tmp_path / PLOT).exists()


def test_aggregated_records_are_unpacked_in_order() -> None:
    import aws_kinesis_agg.aggregator  # type: ignore[import-untyped]

    record = aws_kinesis_agg.aggregator.AggRecord()
    for i in range(3):
        record.add_user_record(f"pk{i}", f'{{"n":{i}}}'.encode())
    _, _, data = record.get_contents()
    plain = b'{"n":9}'
    assert list(_user_records([{"Data": data}, {"Data": plain}])) == [b'{"n":0}', b'{"n":1}', b'{"n":2}', plain]


def test_recovery_is_the_first_second_from_which_every_second_is_served() -> None:
    def second(at: float, ok: int, shed: int) -> list[Shot]:
        return [Shot(at, 0.01, 201, False)] * ok + [Shot(at, 0.001, 503, True)] * shed

    shots = second(100.0, 5, 5) + second(101.2, 90, 10) + second(102.5, 100, 0) + second(103.1, 100, 0)
    assert recovered_after(shots) == 2.0
    # A relapse later on moves it: served again only from the last bad second on.
    assert recovered_after(shots + second(104.0, 50, 50) + second(105.0, 100, 0)) == 5.0
    assert recovered_after(second(100.0, 1, 1)) is None
    assert recovered_after([]) is None


def test_report_of_a_run_with_failures_says_so(tmp_path: Path) -> None:
    results = Results(mode="full", failed=["`test_kinesis_throttling_under_load` (call): probe not through"])
    text = write_report(results, tmp_path).read_text()
    assert "**1 test(s) of this run failed**" in text
    assert "- `test_kinesis_throttling_under_load` (call): probe not through" in text
    assert "of this run failed" not in write_report(Results(mode="full"), tmp_path / "clean").read_text()


def test_report_has_the_config_delivery_rows(tmp_path: Path) -> None:
    row = DeliveryResult("kill -9 config server", "kill -9, then tagbus up", 16, 900, 0, 0, 13.84, "READY again", True)
    text = write_report(Results(mode="short", config=[row]), tmp_path).read_text()
    assert "## Config delivery" in text
    assert "| kill -9 config server | 16 | 900 | 0 | 0 | 13.8 | READY again | kill -9, then tagbus up |" in text
    assert json.loads((tmp_path / "reliability-results.json").read_text())["config"][0]["watchers"] == 16
    assert "## Config delivery" not in write_report(Results(mode="short"), tmp_path / "none").read_text()
