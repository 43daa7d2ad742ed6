"""The config server's Prometheus metrics, in a registry of its own.

The state and the streams keep plain counters (they run on the event loop, and a watcher's
delivery is the hot path); this collector reads them when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from config_server.state import ConfigState
from config_server.watch import ServiceStats

PROTOCOLS = ("grpc", "sse")


class ConfigServerCollector(Collector):
    """Reads the state's and the streams' counters at scrape time."""

    def __init__(self, state: ConfigState, stats: ServiceStats) -> None:
        self._state = state
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        state, stats = self._state, self._stats
        yield _by_protocol(GaugeMetricFamily, "config_server_streams_open", "Watch streams open.", stats.open)
        yield _by_protocol(CounterMetricFamily, "config_server_streams_opened", "Watch streams opened.", stats.opened)
        yield _by_protocol(
            CounterMetricFamily, "config_server_deliveries", "Changes written to watch streams.", stats.sent
        )
        yield _by_protocol(
            CounterMetricFamily,
            "config_server_slow_watcher_cuts",
            "Watchers cut because their queue of unread changes was full.",
            stats.cuts,
        )
        yield _by_protocol(
            CounterMetricFamily,
            "config_server_streams_interrupted",
            "Streams of cut watchers ended with an error because their client did not drain the resync.",
            stats.interrupted,
        )
        resyncs = CounterMetricFamily("config_server_resyncs", "Resync answers sent, by reason.", labels=["reason"])
        for reason in ("HISTORY_TOO_SHORT", "TOO_SLOW"):
            resyncs.add_metric([reason], stats.resyncs[reason])
        yield resyncs
        requests = CounterMetricFamily(
            "config_server_requests", "Get, List and Watch requests by outcome.", labels=["method", "outcome"]
        )
        for (method, outcome), count in sorted(stats.requests.items()):
            requests.add_metric([method, outcome], count)
        yield requests
        changes = CounterMetricFamily(
            "config_server_changes", "Changes from the source, by what applying them did.", labels=["outcome"]
        )
        changes.add_metric(["applied"], state.stats.applied)
        changes.add_metric(["stale"], state.stats.stale)
        changes.add_metric(["rejected"], state.stats.rejected)
        yield changes
        yield CounterMetricFamily(
            "config_server_source_failures",
            "Failures the source reported (it retries).",
            value=state.stats.source_failures,
        )
        yield GaugeMetricFamily(
            "config_server_ready", "1 once the source has caught up the first time.", value=int(state.ready)
        )
        yield GaugeMetricFamily("config_server_position", "The highest position applied.", value=state.position)
        yield GaugeMetricFamily(
            "config_server_oldest_position", "The lowest position a watch can resume from.", value=state.oldest_position
        )
        yield GaugeMetricFamily(
            "config_server_history_entries", "Changes kept for resuming.", value=state.history_length
        )
        yield GaugeMetricFamily("config_server_tenants", "Tenants with entries or watchers.", value=state.tenants())
        yield GaugeMetricFamily(
            "config_server_source_lag_seconds",
            "How far the source is behind its head: its last report plus the time since.",
            value=state.source_lag_ms() / 1000,
        )


def registry(state: ConfigState, stats: ServiceStats) -> CollectorRegistry:
    """A registry holding the config server's metrics only."""
    result = CollectorRegistry(auto_describe=False)
    result.register(ConfigServerCollector(state, stats))
    return result


def _by_protocol(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, documentation: str, counts: dict[str, int]
) -> Metric:
    metric = family(name, documentation, labels=["protocol"])
    for protocol in PROTOCOLS:
        metric.add_metric([protocol], counts.get(protocol, 0))
    return metric
