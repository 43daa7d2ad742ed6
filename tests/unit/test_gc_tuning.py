"""The collector settings the bus, tailer and consumer apply once they have started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kernel.gc_tuning import MIDDLE, OLD, YOUNG, quiet_collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_quiet_collector_freezes_startup_objects_and_collects_in_larger_steps() -> None:
    alive_at_startup = [object() for _ in range(10)]
    quiet_collector()
    assert gc.get_threshold() == (YOUNG, MIDDLE, OLD)
    assert YOUNG > 700  # larger than CPython's default young threshold, or it changes nothing
    assert gc.get_freeze_count() >= len(alive_at_startup)


@pytest.mark.usefixtures("restored_collector")
def test_cycles_are_still_collected() -> None:
    quiet_collector()

    class Node:
        partner: object = None

    a, b = Node(), Node()
    a.partner, b.partner = b, a
    ids = {id(a), id(b)}
    del a, b
    gc.collect()
    assert not ids & {id(o) for o in gc.get_objects() if type(o).__name__ == "Node"}
