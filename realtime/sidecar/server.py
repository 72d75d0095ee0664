"""The sidecar's HTTP/WS server: audio ingest, health, per-session stats, and a small dev control API.

Endpoints (docs/audio-protocol.md is the audio contract):
- `WS  /v1/sessions/{session_id}/audio`   audio in, playback events + stats + errors out
- `WS  /audio?session_id=...`              the same, at the seed's address
- `GET /healthz`                           bare liveness; with the service credential: engine state, capacity,
                                           the render lane, every session's stats
- `GET /v1/sessions/{session_id}/stats`    one session's stats
- `POST /v1/sessions/{session_id}`         dev control without Temporal (only with `dev_api`): prepare + warm +
                                           open + run
- `DELETE /v1/sessions/{session_id}`       dev control (only with `dev_api`): stop + teardown

Credentials (realtime.sidecar.auth): every HTTP route but `/healthz` needs the service credential
(`Authorization: Bearer <secret>`), checked before the body is read; the audio WebSocket takes it
or an audio token for its own session (`?token=`), checked before the session is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from realtime.disk_budget import store_bytes
from realtime.errors import LipsyncError
from realtime.host import (
    AvatarAsset,
    OutputTarget,
    RunLimits,
    SessionEndReason,
    SessionStats,
)
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import PcmFormat
from realtime.ingest.protocol import (
    ConfigMessage,
    EndOfUtterance,
    Interrupt,
    StatsRequest,
    parse_client_text,
    playback_finished_message,
    playback_started_message,
    ready_message,
)
from realtime.ingest.ratewatch import RateVerdict
from realtime.ingest.ws_close import ws_close_code
from realtime.outputs.errors import OutputError
from realtime.outputs.registry import LIVEKIT, LiveKitTarget
from realtime.sidecar.audio_input import AudioInput
from realtime.sidecar.auth import AUDIO_TOKEN_PARAM, check_audio_token, check_secret, is_service_credential
from realtime.sidecar.config import ServerConfig
from realtime.sidecar.errors import SidecarError
from realtime.sidecar.host import SidecarHost

logger = logging.getLogger(__name__)

WS_SOURCE = "ws"
LOOKAHEAD_MS = 80
# Periodic stats faster than this would let one client keep the event loop busy computing them for nothing.
MIN_STATS_INTERVAL_MS = 100
# Query parameters that are not part of the audio format.
_NON_FORMAT_PARAMS = {"session_id", "stats_interval_ms", "pacing", AUDIO_TOKEN_PARAM}
PACING_VALUES = ("realtime", "burst")  # pacing=realtime: the client streams as it produces (its rate is checked)
# The one route open without a credential (its body then says only that the process serves).
LIVENESS_PATH = "/healthz"


def stats_dict(stats: SessionStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def suspect_sample_rate_message(verdict: RateVerdict) -> dict[str, Any]:
    """A warning (the connection stays open): a real-time stream arrives far from its declared rate."""
    return {
        "type": "warning",
        "code": "suspect_sample_rate",
        "message": (
            f"audio arrives at about {verdict.arrival_rate_hz:.0f} samples/s on a stream declared real-time at "
            f"{verdict.declared_rate_hz} Hz: if the PCM's real rate differs, declare it (sample_rate), or it "
            "plays at the wrong speed"
        ),
        "declared_sample_rate": verdict.declared_rate_hz,
        "arrival_rate_hz": round(verdict.arrival_rate_hz, 1),
    }


class _AudioConnection:
    """One audio WebSocket: its input, its outgoing message queue, and playback events for WS audio.

    Every outgoing message goes through `outbox` and one sender task, so messages never
    interleave; `_close` is the one way out (error message first, then the close frame).
    """

    def __init__(
        self,
        websocket: WebSocket,
        host: SidecarHost,
        session_id: str,
        config: ServerConfig,
        registry: dict[str, _AudioConnection],
    ) -> None:
        self.websocket = websocket
        self.host = host
        self.session_id = session_id
        self.config = config
        self.registry = registry
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.input: AudioInput | None = None
        self.pacing = "burst"  # what the client declared (`pacing` query parameter)
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._close_error: IngestError | None = None  # why `_close` began (replaced, session ended)

    # PlaybackListener: events for utterances that came in over the WS.
    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None:
        if source == WS_SOURCE:
            self.outbox.put_nowait(playback_started_message(utterance_id, frame_id))

    def on_playback_finished(self, utterance_id: int, source: str, position_s: float, interrupted: bool) -> None:
        if source == WS_SOURCE:
            self.outbox.put_nowait(playback_finished_message(utterance_id, position_s, interrupted))

    async def _send_loop(self) -> None:
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            await self.websocket.send_json(message)

    async def _stats_loop(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000.0)
            runtime = self.host.runtime(self.session_id)
            if runtime is not None:
                self.outbox.put_nowait({"type": "stats", **stats_dict(runtime.stats())})

    async def _close(self, error: IngestError | None) -> None:
        """Send `error` (if any) after everything queued, then close the socket (`ws_close_code`). Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._close_error = error
        if error is not None:
            self.outbox.put_nowait(error.to_message())
        self.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            if self._sender is None:
                await self._send_loop()
            else:
                await asyncio.wait_for(asyncio.shield(self._sender), timeout=2.0)
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                code = error.code if error else None
                await self.websocket.close(ws_close_code(code), reason=code or "")

    async def serve(self, refusal: IngestError | None = None) -> None:
        """Serve the socket; `refusal` (a failed credential check) closes it before anything else is looked at."""
        await self.websocket.accept()
        if refusal is not None:
            await self._close(refusal)
            return
        runtime = self.host.runtime(self.session_id)
        if runtime is None:
            await self._close(
                IngestError(
                    IngestErrorCode.UNKNOWN_SESSION,
                    f"no live session {self.session_id!r} on this sidecar (is its output open?)",
                    fatal=True,
                )
            )
            return
        params = dict(self.websocket.query_params)
        try:
            pcm_format = PcmFormat.from_mapping({k: v for k, v in params.items() if k not in _NON_FORMAT_PARAMS})
            stats_interval_ms = int(params.get("stats_interval_ms", self.config.stats_interval_ms))
        except IngestError as exc:
            await self._close(exc)
            return
        except ValueError:
            await self._close(IngestError(IngestErrorCode.BAD_CONFIG, "stats_interval_ms must be an integer"))
            return
        pacing = params.get("pacing", "burst")
        if pacing not in PACING_VALUES:
            await self._close(
                IngestError(IngestErrorCode.BAD_CONFIG, f"pacing {pacing!r} must be one of {', '.join(PACING_VALUES)}")
            )
            return
        if stats_interval_ms != 0 and stats_interval_ms < MIN_STATS_INTERVAL_MS:
            await self._close(
                IngestError(
                    IngestErrorCode.BAD_CONFIG,
                    f"stats_interval_ms {stats_interval_ms} must be 0 (stats only on request) "
                    f"or at least {MIN_STATS_INTERVAL_MS}",
                )
            )
            return
        self.input = AudioInput(
            runtime,
            WS_SOURCE,
            pcm_format,
            max_message_bytes=self.config.max_message_bytes,
            utterance_gap_ms=self.config.utterance_gap_ms,
            realtime_paced=pacing == "realtime",
        )
        self.pacing = pacing
        previous = self.registry.get(self.session_id)
        if previous is not None:
            # One audio connection per session: a reconnecting client takes over from its stale socket.
            await previous._close(
                IngestError(IngestErrorCode.REPLACED, "a newer audio connection for this session took over")
            )
        self.registry[self.session_id] = self
        remove_listener = runtime.add_listener(self)
        self.host.audio_client_joined(self.session_id)
        self._sender = asyncio.create_task(self._send_loop())
        helpers = [asyncio.create_task(self._watch_session_end())]
        if stats_interval_ms > 0:
            helpers.append(asyncio.create_task(self._stats_loop(stats_interval_ms)))
        self.outbox.put_nowait(
            ready_message(
                self.session_id,
                pcm_format,
                max_message_bytes=self.config.max_message_bytes,
                buffer_limit_ms=runtime.config.buffer_limit_ms,
                lookahead_ms=LOOKAHEAD_MS,
            )
        )
        try:
            await self._receive_loop()
        finally:
            if self.registry.get(self.session_id) is self:
                del self.registry[self.session_id]
            remove_listener()
            self.input.close()  # what the client sent still plays
            self.host.audio_client_left(self.session_id)
            for helper in helpers:
                helper.cancel()
            await self._close(None)

    async def _watch_session_end(self) -> None:
        """Tell the client when its session ends (stop, idle timeout, teardown) and close the socket."""
        session = self.host.sessions.get(self.session_id)
        if session is not None:
            await session.stop_event.wait()
        await self._close(
            IngestError(IngestErrorCode.SESSION_ENDED, f"session {self.session_id} has ended", fatal=True)
        )

    async def _receive_loop(self) -> None:
        assert self.input is not None
        while not self._closing:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            if self._closing:
                self._refuse_late(message)
                return
            try:
                if message.get("bytes") is not None:
                    self.input.push(message["bytes"])
                    while self.input.rate_warnings:
                        self.outbox.put_nowait(suspect_sample_rate_message(self.input.rate_warnings.pop(0)))
                elif message.get("text") is not None:
                    self._handle_text(message["text"])
            except IngestError as exc:
                if exc.fatal:
                    await self._close(exc)
                    return
                self.outbox.put_nowait(exc.to_message())
            except Exception:
                # A defect, not bad input: the client still gets a code and a sentence (not a bare drop),
                # the traceback goes to the log, and the session itself (other clients, the clock) goes on.
                logger.exception("audio message handling failed", extra={"session_id": self.session_id})
                error = IngestError(
                    IngestErrorCode.INTERNAL_ERROR,
                    "the sidecar failed to handle this message (a bug, logged); reconnect to go on",
                    fatal=True,
                )
                await self._close(error)
                return

    def _refuse_late(self, message: dict[str, Any]) -> None:
        """Audio that arrived while the connection was closing is not played: count it as rejected."""
        assert self.input is not None
        payload = message.get("bytes")
        if not payload:
            return
        reason = self._close_error
        code = reason.code if reason is not None else IngestErrorCode.SESSION_ENDED
        pcm_format = self.input.pcm_format
        with contextlib.suppress(IngestError):
            self.input.reject(
                IngestError(
                    code,
                    "binary message arrived while the connection was closing; the message was rejected",
                    rejected_samples=pcm_format.to_timeline_samples(len(payload) // pcm_format.bytes_per_frame),
                )
            )

    def _handle_text(self, text: str) -> None:
        assert self.input is not None
        parsed = parse_client_text(text, self.input.pcm_format)
        if isinstance(parsed, ConfigMessage):
            self.input.set_format(parsed.pcm_format)
            self.outbox.put_nowait({"type": "config_applied", "format": parsed.pcm_format.as_dict()})
        elif isinstance(parsed, EndOfUtterance):
            self.input.end_utterance()
        elif isinstance(parsed, Interrupt):
            self.input.interrupt()
        elif isinstance(parsed, StatsRequest):
            runtime = self.host.runtime(self.session_id)
            if runtime is not None:
                self.outbox.put_nowait({"type": "stats", **stats_dict(runtime.stats())})


class LiveKitBody(BaseModel):
    url: str
    room: str
    identity: str
    token: str
    publish_audio: bool = True
    publish_on_behalf: str | None = None


class DevSessionBody(BaseModel):
    avatar_path: str
    avatar_kind: str = "frames_zip"
    livekit: LiveKitBody
    idle_timeout_s: float = Field(default=300.0, gt=0)
    max_duration_s: float = Field(default=3600.0, gt=0)


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **extra}


