"""What ``tagbus config watch`` prints: the ready line first, then changes with their delay."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

from config_client import ChangeEvent, State
from tagbus.watching import Arrival, WatchPrinter

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def arrival(key: str, *, version: int, position: int, snapshot: bool, delay_ms: float = 80.0) -> Arrival:
    change = ChangeEvent(
        key=key,
        tenant="acme",
        value={"on": True},
        version=version,
        position=position,
        deleted=False,
        updated_at=T0,
    )
    return Arrival(change, snapshot, T0 + timedelta(milliseconds=delay_ms), 0.0)


def test_live_changes_carry_their_delay_and_snapshot_entries_none() -> None:
    assert arrival("tenantconfig:a", version=2, position=10, snapshot=False, delay_ms=80).delay_ms == 80.0
    assert arrival("tenantconfig:a", version=2, position=10, snapshot=True).delay_ms is None


def test_ready_comes_first_and_the_starting_state_only_with_since() -> None:
    out = io.StringIO()
    printer = WatchPrinter(out, tenant="acme", as_json=True, since=5)
    printer.arrived(arrival("tenantconfig:old", version=1, position=5, snapshot=True))  # not after since
    printer.arrived(arrival("tenantconfig:newer", version=3, position=9, snapshot=True))
    assert out.getvalue() == ""  # held until the ready line
    printer.ready(["tenantconfig:"], keys=2, position=9)
    printer.arrived(arrival("tenantconfig:live", version=1, position=12, snapshot=False, delay_ms=42.5))
    printer.state(State.READY, position=12, error=None)  # unchanged: nothing printed
    printer.state(State.STALE, position=12, error=ConnectionError("gone"))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["ready", "set", "set", "stale"]
    assert lines[0] == {"event": "ready", "tenant": "acme", "prefixes": ["tenantconfig:"], "keys": 2, "position": 9}
    assert (lines[1]["key"], lines[1]["snapshot"], lines[1]["delay_ms"]) == ("tenantconfig:newer", True, None)
    assert (lines[2]["key"], lines[2]["position"], lines[2]["delay_ms"]) == ("tenantconfig:live", 12, 42.5)
    assert lines[3]["error"] == "gone"


def test_without_since_the_starting_state_is_not_printed() -> None:
    out = io.StringIO()
    printer = WatchPrinter(out, tenant="acme", as_json=False, since=None)
    printer.ready([""], keys=1, position=9)
    printer.arrived(arrival("tenantconfig:old", version=1, position=5, snapshot=True))
    printer.arrived(arrival("tenantconfig:live", version=4, position=11, snapshot=False, delay_ms=1500))
    lines = out.getvalue().splitlines()
    assert lines[0] == "watching acme (every key): 1 keys at position 9; Ctrl-C stops"
    assert len(lines) == 2
    assert lines[1].endswith('tenantconfig:live = {"on":true}  v4  @11  +1,500 ms')
