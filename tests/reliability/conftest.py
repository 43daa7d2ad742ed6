"""Fixtures of the reliability suite: the live local stack, the run's mode, and the report it feeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tagbus import lifecycle
from tagbus import settings as settings_mod
from tests.reliability.faults import Mode
from tests.reliability.report import Results, write_report


@pytest.fixture(scope="session")
def mode() -> Mode:
    return Mode.from_env()


@pytest.fixture(scope="session")
def live_stack() -> Iterator[settings_mod.Settings]:
    """The stack, started if needed; every part is brought back up after the session's faults."""
    lifecycle.up()
    yield settings_mod.load()
    lifecycle.up()


#: ``nodeid: first line of the error`` of each failed test of this session (see the hook below).
_FAILED: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:
        message = str(call.excinfo.value).strip().splitlines() if call.excinfo is not None else []
        _FAILED.append(f"`{item.name}` ({report.when}): {message[0][:200] if message else 'failed'}")
    return report


@pytest.fixture(scope="session")
def results(mode: Mode) -> Iterator[Results]:
    """What the fault and overload tests measured; written to ``reports/`` when a run asks for it."""
    collected = Results(mode=mode.name)
    yield collected
    collected.failed = list(_FAILED)
    if mode.writes_report and (collected.faults or collected.overload or collected.config or collected.pipeline):
        write_report(collected)
