"""A config server process: gRPC and HTTP on one event loop, the change source in a thread.

:class:`ConfigServer` wires the parts (state, gRPC service with health checking and
reflection, the SSE/health/metrics app under uvicorn, the source's thread) and owns their
start and stop; :func:`run` is the blocking entry point the CLI calls. The source and the
verifier are built by the composition root and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Collection, Iterator

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_reflection.v1alpha import reflection

from config_server.access import Access
from config_server.metrics import registry
from config_server.service import SERVICE_NAME, ConfigServicer
from config_server.settings import ConfigServerSettings
from config_server.source import ChangeSource
from config_server.sse import create_app
from config_server.state import ConfigState, LoopSink
from config_server.watch import ServiceStats, StreamSlots
from kernel.auth import TokenVerifier

log = logging.getLogger(__name__)

#: Largest request message: a watch of the most prefixes of the longest length fits many times.
_MAX_REQUEST_BYTES = 256 * 1024


class ConfigServerError(Exception):
    """The server cannot start (a port in use, say)."""


class ConfigServer:
    """One config server: serves ``ConfigService`` and the SSE watch from a state its source feeds.

    Not ready (gRPC health NOT_SERVING, ``/readyz`` 503, UNAVAILABLE to Get/List/Watch) until
    the source first reports it has caught up.
    """

    def __init__(
        self,
        settings: ConfigServerSettings,
        *,
        source: ChangeSource,
        verifier: TokenVerifier,
        tags: Collection[str],
    ) -> None:
        self._settings = settings
        self._source = source
        self._verifier = verifier
        self._tags = frozenset(tags)
        self.state = ConfigState(history_size=settings.history_size)
        self.stats = ServiceStats()
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._sink: LoopSink | None = None
        self._source_thread: threading.Thread | None = None
        self._stop_source = threading.Event()
        self._source_ended: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._grpc_port = 0
        self._http_port = 0
        self._stopped = False

    @property
    def grpc_port(self) -> int:
        """The bound gRPC port (the settings' port, or the one picked for ``0``)."""
        return self._grpc_port

    @property
    def http_port(self) -> int:
        return self._http_port

    async def start(self) -> None:
        """Bind both ports, start serving (not ready yet) and start the source's thread."""
        loop = asyncio.get_running_loop()
        settings = self._settings
        access = Access(
            self._verifier, self._tags, max_prefixes=settings.max_prefixes, max_prefix_chars=settings.max_prefix_chars
        )
        slots = StreamSlots(settings.max_streams_per_tenant)
        self._source_ended = asyncio.Event()
        try:
            await self._start_grpc(ConfigServicer(self.state, access, slots=slots, settings=settings, stats=self.stats))
            app = create_app(
                self.state,
                access,
                slots=slots,
                settings=settings,
                stats=self.stats,
                registry=registry(self.state, self.stats),
            )
            await self._start_http(app)
        except BaseException:
            await self.stop(0)
            raise
        self.state.on_ready(self._became_ready)
        self._sink = LoopSink(self.state, loop, max_pending=settings.max_pending_batches)
        self._source_thread = threading.Thread(target=self._run_source, args=(loop,), name="config-source", daemon=True)
        self._source_thread.start()
        log.info(
            "config server: gRPC on %s:%d, HTTP on %s:%d",
            settings.grpc_host,
            self._grpc_port,
            settings.http_host,
            self._http_port,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """End every stream cleanly (each says where it got to), then stop serving and the source."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_source.set()
        if self._sink is not None:
            self._sink.close()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.state.close_all()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._http_task), grace + 1)
        if self._source_thread is not None:
            await asyncio.to_thread(self._source_thread.join, grace)
            if self._source_thread.is_alive():
                log.warning("the config source did not stop within %.1f s", grace)
        for task in list(self._tasks):
            task.cancel()

    async def source_ended(self) -> None:
        """Wait until the source's thread ends without being asked to (a fault: the state stops moving)."""
        assert self._source_ended is not None, "start() first"
        await self._source_ended.wait()

    async def _start_grpc(self, servicer: ConfigServicer) -> None:
        settings = self._settings
        keepalive_ms = int(settings.grpc_keepalive_seconds * 1000)
        server = grpc.aio.server(
            options=[
                # Without it a second server binds the same port and the two share calls.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", 20_000),
                # Watchers hold idle streams for minutes and may ping to keep them up.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ]
        )
        self._grpc = server
        server.add_generic_rpc_handlers((servicer.handler(),))
        health = HealthServicer()
        self._health = health
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigServerError(f"cannot listen for gRPC on {address}: {e}") from e
        if port == 0:
            raise ConfigServerError(f"cannot listen for gRPC on {address}")
        self._grpc_port = port
        await server.start()

    async def _start_http(self, app: object) -> None:
        settings = self._settings
        sock = socket.socket(socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.http_host, settings.http_port))
        except OSError as e:
            sock.close()
            raise ConfigServerError(f"cannot listen for HTTP on {settings.http_host}:{settings.http_port}: {e}") from e
        self._http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = _EmbeddedUvicorn(config)
        self._http = server
        self._http_task = asyncio.create_task(server.serve(sockets=[sock]), name="config-http")
        while not server.started:
            if self._http_task.done():
                self._http_task.result()
                raise ConfigServerError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def _became_ready(self) -> None:
        task = asyncio.get_running_loop().create_task(self._serving())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serving(self) -> None:
        if self._health is not None and not self._stopped:
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def _run_source(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sink is not None
        try:
            self._source.run(self._sink, self._stop_source)
        except Exception:
            log.exception("the config source failed")
        finally:
            if not self._stop_source.is_set():
                log.error("the config source stopped on its own; the state no longer moves")
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._on_source_ended)

    def _on_source_ended(self) -> None:
        assert self._source_ended is not None
        self._source_ended.set()
        if self._health is not None:
            task = asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on a loop it shares: the process, not uvicorn, handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(
    settings: ConfigServerSettings,
    *,
    source: ChangeSource,
    verifier: TokenVerifier,
    tags: Collection[str],
    grace_seconds: float = 5.0,
) -> int:
    """Serve until SIGTERM or SIGINT (exit 0), or until the source stops on its own (exit 1)."""

    async def main() -> int:
        server = ConfigServer(settings, source=source, verifier=verifier, tags=tags)
        try:
            await server.start()
        except ConfigServerError as e:
            log.error("%s", e)
            return 1
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(server.source_ended())
        try:
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            source_ended = failed.done()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            stopped.cancel()
            failed.cancel()
            await server.stop(grace_seconds)
        return 1 if source_ended else 0

    return asyncio.run(main())
