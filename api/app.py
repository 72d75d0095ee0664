"""The FastAPI application factory (`lipsync api` serves `create_app(ApiSettings.from_env())`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from api.audio_relay import RelayRegistry
from api.deps import Services
from api.errors import install_error_handlers
from api.limits import RequestGate
from api.metrics import ApiMetrics
from api.routes import health, livekit, ops, sessions
from api.sessions import SessionService
from api.settings import ApiSettings
from api.sidecars import SidecarDirectory
from api.temporal import TemporalGateway
from api.tracing import instrument
from workflows.policy import SessionPolicy

VIEWER_STATIC_DIR = Path(__file__).resolve().parent / "static" / "viewer"


class _LatencyMiddleware:
    """Request latency by route template (not raw path: session ids would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), template, str(status["code"])).observe(
                time.perf_counter() - started
            )


def create_app(
    settings: ApiSettings, *, temporal_client: Client | None = None, policy: SessionPolicy | None = None
) -> FastAPI:
    """`temporal_client`/`policy`: injected by tests; by default the client connects lazily, the policy file
    loads."""
    metrics = ApiMetrics()
    sidecars = SidecarDirectory(settings.sidecar_urls, settings.sidecar_secret)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sidecars.close()

    app = FastAPI(
        title="lipsync-live",
        version="0.1.0",
        description="Realtime lip-sync avatar sessions: start, inspect, stop, stream audio; LiveKit viewer "
        "tokens; health, readiness, metrics and debug endpoints. Every error body is {code, message}.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = Services(
        settings=settings,
        temporal=TemporalGateway(settings.temporal_target, settings.temporal_namespace, temporal_client),
        sessions=SessionService(settings, policy),
        sidecars=sidecars,
        relays=RelayRegistry(),
        metrics=metrics,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(livekit.router)
    app.include_router(sessions.router)
    app.include_router(sessions.ws_router)
    app.include_router(sessions.seed_ws_router)
    app.include_router(ops.router)
    if VIEWER_STATIC_DIR.exists():
        # Built by `make setup` (api/viewer, esbuild); absent in a bare checkout.
        app.mount("/viewer", StaticFiles(directory=VIEWER_STATIC_DIR, html=True), name="viewer")
    app.add_middleware(_LatencyMiddleware, metrics=metrics)
    # Added last, so it runs first: the key and the body cap are checked before anything reads the body.
    app.add_middleware(RequestGate, settings=settings)
    instrument(app)
    return app
