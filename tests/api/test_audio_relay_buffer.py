"""The audio relay's early buffer: what a caller sends before the session is live is bounded.

No Temporal here: the relay is given a session that stays `placing`, so everything the caller
sends is held; past the limit the caller gets `error buffer_full` and a 1008 close.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from api import audio_relay
from api.audio_relay import CLOSE_POLICY_VIOLATION, RelayRegistry, relay_audio
from api.sidecars import SidecarDirectory
from workflows.contracts import Phase, SessionStatus

LIMIT_BYTES = 1000


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setattr(audio_relay, "EARLY_BUFFER_MAX_BYTES", LIMIT_BYTES)
    app = FastAPI()

    async def placing(session_id: str) -> SessionStatus:
        return SessionStatus(session_id=session_id, room="r", phase=Phase.PLACING)

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio(websocket: WebSocket, session_id: str) -> None:
        await relay_audio(
            websocket,
            session_id,
            status_of=placing,
            sidecars=SidecarDirectory({}),
            registry=RelayRegistry(),
            live_wait_s=5.0,  # ample for a refusal that needs no waiting
            traceparent={},
        )

    return app


def buffer_full_after(app: FastAPI, messages: list[Any]) -> dict[str, Any]:
    with TestClient(app) as client, client.websocket_connect("/v1/sessions/s1/audio") as ws:
        for message in messages:
            if isinstance(message, bytes):
                ws.send_bytes(message)
            else:
                ws.send_text(message)
        error: dict[str, Any] = ws.receive_json()
        closed = ws.receive()
    assert closed["type"] == "websocket.close" and closed["code"] == CLOSE_POLICY_VIOLATION, closed
    return error


def test_pcm_past_the_limit_before_live_is_refused(app: FastAPI) -> None:
    error = buffer_full_after(app, [bytes(600), bytes(600)])
    assert error["type"] == "error" and error["code"] == "buffer_full", error


def test_text_messages_count_toward_the_limit_too(app: FastAPI) -> None:
    # Text is held in the same queue; left uncounted, a caller could grow it without bound.
    config = '{"type": "config", "sample_rate": 16000, "padding": "' + "x" * 300 + '"}'
    error = buffer_full_after(app, [config] * 4)
    assert error["type"] == "error" and error["code"] == "buffer_full", error
