"""The tailer's Prometheus metrics and the ``/metrics`` endpoint of the tailer process."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from tailer.decoder import DecodedTransaction

#: Where the tailer process serves its Prometheus registry (``/metrics``); loopback by default.
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_METRICS_HOST: Final = "127.0.0.1"


class TailerMetrics:
    """The tailer's Prometheus metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_decoded = Counter(
            "tagbus_tailer_events_decoded",
            "Events decoded from the WAL (resends included).",
            registry=registry,
        )
        self.events_published = Counter(
            "tagbus_tailer_events_published", "Events acknowledged by the sink.", registry=registry
        )
        self.kinesis_records = Counter(
            "tagbus_tailer_kinesis_records",
            "Kinesis records acknowledged (an aggregated record counts once), by stream.",
            ["stream"],
            registry=registry,
        )
        self.kinesis_bytes = Counter(
            "tagbus_tailer_kinesis_bytes",
            "Bytes of data and partition keys in acknowledged Kinesis records, by stream.",
            ["stream"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "tagbus_tailer_putrecords_batch_size",
            "Records per PutRecords request.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500),
            registry=registry,
        )
        self.publish_retries = Counter(
            "tagbus_tailer_publish_retries", "PutRecords retries, by reason.", ["reason"], registry=registry
        )
        self.slot_lag_bytes = Gauge(
            "tagbus_tailer_slot_lag_bytes",
            "WAL bytes between the server's current LSN and the slot's confirmed_flush_lsn.",
            registry=registry,
        )
        self.last_publish_time = Gauge(
            "tagbus_tailer_last_publish_timestamp_seconds",
            "Unix time of the last acknowledged publish.",
            registry=registry,
        )
        self.last_advance_time = Gauge(
            "tagbus_tailer_last_advance_timestamp_seconds",
            "Unix time the slot last advanced (heartbeats included): progress is moving.",
            registry=registry,
        )
        self.slot_recreated = Counter(
            "tagbus_tailer_slot_recreated",
            "Times the replication slot was lost (invalidated or dropped) and recreated, by reason.",
            ["reason"],
            registry=registry,
        )
        self.events_republished = Counter(
            "tagbus_tailer_events_republished",
            "Events republished from the events table after the slot was lost (counted as published too).",
            registry=registry,
        )
        self.commit_to_ack_seconds = Histogram(
            "tagbus_tailer_commit_to_ack_seconds",
            "Seconds from a transaction's commit to the acknowledgement of its events.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )

    def acknowledged(self, transactions: Sequence[DecodedTransaction], acked_at: float) -> None:
        """Count the events of ``transactions`` as published at ``acked_at``, and each commit's wait for it."""
        self.events_published.inc(sum(len(t.events) for t in transactions))
        self.last_publish_time.set(acked_at)
        for transaction in transactions:
            if transaction.events:
                self.commit_to_ack_seconds.observe(max(0.0, acked_at - transaction.commit_time.timestamp()))

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> TailerMetrics:
        """The metrics of ``registry`` (the default registry when ``None``), created on first use."""
        target = REGISTRY if registry is None else registry
        metrics = _METRICS.get(target)
        if metrics is None:
            metrics = _METRICS[target] = cls(target)
        return metrics


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, TailerMetrics] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The tailer's ``/metrics`` HTTP endpoint, served from a daemon thread."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int = DEFAULT_METRICS_PORT, *, host: str = DEFAULT_METRICS_HOST, registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (the default one when ``None``) at ``http://host:port/metrics``; port 0 picks one."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY if registry is None else registry)
    return MetricsServer(host=host, port=int(server.server_port), _server=server, _thread=thread)
