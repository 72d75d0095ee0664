"""The sidecar's HTTP/WS routes: audio in, health, per-session stats, and (opt-in) the dev control API.

Endpoints (docs/audio-protocol.md is the audio contract):
- `WS  /v1/sessions/{session_id}/audio`   audio in, playback events + stats + errors out
- `WS  /audio?session_id=...`              the same, at the seed's address
- `GET /healthz`                           bare liveness; with the service credential: engine state,
                                           capacity, the render lane, collector pauses, every session's
                                           stats
- `GET /v1/sessions/{session_id}/stats`    one session's stats
- `POST|DELETE /v1/sessions/{session_id}`  the dev control API (only with `dev_api`; realtime.sidecar.dev_api)

The audio socket itself is served by realtime.ingest.connection; this module only routes.
Credentials (realtime.sidecar.auth): every HTTP route but `/healthz` needs the service credential
(`Authorization: Bearer <secret>`), checked before the body is read; the audio WebSocket takes it
or an audio token for its own session (`?token=`), checked before the session is looked up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from realtime.disk_budget import store_bytes
from realtime.ingest.connection import AudioConnection
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.sidecar.auth import AUDIO_TOKEN_PARAM, check_audio_token, check_secret, is_service_credential
from realtime.sidecar.config import ServerConfig
from realtime.sidecar.dev_api import add_dev_api
from realtime.sidecar.host import SidecarHost

logger = logging.getLogger(__name__)

# The one route open without a credential (its body then says only that the process serves).
LIVENESS_PATH = "/healthz"


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **extra}


def _install_error_bodies(app: FastAPI) -> None:
    """HTTP errors as `{code, message}` (+ `fields` for a malformed body), like the API edge's."""

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's own 404/405
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) else _error("http_error", str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {
                "field": ".".join(str(part) for part in error.get("loc", ())[1:]) or "body",
                "message": error.get("msg", ""),
            }
            for error in exc.errors()
        ]
        listed = "; ".join(f"{field['field']}: {field['message']}" for field in fields)
        return JSONResponse(
            _error("validation_error", f"invalid request: {listed}", fields=fields),
            status_code=422,
        )


class ServiceCredentialGate:
    """ASGI middleware: an HTTP request without the service credential gets 401 before routing or reading
    its body (so an unauthenticated caller costs no parsing). `/healthz` passes, and shows details only
    with the credential; WebSockets pass to their route, which checks the credential or an audio token."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != LIVENESS_PATH:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if not is_service_credential(self.secret, headers.get("authorization")):
                response = JSONResponse(
                    _error(
                        "unauthorized",
                        "this sidecar route needs the service credential (Authorization: Bearer)",
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _audio_refusal(websocket: WebSocket, session_id: str, secret: str) -> IngestError | None:
    if is_service_credential(secret, websocket.headers.get("authorization")):
        return None
    why = check_audio_token(secret, websocket.query_params.get(AUDIO_TOKEN_PARAM), session_id)
    if why is None:
        return None
    return IngestError(
        IngestErrorCode.UNAUTHORIZED,
        f"audio token {why}: connect with the audio_ws_url the API handed out for this session "
        "(its token expires; GET the session again for a fresh one)",
        fatal=True,
    )


def create_app(host: SidecarHost, config: ServerConfig) -> FastAPI:
    """The sidecar's app; `config.service_secret` is required (realtime.sidecar.auth.check_secret)."""
    server_config = config
    secret = check_secret(server_config.service_secret, "ServerConfig.service_secret")
    app = FastAPI(title="lipsync-live sidecar", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ServiceCredentialGate, secret=secret)
    _install_error_bodies(app)
    audio_connections: dict[str, AudioConnection] = {}

    @app.get("/healthz")  # LIVENESS_PATH: open without a credential
    async def healthz(request: Request) -> dict[str, Any]:
        if not is_service_credential(secret, request.headers.get("authorization")):
            return {"status": "ok"}  # session ids, addresses and capacity only for the service
        info = host.engine_info()
        capacity = host.capacity()
        sessions: dict[str, Any] = {}
        for session_id, session in host.sessions.items():
            runtime = session.runtime
            sessions[session_id] = dataclasses.asdict(runtime.stats()) if runtime else {"phase": "preparing"}
        cache_dir = server_config.avatar_cache_dir
        cache_bytes = await asyncio.to_thread(store_bytes, cache_dir) if cache_dir is not None else 0
        return {
            "status": "ok",
            "engine": dataclasses.asdict(info),
            "capacity": dataclasses.asdict(capacity),
            "render_lane": host.lane_report(),
            # Full collections stop every session at once (realtime.heap): their pauses, to tell a stall from
            # a slow render.
            "gc": host.gc_pauses.stats().as_report(),
            "sessions": sessions,
            "caches": {
                "avatar_cache_bytes": cache_bytes,
                "avatar_cache_max_bytes": server_config.avatar_cache_max_bytes,
            },
        }

    @app.get("/v1/sessions/{session_id}/stats")
    async def session_stats(session_id: str) -> dict[str, Any]:
        runtime = host.runtime(session_id)
        if runtime is None:
            raise HTTPException(404, detail=_error("unknown_session", f"no live session {session_id}"))
        connection = audio_connections.get(session_id)
        # The direct connection's declared format: /debug/audio shows it for every connection, relayed or not.
        audio_input = connection.input_report() if connection is not None else None
        return dataclasses.asdict(runtime.stats()) | {"audio_input": audio_input}

    async def _serve_audio(websocket: WebSocket, session_id: str) -> None:
        refusal = _audio_refusal(websocket, session_id, secret)
        connection = AudioConnection(
            websocket,
            host,
            session_id,
            server_config,
            audio_connections,
            credential_params=(AUDIO_TOKEN_PARAM,),
        )
        await connection.serve(refusal)

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio_ws(websocket: WebSocket, session_id: str) -> None:
        await _serve_audio(websocket, session_id)

    @app.websocket("/audio")
    async def audio_ws_seed(websocket: WebSocket) -> None:
        session_id = websocket.query_params.get("session_id", "")
        await _serve_audio(websocket, session_id)

    if server_config.dev_api:
        add_dev_api(app, host, server_config, hosts_session=lambda session_id: session_id in host.sessions)
    return app
