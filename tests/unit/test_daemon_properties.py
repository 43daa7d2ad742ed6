"""The MultiLangDaemon properties: the polling settings that bound freshness reach the KCL."""

from __future__ import annotations

import pytest

from consumers.daemon import MIN_IDLE_TIME_BETWEEN_READS_MS, DaemonSettings, render_properties


def _properties(settings: DaemonSettings) -> dict[str, str]:
    lines = render_properties(settings).splitlines()
    pairs = (line.split(" = ", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_polling_is_as_fast_as_kinesis_allows_per_shard() -> None:
    props = _properties(DaemonSettings(stream_name="s", processor_command=("python", "-m", "p")))
    # KCL 3.1.3 multilang: PollingConfigBean's property names, used only in POLLING mode. Without
    # idleTimeBetweenReadsInMillis the KCL polls every 1,500 ms, which alone breaks a 500 ms target.
    assert props["retrievalMode"] == "POLLING"
    assert props["idleTimeBetweenReadsInMillis"] == str(MIN_IDLE_TIME_BETWEEN_READS_MS) == "200"
    assert props["maxRecords"] == "1000"
    # Off: kinesis-mock reports MillisBehindLatest 0, which would slow every poll down to it.
    assert "millisBehindLatestThresholdForReducedTps" not in props


def test_polling_faster_than_five_reads_per_second_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 200"):
        DaemonSettings(stream_name="s", processor_command=("p",), idle_time_between_reads_ms=100)


def test_extra_properties_override_the_defaults() -> None:
    settings = DaemonSettings(stream_name="s", processor_command=("p",), extra=(("maxRecords", "500"),))
    assert _properties(settings)["maxRecords"] == "500"
