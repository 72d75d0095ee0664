"""Sessions: POST /v1/sessions, GET /v1/sessions[/{id}], POST .../{id}/stop|interrupt, WS .../{id}/audio."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, WebSocket
from temporalio.client import Client

from api.audio_relay import presented_ws_key, relay_audio
from api.auth import Principal, principal_for, require_api_key
from api.deps import Services, services, temporal_client
from api.errors import ApiError
from api.models import CreateSessionIn, ErrorOut, SessionCreated, SessionList, SessionOut, StopIn
from api.sessions import MEMO_TRACEPARENT, SessionService, namespaced_room
from api.tracing import TRACE_ID_HEADER, current_traceparent, session_span, trace_id_of
from realtime.ingest.ws_close import ws_close_code
from workflows.contracts import SessionStatus
from workflows.sidecar_tokens import AUDIO_TOKEN_PARAM, audio_token_valid

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or invalid API key"},
    404: {"model": ErrorOut, "description": "no such session"},
    503: {"model": ErrorOut, "description": "Temporal unreachable"},
}

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=_ERRORS)
ws_router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
seed_ws_router = APIRouter(tags=["sessions"])

ClientDep = Annotated[Client, Depends(temporal_client)]
ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(require_api_key)]


def _set_trace(response: Response, traceparent: str | None) -> None:
    trace_id = trace_id_of(traceparent) if traceparent else None
    if trace_id:
        response.headers[TRACE_ID_HEADER] = trace_id


@router.post(
    "",
    status_code=201,
    response_model=SessionCreated,
    responses={
        400: {"model": ErrorOut, "description": "URL refused (url_invalid, url_forbidden_address)"},
        403: {"model": ErrorOut, "description": "room in another tenant's namespace (room_not_allowed)"},
        409: {"model": ErrorOut, "description": "a session with this id exists (session_exists)"},
    },
)
async def create_session(
    body: CreateSessionIn, principal: PrincipalDep, client: ClientDep, svc: ServicesDep
) -> SessionCreated:
    """Start a session, owned by the caller's tenant. Stream PCM to `audio_ws_url` once it answers `ready`."""
    try:
        created = await svc.sessions.create(client, body, principal)
    except ApiError as exc:
        svc.metrics.sessions_started.labels(result=exc.code).inc()
        raise
    svc.metrics.sessions_started.labels(result="started").inc()
    return created


@router.get("", response_model=SessionList)
async def list_sessions(  # noqa: PLR0917 (FastAPI parameters)
    principal: PrincipalDep,
    client: ClientDep,
    svc: ServicesDep,
    room: Annotated[str | None, Query(max_length=128)] = None,
    phase: Annotated[str | None, Query(max_length=32)] = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 100,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
) -> SessionList:
    """The caller's sessions (an admin's: all), newest first; filter by `room` and `phase` (search
    attributes)."""
    if room is not None:
        room = namespaced_room(principal, room, svc.settings.tenants)  # as the room was named at create
    return await svc.sessions.list(
        client, room=room, phase=phase, page_size=page_size, page_token=page_token, principal=principal
    )


@router.get("/{session_id}", response_model=SessionOut)
async def get_session(
    session_id: str, principal: PrincipalDep, client: ClientDep, svc: ServicesDep, response: Response
) -> SessionOut:
    """Phase, output, sidecar, the latest stats, and the error code + message of a failed session."""
    await svc.sessions.ensure_owner(client, session_id, principal)
    out = await svc.sessions.session_out(client, session_id)
    if out.trace_id:
        response.headers[TRACE_ID_HEADER] = out.trace_id
    return out


def _status_body(status: SessionStatus, sessions: SessionService) -> dict[str, Any]:
    body = dataclasses.asdict(status)
    body["phase"] = status.phase.value
    body["temporal_ui_url"] = sessions.temporal_ui_url(status.session_id)
    return body


@router.post("/{session_id}/stop")
async def stop_session(  # noqa: PLR0917 (FastAPI parameters)
    session_id: str,
    principal: PrincipalDep,
    client: ClientDep,
    svc: ServicesDep,
    response: Response,
    body: StopIn | None = None,
) -> dict[str, Any]:
    """Stop the session (idempotent); it tears down and completes with end reason `stopped`."""
    await svc.sessions.ensure_owner(client, session_id, principal)
    _, memo = await svc.sessions.memo(client, session_id)
    traceparent = memo.get(MEMO_TRACEPARENT) or None
    with session_span("session.stop", traceparent, **{"lipsync.session_id": session_id}):
        status = await svc.sessions.stop(client, session_id, body.reason if body else "")
    _set_trace(response, traceparent)
    return _status_body(status, svc.sessions)


