"""The config server's state: version-ordered apply, the resume rule, bounded watchers, tenants."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config_server.state import (
    ConfigState,
    Entry,
    HistoryTooShort,
    LoopSink,
    ResumeOpening,
    SnapshotOpening,
    Watcher,
)
from projections.model import ConfigChange, ConfigKey

AT = datetime(2024, 1, 1, tzinfo=UTC)


def change(
    key: str, version: int, position: int, value: object = None, *, tenant: str = "acme", deleted: bool = False
) -> ConfigChange:
    return ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse(key),
        value=None if deleted else (value if value is not None else f"v{version}"),
        version=version,
        position=position,
        updated_at=AT,
        deleted=deleted,
    )


def ready_state(*, history_size: int = 100) -> ConfigState:
    state = ConfigState(history_size=history_size)
    state.caught_up(0)
    return state


def drain(watcher: Watcher) -> list[Entry]:
    out = []
    while len(watcher):
        out.append(watcher.pop())
    return out


def positions(entries: list[Entry]) -> list[int]:
    return [e.position for e in entries]


# -- apply -------------------------------------------------------------------------------


def test_a_change_applies_only_above_the_keys_version() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 2, 20, "two")])
    state.apply([change("tenantconfig:a", 1, 10, "one"), change("tenantconfig:a", 2, 20, "again")])

    entry = state.get("acme", "tenantconfig:a")
    assert entry is not None
    assert (entry.value_json, entry.version, entry.position) == ('"two"', 2, 20)
    assert state.stats.applied == 1
    assert state.stats.stale == 2
    assert state.history_length == 1


def test_a_delete_leaves_a_tombstone_that_refuses_older_sets() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 1, 10), change("tenantconfig:a", 2, 11, deleted=True)])
    state.apply([change("tenantconfig:a", 1, 10)])

    assert state.get("acme", "tenantconfig:a") is None
    tombstone = state.entry("acme", "tenantconfig:a")
    assert tombstone is not None and tombstone.deleted and tombstone.version == 2
    assert state.page("acme", "", limit=10) == ([], None)


def test_a_snapshot_overlapping_the_stream_changes_nothing_it_already_has() -> None:
    state = ConfigState(history_size=100)
    state.apply([change("tenantconfig:a", 3, 30, "stream")])
    state.load([change("tenantconfig:a", 2, 20, "snapshot"), change("tenantconfig:b", 1, 25, "b")])
    state.caught_up(0)

    a = state.get("acme", "tenantconfig:a")
    b = state.get("acme", "tenantconfig:b")
    assert a is not None and a.value_json == '"stream"'
    assert b is not None and b.version == 1
    assert state.position == 30


def test_a_value_json_cannot_hold_is_skipped_like_the_read_models_do() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 1, 10, 2**70), change("tenantconfig:b", 1, 11, 5)])

    assert state.get("acme", "tenantconfig:a") is None
    assert state.get("acme", "tenantconfig:b") is not None
    assert state.stats.rejected == 1


def test_position_is_the_highest_applied_even_out_of_order() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 1, 50), change("tenantconfig:b", 1, 40)])
    assert state.position == 50


# -- the resume rule ---------------------------------------------------------------------


def test_resume_sends_the_suffix_after_since() -> None:
    state = ready_state()
    state.apply([change(f"tenantconfig:k{i}", 1, 10 * i) for i in range(1, 6)])

    opening = state.open("acme", [""], since=30, bound=100)

    assert isinstance(opening, ResumeOpening)
    # From the entry that brought the state to 30 (sent again, harmless), then the rest.
    assert positions(opening.backlog) == [30, 40, 50]
    assert opening.position == 50


def test_resume_includes_late_changes_released_after_a_higher_position() -> None:
    state = ready_state()
    # Shard B's change at 25 is released after shard A's at 30 and 40.
    state.apply([change("tenantconfig:a", 1, 10), change("tenantconfig:b", 1, 30), change("tenantconfig:c", 1, 40)])
    state.apply([change("tenantconfig:d", 1, 25), change("tenantconfig:e", 1, 50)])

    # A watcher that last saw 40 may not have seen 25, released after it.
    opening = state.open("acme", [""], since=40, bound=100)
    assert isinstance(opening, ResumeOpening)
    assert positions(opening.backlog) == [40, 25, 50]

    # One that saw 50 had everything.
    later = state.open("acme", [""], since=50, bound=100)
    assert isinstance(later, ResumeOpening)
    assert positions(later.backlog) == [50]


def test_resume_filters_the_suffix_by_tenant_and_prefix() -> None:
    state = ready_state()
    state.apply(
        [
            change("tenantconfig:features/a", 1, 10),
            change("tenantconfig:limits/a", 1, 11),
            change("tenantconfig:features/b", 1, 12, tenant="globex"),
            change("paramconfig:features/c", 1, 13),
            change("tenantconfig:features/d", 1, 14),
        ]
    )
    opening = state.open("acme", ["tenantconfig:features/"], since=10, bound=100)
    assert isinstance(opening, ResumeOpening)
    assert [e.key for e in opening.backlog] == ["tenantconfig:features/a", "tenantconfig:features/d"]


def test_resume_from_a_trimmed_position_is_a_resync_naming_the_oldest() -> None:
    state = ready_state(history_size=3)
    state.apply([change(f"tenantconfig:k{i}", 1, i) for i in range(1, 8)])

    # Entries 1..4 were trimmed: a watcher at 4 might lack something released after 4.
    assert state.history_length == 3
    assert state.oldest_position == 5
    too_old = state.open("acme", [""], since=4, bound=10)
    assert too_old == HistoryTooShort(5)
    assert state.watcher_count() == 0

    opening = state.open("acme", [""], since=5, bound=10)
    assert isinstance(opening, ResumeOpening)
    assert positions(opening.backlog) == [5, 6, 7]


def test_history_stays_bounded_and_answers_after_compaction() -> None:
    state = ready_state(history_size=10)
    state.apply([change(f"tenantconfig:k{i}", 1, i) for i in range(1, 100)])

    assert state.history_length == 10
    assert state.oldest_position == 90
    opening = state.open("acme", [""], since=95, bound=10)
    assert isinstance(opening, ResumeOpening)
    assert positions(opening.backlog) == [95, 96, 97, 98, 99]


def test_a_loaded_snapshot_is_not_history_until_ready() -> None:
    state = ConfigState(history_size=100)
    state.load([change("tenantconfig:a", 1, 100), change("tenantconfig:b", 1, 90)])
    state.apply([change("tenantconfig:c", 1, 110)])
    state.caught_up(0)

    assert state.oldest_position == 100
    assert isinstance(state.open("acme", [""], since=99, bound=10), HistoryTooShort)
    opening = state.open("acme", [""], since=100, bound=10)
    assert isinstance(opening, ResumeOpening)
    assert positions(opening.backlog) == [110]


def test_a_snapshot_loaded_after_ready_reaches_watchers_as_changes() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 1, 10)])
    opening = state.open("acme", [""], since=None, bound=10)
    assert isinstance(opening, SnapshotOpening)

    # The source started over: its snapshot brings a change the stream never did.
    state.load([change("tenantconfig:a", 1, 10), change("tenantconfig:a", 3, 30, deleted=True)])

    assert [(e.key, e.version, e.deleted) for e in drain(opening.watcher)] == [("tenantconfig:a", 3, True)]


def test_resume_from_a_position_not_reached_yet_waits_for_it() -> None:
    state = ready_state()
    state.apply([change("tenantconfig:a", 1, 10)])

    opening = state.open("acme", [""], since=30, bound=10)
    assert isinstance(opening, ResumeOpening)
    assert opening.backlog == [] and opening.position == 30
    state.apply([change("tenantconfig:b", 1, 20)])
    assert drain(opening.watcher) == []
    state.apply([change("tenantconfig:c", 1, 30), change("tenantconfig:d", 1, 25)])
    assert positions(drain(opening.watcher)) == [30, 25]


# -- watchers ----------------------------------------------------------------------------


def test_a_snapshot_is_the_live_entries_under_the_prefixes_in_key_order() -> None:
    state = ready_state()
    state.apply(
        [
            change("tenantconfig:z", 1, 1),
            change("paramconfig:a", 1, 2),
            change("tenantconfig:b", 1, 3),
            change("tenantconfig:b/x", 1, 4, deleted=True),
            change("tenantconfig:c", 1, 5, tenant="globex"),
        ]
    )
    opening = state.open("acme", ["tenantconfig:", "paramconfig:a", "tenantconfig:b"], since=None, bound=10)

    assert isinstance(opening, SnapshotOpening)
    assert [e.key for e in opening.entries] == ["paramconfig:a", "tenantconfig:b", "tenantconfig:z"]
    assert opening.position == 5


def test_changes_reach_only_watchers_of_their_tenant_and_prefix() -> None:
    state = ready_state()
    features = state.open("acme", ["tenantconfig:features/"], since=None, bound=10)
    everything = state.open("acme", [""], since=None, bound=10)
    other = state.open("globex", [""], since=None, bound=10)
    replica = state.open(None, ["tenantconfig:"], since=None, bound=10)
    assert not isinstance(features, HistoryTooShort)
    assert not isinstance(everything, HistoryTooShort)
    assert not isinstance(other, HistoryTooShort)
    assert not isinstance(replica, HistoryTooShort)

    state.apply(
        [
            change("tenantconfig:features/a", 1, 1),
            change("tenantconfig:limits/a", 1, 2),
            change("tenantconfig:features/a", 1, 3, tenant="globex"),
        ]
    )

    assert positions(drain(features.watcher)) == [1]
    assert positions(drain(everything.watcher)) == [1, 2]
    assert [(e.tenant, e.position) for e in drain(other.watcher)] == [("globex", 3)]
    assert [(e.tenant, e.position) for e in drain(replica.watcher)] == [("acme", 1), ("acme", 2), ("globex", 3)]


def test_a_watcher_whose_queue_fills_is_cut_and_the_others_are_not() -> None:
    state = ready_state()
    slow = state.open("acme", [""], since=None, bound=3)
    fast = state.open("acme", [""], since=None, bound=3)
    assert not isinstance(slow, HistoryTooShort)
    assert not isinstance(fast, HistoryTooShort)
    cut_calls: list[Watcher] = []
    slow.watcher.on_cut = lambda: cut_calls.append(slow.watcher)

    for i in range(1, 6):
        state.apply([change(f"tenantconfig:k{i}", 1, i)])
        drain(fast.watcher)

    assert slow.watcher.cut and cut_calls == [slow.watcher]
    assert len(slow.watcher) == 0  # what waited is dropped: the memory is bounded
    assert not fast.watcher.cut
    assert state.watcher_count() == 1
    assert state.stats.cuts == 1
    state.apply([change("tenantconfig:k9", 1, 9)])
    assert len(slow.watcher) == 0


def test_closed_watchers_are_not_fed() -> None:
    state = ready_state()
    opening = state.open("acme", [""], since=None, bound=3)
    assert not isinstance(opening, HistoryTooShort)
    state.close(opening.watcher)
    state.close(opening.watcher)
    state.apply([change("tenantconfig:a", 1, 1)])
    assert len(opening.watcher) == 0
    assert state.watcher_count() == 0


def test_close_all_asks_every_watcher_to_end() -> None:
    state = ready_state()
    a = state.open("acme", [""], since=None, bound=3)
    b = state.open(None, [""], since=None, bound=3)
    state.close_all()
    assert not isinstance(a, HistoryTooShort) and a.watcher.closed
    assert not isinstance(b, HistoryTooShort) and b.watcher.closed


def test_a_waiting_watcher_wakes_on_a_change() -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        state = ready_state()
        opening = state.open("acme", [""], since=None, bound=3)
        assert not isinstance(opening, HistoryTooShort)
        loop.call_soon(state.apply, [change("tenantconfig:a", 1, 7)])
        await asyncio.wait_for(opening.watcher.wait(loop, loop.time() + 60), 10)
        return positions(drain(opening.watcher))

    assert asyncio.run(scenario()) == [7]


# -- reads -------------------------------------------------------------------------------


def test_pages_go_by_tag_then_path_and_skip_tombstones() -> None:
    state = ready_state()
    state.apply(
        [
            change("tenantconfig:b", 1, 1),
            change("tenantconfig:a", 1, 2),
            change("tenantconfig:a/x", 1, 3, deleted=True),
            change("paramconfig:z", 1, 4),
            change("tenantconfig:c", 1, 5),
            change("tenantconfig:d", 1, 6, tenant="globex"),
        ]
    )

    first, token = state.page("acme", "", limit=2)
    assert [e.key for e in first] == ["paramconfig:z", "tenantconfig:a"]
    assert token == "tenantconfig:a"
    second, token = state.page("acme", "", limit=2, start_after=token)
    assert [e.key for e in second] == ["tenantconfig:b", "tenantconfig:c"]
    assert token is None
    assert [e.key for e in state.page("acme", "tenant", limit=10)[0]] == [
        "tenantconfig:a",
        "tenantconfig:b",
        "tenantconfig:c",
    ]
    assert [e.key for e in state.page("acme", "tenantconfig:a", limit=10)[0]] == ["tenantconfig:a"]
    assert state.page("acme", "para", limit=10, start_after="tenantconfig:a") == ([], None)
    assert state.page("nobody", "", limit=10) == ([], None)


# -- the sink ----------------------------------------------------------------------------


def test_the_sink_applies_a_threads_calls_on_the_loop_in_order() -> None:
    async def scenario() -> tuple[int, bool, list[int]]:
        loop = asyncio.get_running_loop()
        state = ConfigState(history_size=1_000)
        sink = LoopSink(state, loop, max_pending=2)
        ready = asyncio.Event()
        state.on_ready(ready.set)

        def source() -> None:
            sink.load([change("tenantconfig:a", 1, 5)])
            for i in range(1, 50):
                sink.apply([change("tenantconfig:a", i + 1, 5 + i)])
            sink.caught_up(lag_ms=3)

        thread = threading.Thread(target=source)
        thread.start()
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.to_thread(thread.join, 10)
        entry = state.get("acme", "tenantconfig:a")
        assert entry is not None
        opening = state.open("acme", [""], since=5, bound=10)
        assert isinstance(opening, ResumeOpening)
        return entry.version, state.ready, positions(opening.backlog)[:3]

    assert asyncio.run(scenario()) == (50, True, [6, 7, 8])


def test_a_closed_sink_drops_calls() -> None:
    async def scenario() -> int:
        state = ConfigState(history_size=10)
        sink = LoopSink(state, asyncio.get_running_loop())
        sink.close()
        sink.apply([change("tenantconfig:a", 1, 1)])
        # A call that is dropped has no event to wait on: the loop runs what was scheduled, if anything.
        await asyncio.sleep(0)
        return state.position

    assert asyncio.run(scenario()) == 0


# -- convergence -------------------------------------------------------------------------

KEYS = ["tenantconfig:a", "tenantconfig:b", "paramconfig:c"]
TENANTS = ["acme", "globex"]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[ConfigChange], list[ConfigChange], list[ConfigChange]]:
    """Changes in commit order; a snapshot taken at some point of them; and a delivery of them.

    The delivery keeps each key's changes in version order (as a shard does) but interleaves
    keys freely and repeats changes (resends).
    """
    count = draw(st.integers(1, 30))
    versions: dict[tuple[str, str], int] = {}
    changes: list[ConfigChange] = []
    for position in range(1, count + 1):
        tenant, key = draw(st.sampled_from(TENANTS)), draw(st.sampled_from(KEYS))
        version = versions.get((tenant, key), 0) + 1
        versions[tenant, key] = version
        deleted = draw(st.booleans()) and version > 1
        changes.append(change(key, version, position * 10, draw(st.integers(0, 9)), tenant=tenant, deleted=deleted))
    cut = draw(st.integers(0, count))
    latest: dict[tuple[str, str], ConfigChange] = {}
    for c in changes[:cut]:
        latest[c.tenant, str(c.key)] = c
    snapshot = list(latest.values())
    # The stream restarts from some point at or before the snapshot (an overlap).
    start = draw(st.integers(0, cut))
    queues: dict[tuple[str, str], list[ConfigChange]] = {}
    for c in changes[start:]:
        per_key = queues.setdefault((c.tenant, str(c.key)), [])
        per_key.append(c)
        if draw(st.booleans()):
            per_key.append(c)
    delivery: list[ConfigChange] = []
    while any(queues.values()):
        slot = draw(st.sampled_from(sorted(k for k, q in queues.items() if q)))
        delivery.append(queues[slot].pop(0))
    return changes, snapshot, delivery


def visible(state: ConfigState) -> dict[tuple[str, str], tuple[int, str, bool]]:
    result = {}
    for tenant in TENANTS:
        for key in KEYS:
            entry = state.entry(tenant, key)
            if entry is not None:
                result[tenant, key] = (entry.version, entry.value_json, entry.deleted)
    return result


@settings(max_examples=300, deadline=None)
@given(histories(), st.integers(0, 30), st.booleans())
def test_any_snapshot_and_delivery_converge_to_the_changes_applied_in_order(
    history: tuple[list[ConfigChange], list[ConfigChange], list[ConfigChange]], split: int, ready_first: bool
) -> None:
    changes, snapshot, delivery = history
    expected = ready_state()
    expected.apply(changes)

    state = ConfigState(history_size=1_000)
    if ready_first:
        state.caught_up(0)
    # The snapshot lands somewhere in the delivery, as a source restarting would place it.
    split = min(split, len(delivery))
    state.apply(delivery[:split])
    state.load(snapshot)
    state.apply(delivery[split:])

    assert visible(state) == visible(expected)
    assert state.position == expected.position


@pytest.mark.parametrize("since", [None, 0])
def test_a_watch_opened_before_any_change_sees_them_all(since: int | None) -> None:
    state = ready_state()
    opening = state.open("acme", [""], since=since, bound=100)
    assert not isinstance(opening, HistoryTooShort)
    state.apply([change("tenantconfig:a", 1, 1), change("tenantconfig:a", 2, 2)])
    assert positions(drain(opening.watcher)) == [1, 2]
