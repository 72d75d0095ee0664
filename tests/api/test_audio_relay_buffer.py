"""The audio relay's early buffer: what a caller sends before the session is live is bounded.

No Temporal here: the relay is given a session that stays `placing`, so everything the caller
sends is held; past the limit the caller gets `error buffer_full` and a 1008 close.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from api import audio_relay
from api.audio_relay import RelayRegistry, relay_audio
from api.sidecars import SidecarDirectory
from realtime.ingest.ws_close import CLOSE_POLICY_VIOLATION
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


class _FloodingCaller:
    """A caller that sends 64 KiB PCM messages as fast as it is read."""

    def __init__(self) -> None:
        self.sent = 0

    async def receive(self) -> dict[str, Any]:
        self.sent += 1
        await asyncio.sleep(0)
        return {"type": "websocket.receive", "bytes": bytes(64 * 1024)}


async def test_once_live_a_slow_sidecar_pauses_reading_instead_of_queueing_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audio_relay, "LIVE_QUEUE_MAX_BYTES", 256 * 1024)
    caller = _FloodingCaller()
    relay = audio_relay.RelayState(session_id="s1")
    relay.upstream = object()  # type: ignore[assignment]  # live: the sidecar is connected (and not reading)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    drained = asyncio.Event()
    reader = asyncio.create_task(audio_relay._read_client(caller, inbox, relay, drained))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.2)
        # 256 KiB held plus the message that crossed the line; the caller is no longer read (TCP pushes back).
        assert relay.queued_bytes == 5 * 64 * 1024 and inbox.qsize() == 5 and caller.sent == 5
        assert relay.reader_pauses == 1 and not reader.done()
        for _ in range(3):  # the sidecar takes three messages: the reader goes on, up to the bound again
            audio_relay._taken(relay, inbox.get_nowait(), drained)
        await asyncio.sleep(0.1)
        assert relay.queued_bytes == 5 * 64 * 1024 and caller.sent == 8 and relay.reader_pauses == 2
    finally:
        reader.cancel()