@router.post(
    "/{session_id}/interrupt",
    responses={409: {"model": ErrorOut, "description": "no audio connection for this session on this API"}},
)
async def interrupt_session(
    session_id: str, principal: PrincipalDep, client: ClientDep, svc: ServicesDep, response: Response
) -> dict[str, Any]:
    """Cut the current utterance: queued audio and frames are flushed, the avatar returns to idle.

    Goes through the session's audio connection (the hot path): the caller must be streaming
    via this API's `audio_ws_url`. A caller connected to the sidecar directly sends
    `{"type": "interrupt"}` on its own socket instead.
    """
    await svc.sessions.ensure_owner(client, session_id, principal)
    _, memo = await svc.sessions.memo(client, session_id)
    traceparent = memo.get(MEMO_TRACEPARENT) or None
    with session_span("session.interrupt", traceparent, **{"lipsync.session_id": session_id}):
        sent = await svc.relays.interrupt(session_id)
    _set_trace(response, traceparent)
    if not sent:
        raise ApiError(
            "no_audio_connection",
            f"session {session_id!r} has no audio connection through this API: "
            'send {"type": "interrupt"} on the audio WebSocket',
            headers={k: v for k, v in response.headers.items() if k.lower() == TRACE_ID_HEADER.lower()},
        )
    return {"session_id": session_id, "interrupted": True}


@ws_router.websocket("/{session_id}/audio")
async def session_audio(websocket: WebSocket, session_id: str) -> None:
    """PCM in, playback events out, relayed to the session's sidecar once it is live.

    The protocol is the sidecar's: docs/audio-protocol.md.
    """
    svc: Services = websocket.app.state.services
    key = presented_ws_key(websocket)
    token = websocket.query_params.get(AUDIO_TOKEN_PARAM)
    # An API key, or the audio token of this session's audio_ws_url (the client then holds no secret).
    by_token = bool(token and svc.settings.sidecar_secret) and audio_token_valid(
        svc.settings.sidecar_secret, token or "", session_id, time.time()
    )
    principal = None if by_token or key is None else principal_for(svc.settings, key)
    if not by_token and principal is None:
        await websocket.close(ws_close_code("unauthorized"), reason="unauthorized")
        return
    client = await svc.temporal.client()
    foreign = False  # another tenant's session answers as one that does not exist
    if principal is not None:
        try:
            await svc.sessions.ensure_owner(client, session_id, principal)
        except ApiError as exc:
            if exc.code != "not_found":
                raise
            foreign = True

    async def status_of(sid: str) -> SessionStatus | None:
        if foreign:
            return None
        try:
            return await svc.sessions.light_status(client, sid)
        except ApiError as exc:
            if exc.code == "not_found":
                return None
            raise

    try:
        _, memo = await svc.sessions.memo(client, session_id)
    except ApiError:
        memo = {}
    traceparent = memo.get(MEMO_TRACEPARENT) or None
    with session_span("session.audio", traceparent, **{"lipsync.session_id": session_id}):
        await relay_audio(
            websocket,
            session_id,
            status_of=status_of,
            sidecars=svc.sidecars,
            registry=svc.relays,
            live_wait_s=svc.settings.live_wait_s,
            traceparent=current_traceparent(),
        )


@seed_ws_router.websocket("/audio")
async def seed_audio(websocket: WebSocket) -> None:
    """The seed orchestrator's address for a session's audio, `/audio?session_id=` (it opens `/audio` on the
    service it called `/session/start` on): the same relay, auth and protocol as `/v1/sessions/{id}/audio`."""
    session_id = websocket.query_params.get("session_id", "")
    svc: Services = websocket.app.state.services
    key = presented_ws_key(websocket)
    if session_id or key is None or principal_for(svc.settings, key) is None:
        await session_audio(
            websocket,
            session_id,
        )  # refuses a missing or wrong key (or token) as that route does
        return
    await websocket.accept()
    await websocket.send_json(
        {
            "type": "error",
            "code": "missing_session_id",
            "message": "give the session as a query parameter: /audio?session_id=<the id /session/start "
            "returned>",
        }
    )
    await websocket.close(ws_close_code("missing_session_id"), reason="missing_session_id")