def _install_error_bodies(app: FastAPI) -> None:
    """Errors of the dev HTTP API as `{code, message}` (+ `fields` for a malformed body), like the API edge's."""

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
        return JSONResponse(_error("validation_error", f"invalid request: {listed}", fields=fields), status_code=422)


class ServiceCredentialGate:
    """ASGI middleware: an HTTP request without the service credential gets 401 before routing or reading
    its body (so an unauthenticated caller costs no parsing). `/healthz` passes, and shows details only
    with the credential; WebSockets pass to their route, which checks the credential or an audio token."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != LIVENESS_PATH:
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            if not is_service_credential(self.secret, headers.get("authorization")):
                response = JSONResponse(
                    _error("unauthorized", "this sidecar route needs the service credential (Authorization: Bearer)"),
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
    run_tasks: dict[str, asyncio.Task[Any]] = {}
    audio_connections: dict[str, _AudioConnection] = {}

    @app.get("/healthz")  # LIVENESS_PATH: open without a credential
    async def healthz(request: Request) -> dict[str, Any]:
        if not is_service_credential(secret, request.headers.get("authorization")):
            return {"status": "ok"}  # session ids, addresses and capacity only for the service
        info = host.engine_info()
        capacity = host.capacity()
        sessions = {
            session_id: stats_dict(session.runtime.stats()) if session.runtime else {"phase": "preparing"}
            for session_id, session in host.sessions.items()
        }
        cache_dir = server_config.avatar_cache_dir
        cache_bytes = await asyncio.to_thread(store_bytes, cache_dir) if cache_dir is not None else 0
        return {
            "status": "ok",
            "engine": dataclasses.asdict(info),
            "capacity": dataclasses.asdict(capacity),
            "render_lane": host.lane_report(),
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
        audio_input = None
        if connection is not None and connection.input is not None:
            # The direct connection's declared format: /debug/audio shows it for every connection (not only relayed).
            audio_input = {
                "format": connection.input.pcm_format.as_dict(),
                "pacing": connection.pacing,
                "messages_accepted": connection.input.messages_accepted,
            }
        return stats_dict(runtime.stats()) | {"audio_input": audio_input}

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio_ws(websocket: WebSocket, session_id: str) -> None:
        refusal = _audio_refusal(websocket, session_id, secret)
        await _AudioConnection(websocket, host, session_id, server_config, audio_connections).serve(refusal)

    @app.websocket("/audio")
    async def audio_ws_seed(websocket: WebSocket) -> None:
        session_id = websocket.query_params.get("session_id", "")
        refusal = _audio_refusal(websocket, session_id, secret)
        await _AudioConnection(websocket, host, session_id, server_config, audio_connections).serve(refusal)

    if server_config.dev_api:
        _add_dev_api(app, host, server_config, run_tasks)
    return app


def _dev_policy_refusal(body: DevSessionBody, config: ServerConfig) -> tuple[JSONResponse | None, Path]:
    """The dev API opens avatars only under `dev_avatar_dir` and publishes only to `dev_livekit_urls`.

    Returns (refusal or None, the resolved avatar path). Symlinks are resolved before the check, so a link
    inside the directory that points out of it is refused too.
    """
    root = config.dev_avatar_dir
    path = Path(body.avatar_path).resolve()
    if root is None or not Path(body.avatar_path).is_absolute() or not path.is_relative_to(root.resolve()):
        refusal = JSONResponse(
            _error(
                "avatar_path_refused",
                "avatar_path must be an absolute path inside the sidecar's --dev-avatar-dir"
                + ("" if root is not None else " (none is configured, so the dev API opens no avatar)"),
            ),
            status_code=403,
        )
        return refusal, path
    if body.livekit.url not in config.dev_livekit_urls:
        refusal = JSONResponse(
            _error("livekit_url_refused", "livekit.url is not one of the sidecar's --dev-livekit-url values"),
            status_code=403,
        )
        return refusal, path
    return None, path


def _add_dev_api(app: FastAPI, host: SidecarHost, server_config: ServerConfig, run_tasks: dict[str, Any]) -> None:
    @app.post("/v1/sessions/{session_id}")
    async def dev_start(session_id: str, body: DevSessionBody) -> JSONResponse:
        refused, path = _dev_policy_refusal(body, server_config)
        if refused is not None:
            return refused
        try:
            prepared = await host.prepare_avatar(
                session_id, AvatarAsset(path=path, kind=body.avatar_kind, digest_sha256=""), lambda _p: None
            )
            warm = await host.warm_up()
            target = OutputTarget(LIVEKIT.name, LiveKitTarget(**body.livekit.model_dump()))
            opened = await host.open_output(session_id, target)
        except (SidecarError, OutputError) as exc:
            await host.teardown(session_id)
            return JSONResponse({"code": exc.code, "message": exc.message}, status_code=409)
        except Exception as exc:
            await host.teardown(session_id)
            code = exc.code if isinstance(exc, LipsyncError) else "prepare_failed"
            return JSONResponse({"code": code, "message": str(exc)}, status_code=422)
        limits = RunLimits(idle_timeout_s=body.idle_timeout_s, max_duration_s=body.max_duration_s)

        async def run_then_teardown() -> None:
            try:
                await host.run_session(session_id, limits, lambda _s: None)
            finally:
                await host.teardown(session_id)
                run_tasks.pop(session_id, None)

        run_tasks[session_id] = asyncio.create_task(run_then_teardown())
        return JSONResponse(
            {
                "session_id": session_id,
                "avatar": dataclasses.asdict(prepared) | {"cache_dir": str(prepared.cache_dir)},
                "engine": dataclasses.asdict(warm),
                "output": {"kind": str(opened.kind), "detail": opened.detail},
                "audio_ws": f"/v1/sessions/{session_id}/audio",
            }
        )

    @app.delete("/v1/sessions/{session_id}")
    async def dev_stop(session_id: str) -> dict[str, Any]:
        if session_id not in host.sessions:
            raise HTTPException(404, detail=_error("unknown_session", f"no session {session_id}"))
        await host.stop_session(session_id, SessionEndReason.STOPPED)
        task = run_tasks.get(session_id)
        if task is not None:
            await task
        else:
            await host.teardown(session_id)
        return {"session_id": session_id, "stopped": True}
