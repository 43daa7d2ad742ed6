"""Settings of a config server, built by the composition root (nothing here reads the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from kernel.keys import MAX_KEY_CHARS

#: The contract promises a progress message at least this often on every watch stream.
MAX_PROGRESS_INTERVAL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class ConfigServerSettings:
    """Where a config server listens and the bounds it keeps per watcher and per tenant."""

    grpc_host: str = "127.0.0.1"
    #: ``0`` binds a free port (tests); :attr:`ConfigServer.grpc_port` reports the bound one.
    grpc_port: int = 50051
    #: Server-Sent Events, ``/healthz``, ``/readyz`` and ``/metrics``.
    http_host: str = "127.0.0.1"
    http_port: int = 8081
    #: Recent changes kept for watchers that resume with ``since``; older positions get a
    #: ``Resync{HISTORY_TOO_SHORT}`` and list again.
    history_size: int = 100_000
    #: Open watch streams (gRPC and SSE together) per token tenant; past it RESOURCE_EXHAUSTED
    #: (HTTP 429), so one tenant cannot take the server's streams from the others.
    max_streams_per_tenant: int = 1_000
    #: A stream ends cleanly after this long, give or take :attr:`stream_lifetime_jitter`, so its
    #: token is verified again when the client resumes (with ``since``: nothing is missed);
    #: the jitter spreads the reconnections of streams opened together.
    stream_lifetime_seconds: float = 600.0
    stream_lifetime_jitter: float = 0.2
    #: A stream's progress messages: the position it has every change up to, and the source's lag.
    progress_interval_seconds: float = 10.0
    #: Changes waiting for one watcher; a watcher that lets it fill is cut with
    #: ``Resync{TOO_SLOW}``, so a stalled reader costs a bounded amount of memory.
    watcher_queue_size: int = 1_000
    #: How long the server waits to hand a cut watcher its ``Resync`` before ending the stream
    #: with an error (a reader that stopped entirely never drains it).
    cut_grace_seconds: float = 5.0
    #: Entries per snapshot message, and its size: gRPC clients refuse messages over 4 MiB by
    #: default, so a chunk stays well below it (a single larger entry goes alone).
    snapshot_chunk_size: int = 500
    snapshot_chunk_bytes: int = 1024 * 1024
    max_prefixes: int = 16
    max_prefix_chars: int = MAX_KEY_CHARS
    #: SSE comment lines on a stream that has been quiet this long (proxies close idle ones).
    sse_keepalive_seconds: float = 15.0
    #: HTTP/2 pings on idle gRPC connections, so a peer that vanished is noticed.
    grpc_keepalive_seconds: float = 60.0
    #: Batches a source may hand over before the event loop has applied the earlier ones;
    #: past it the source's thread waits (a source faster than the loop gets back-pressure).
    max_pending_batches: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.progress_interval_seconds <= MAX_PROGRESS_INTERVAL_SECONDS:
            raise ValueError(f"the progress interval must be in (0, {MAX_PROGRESS_INTERVAL_SECONDS:g}] s")
        if not 0 <= self.stream_lifetime_jitter < 1:
            raise ValueError("the stream lifetime jitter is a fraction in [0, 1)")
        for name in (
            "history_size",
            "max_streams_per_tenant",
            "watcher_queue_size",
            "snapshot_chunk_size",
            "snapshot_chunk_bytes",
            "max_prefixes",
            "max_prefix_chars",
            "max_pending_batches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("stream_lifetime_seconds", "cut_grace_seconds", "sse_keepalive_seconds", "grpc_keepalive_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
