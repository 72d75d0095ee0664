"""The audio relay's closes carry the real code and reason: a dead sidecar is not a normal end.

A real sidecar process (`lipsync sidecar --no-temporal`, CPU preview engine, publishing to the real
livekit-server) behind the production relay (`api.audio_relay.relay_audio`) served by uvicorn.
The session's status is given (live on that sidecar): Temporal is not what is tested here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI, WebSocket

from api.audio_relay import RelayRegistry, relay_audio
from api.sidecars import SidecarDirectory
from infra.livekit import LiveKitServerConfig
from infra.paths import PROJECT_ROOT
from infra.process import free_port, spawn
from tests.support.asgi_server import serve_asgi
from tests.support.avcheck import token
from tests.support.credentials import SIDECAR_SECRET, service_headers
from tests.support.media import frames_zip
from workflows.contracts import Phase, SessionStatus

pytestmark = pytest.mark.service

SIDECAR_ID = "sidecar-relay"
HEALTHY_WITHIN_S = 90.0  # process start + engine warm-up, on two busy cores


@dataclass
class Sidecar:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def sidecar(tmp_path: Path, livekit_server: LiveKitServerConfig) -> AsyncIterator[Sidecar]:
    port = free_port()
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        argv = [
            *(
                sys.executable,
                "-m",
                "infra.cli",
                "sidecar",
                "--no-temporal",
                "--port",
                str(port),
                "--engine",
                "preview",
            ),
            *("--cache-dir", str(tmp_path / "cache"), "--sidecar-id", SIDECAR_ID, "--slots", "1"),
            # The dev control API starts the session here (Temporal is not what is tested), limited to this
            # test's avatar directory and LiveKit server.
            *("--dev-api", "--dev-avatar-dir", str(tmp_path), "--dev-livekit-url", livekit_server.ws_url),
        ]
        process = await asyncio.to_thread(spawn, argv, log=log, cwd=PROJECT_ROOT)
    running = Sidecar(port, process, log_path)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10, trust_env=False) as client:
            deadline = asyncio.get_running_loop().time() + HEALTHY_WITHIN_S
            while True:
                assert process.poll() is None, log_path.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, "the sidecar did not become healthy"
                await asyncio.sleep(0.2)
        yield running
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
async def relay_url(sidecar: Sidecar) -> AsyncIterator[str]:
    """The production relay in front of `sidecar`, for sessions it says are live there."""

    async def live_on_sidecar(session_id: str) -> SessionStatus:
        return SessionStatus(session_id=session_id, room="r", phase=Phase.LIVE, sidecar=SIDECAR_ID)

    app = FastAPI()
    directory = SidecarDirectory({SIDECAR_ID: sidecar.url}, secret=SIDECAR_SECRET)

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio(websocket: WebSocket, session_id: str) -> None:
        await relay_audio(
            websocket,
            session_id,
            status_of=live_on_sidecar,
            sidecars=directory,
            registry=RelayRegistry(),
            live_wait_s=5.0,
            traceparent={},
        )

    async with serve_asgi(app, name="relay") as base_url:
        yield base_url.replace("http://", "ws://", 1)


async def until_closed(ws: websockets.ClientConnection) -> list[dict[str, Any]]:
    """Every JSON message the relay sends until it closes the socket."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            message = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(message, str):
                messages.append(json.loads(message))
    return messages


async def test_a_dead_sidecar_closes_the_client_socket_with_an_error_not_1000(
    sidecar: Sidecar, relay_url: str, livekit_server: LiveKitServerConfig, tmp_path: Path
) -> None:
    avatar = tmp_path / "avatar.zip"
    avatar.write_bytes(frames_zip())
    session_id, room = "relay-death", "room-relay-death"
    identity = f"lipsync-avatar-{session_id}"
    body = {
        "avatar_path": str(avatar),
        "livekit": {
            "url": livekit_server.ws_url,
            "room": room,
            "identity": identity,
            "token": token(livekit_server, identity, room),
        },
    }
    async with httpx.AsyncClient(
        base_url=sidecar.url, timeout=60, trust_env=False, headers=service_headers()
    ) as client:
        started = await client.post(f"/v1/sessions/{session_id}", json=body)
    assert started.status_code == 200, started.text

    async with websockets.connect(f"{relay_url}/v1/sessions/{session_id}/audio") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "ready"
        os.kill(sidecar.process.pid, signal.SIGKILL)  # the sidecar dies mid-session: no close frame
        messages = await until_closed(ws)
    errors = [m for m in messages if m.get("type") == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("sidecar_gone", True)], messages
    assert ws.close_code == 1011 and ws.close_reason == "sidecar_gone", (ws.close_code, ws.close_reason)


async def test_a_fatal_sidecar_close_reaches_the_client_with_its_reason(relay_url: str) -> None:
    """The sidecar refuses an unknown session with 1008 `unknown_session`: the relay passes both on."""
    async with websockets.connect(f"{relay_url}/v1/sessions/no-such-session/audio") as ws:
        messages = await until_closed(ws)
    assert ws.close_code == 1008 and ws.close_reason == "unknown_session", (
        ws.close_code,
        ws.close_reason,
        messages,
    )
    assert any(m.get("type") == "error" and m.get("code") == "unknown_session" for m in messages), messages
