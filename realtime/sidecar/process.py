"""The sidecar process: settings, one engine, the `SidecarHost`, and the HTTP/WS server on one event loop.

Entry point: `lipsync sidecar ...` (infra/cli/sidecar.py builds the settings from its command line). Other
services that belong in the same process — the Temporal worker on this sidecar's task
queue, which calls the host — are passed to `serve()` as `services`: coroutines that get
the host and run until the process stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from realtime.engine.accel import AccelConfig
from realtime.engine.avatar.prepare import default_cache_root
from realtime.engine.protocol import EngineConfig
from realtime.errors import LipsyncError
from realtime.sidecar.config import SidecarSettings
from realtime.sidecar.engine_adapter import EngineAdapter

if TYPE_CHECKING:
    from realtime.sidecar.host import SidecarHost

logger = logging.getLogger(__name__)

HostService = Callable[["SidecarHost"], Coroutine[Any, Any, Any]]


class SidecarServiceFailed(LipsyncError, RuntimeError):
    """One of `serve()`'s services ended with an error; the sidecar shut down because of it."""

    code = "sidecar_service_failed"


def build_host(settings: SidecarSettings) -> SidecarHost:
    from realtime.sidecar.host import SidecarHost  # noqa: PLC0415 (livekit: loads when the sidecar serves)

    engine_config = EngineConfig(
        engine=settings.engine,
        model_dir=settings.model_dir,
        device=settings.device,
        cache_dir=settings.cache_dir,
        cache_max_bytes=settings.cache_max_bytes,
        max_batch_size=settings.host.max_batch_frames,  # one lane batch is one device batch
        accel=AccelConfig(
            compile_mode=settings.compile_mode,
            cuda_graphs=settings.cuda_graphs,
            serve_before_compile=settings.serve_before_compile,
            compile_tuned_stages=AccelConfig.compile_tuned_stages if settings.kernel_tuning else (),
        ),
    )
    return SidecarHost(EngineAdapter(engine_config), settings.host)


async def serve(
    settings: SidecarSettings, *, services: Sequence[HostService] = (), started: asyncio.Event | None = None
) -> None:
    """Run the sidecar until SIGINT/SIGTERM (uvicorn's handlers) or cancellation; tears every session down."""
    import uvicorn  # noqa: PLC0415 (heavy: uvicorn)

    from realtime.sidecar.server import create_app  # noqa: PLC0415 (livekit: loads when the sidecar serves)

    _Server = _uvicorn_server_class()

    host = build_host(settings)
    if settings.warm_up_at_start:
        result = await host.warm_up()
        logger.info(
            "engine ready",
            extra={"engine": result.engine, "device": result.device, "warm_up_ms": result.warm_up_ms},
        )
    server_config = dataclasses.replace(
        settings.server,
        avatar_cache_dir=settings.cache_dir or default_cache_root(),
        avatar_cache_max_bytes=settings.cache_max_bytes,
    )
    app = create_app(host, server_config)
    config = uvicorn.Config(
        app,
        host=settings.bind_host,
        port=settings.port,
        log_level="warning",
        ws="websockets-sansio",
        # Larger than our own limit, so an oversize message gets our typed error rather than a bare 1009
        # close.
        ws_max_size=max(16 * 1024 * 1024, 4 * settings.server.max_message_bytes),
        lifespan="off",
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, server.request_exit)
            handled.append(signum)
    host.gc_pauses.install()  # uninstalled below, with the sessions' teardown
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(service(host)) for service in services]
    failed: list[BaseException] = []

    def service_ended(task: asyncio.Task[Any]) -> None:
        # A service that dies (e.g. the Temporal worker lost its server for good) would leave a sidecar
        # nobody can place sessions on: stop the whole process instead, so a supervisor restarts it.
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            assert error is not None
            logger.error("sidecar service failed; shutting down", exc_info=error)
            failed.append(error)
            server.request_exit()

    for task in tasks:
        task.add_done_callback(service_ended)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
            await asyncio.sleep(0.05)
        if server.started:
            logger.info(
                "sidecar listening",
                extra={
                    "url": f"http://{settings.bind_host}:{settings.port}",
                    "sidecar_id": settings.host.sidecar_id,
                },
            )
            if started is not None:
                started.set()
        await serving
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await host.close()  # every session torn down: rooms left, slots released
        host.gc_pauses.uninstall()
        for signum in handled:
            loop.remove_signal_handler(signum)
    if failed:
        raise SidecarServiceFailed(f"a sidecar service failed: {failed[0]!r}") from failed[0]


def _uvicorn_server_class() -> type[Any]:
    import uvicorn  # noqa: PLC0415 (heavy: uvicorn)

    class Server(uvicorn.Server):
        """uvicorn's server without its signal capture: the sidecar owns SIGINT/SIGTERM so that it can tear
        its
        sessions down first (uvicorn would re-raise the signal after its own shutdown and kill the
        process)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def request_exit(self) -> None:
            self.should_exit = True

    return Server


def run(settings: SidecarSettings, services: Sequence[HostService] = ()) -> int:
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, services=services))
    except SidecarServiceFailed as exc:
        logger.error("sidecar stopped: %s", exc)
        return 1
    return 0
