"""The FastAPI application factory (`lipsync api` serves `create_app(ApiSettings.from_env())`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.errors import install_error_handlers
from api.routes import health, livekit
from api.settings import ApiSettings

VIEWER_STATIC_DIR = Path(__file__).resolve().parent / "static" / "viewer"


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(
        title="lipsync-live",
        version="0.1.0",
        description="Realtime lip-sync avatar sessions: start, inspect, stop; LiveKit viewer tokens; health.",
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(livekit.router)
    if VIEWER_STATIC_DIR.exists():
        # Built by `make setup` (api/viewer, esbuild); absent in a bare checkout.
        app.mount("/viewer", StaticFiles(directory=VIEWER_STATIC_DIR, html=True), name="viewer")
    return app
