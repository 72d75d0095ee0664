"""The audio relay connects to the session's sidecar before `live`, once the sidecar hosts the session, and
the caller's `ready` comes from the sidecar the moment the output opens (no status polling meanwhile).

A real in-process sidecar (CPU preview engine, outputs recorded in memory) behind the production relay
served by uvicorn; the session's status is scripted (Temporal is not what is tested here): it says the
output is opening on that sidecar and never says `live`, so a `ready` can only come from the early
connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from fastapi import FastAPI, WebSocket

from api.audio_relay import RelayRegistry, relay_audio
from api.sidecars import SidecarDirectory
from tests.support.asgi_server import serve_asgi
from tests.support.credentials import SIDECAR_SECRET
from tests.support.sidecar_harness import (
    RunningSidecar,
    avatar_zip_path,
    sidecar_settings,
    start_sidecar,
    stop_sidecar,
)
from workflows.contracts import Phase, SessionStatus

__all__ = ["avatar_zip_path"]

SIDECAR_ID = "sidecar-early"
PCM_BEFORE_READY = np.full(3200, 1000, dtype="<i2").tobytes()  # 200 ms at 16 kHz, sent before `ready`
QUIET_S = 0.5  # no message reaches the caller while the output is not open


@dataclass
class Script:
    """The session's status as the relay reads it; tests move it on."""

    phase: Phase = Phase.OPENING_OUTPUT
    reads: list[Phase] = field(default_factory=list)

    async def status_of(self, session_id: str) -> SessionStatus:
        self.reads.append(self.phase)
        return SessionStatus(session_id=session_id, room="r", phase=self.phase, sidecar=SIDECAR_ID)


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[RunningSidecar]:
    running, task = await start_sidecar(sidecar_settings(tmp_path / "cache"))
    yield running
    await stop_sidecar(task)


@dataclass
class Relay:
    url: str
    script: Script
    registry: RelayRegistry


@pytest.fixture
async def relay(sidecar: RunningSidecar) -> AsyncIterator[Relay]:
    script = Script()
    registry = RelayRegistry()
    directory = SidecarDirectory({SIDECAR_ID: sidecar.base_url}, secret=SIDECAR_SECRET)
    app = FastAPI()

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio(websocket: WebSocket, session_id: str) -> None:
        await relay_audio(
            websocket,
            session_id,
            status_of=script.status_of,
            sidecars=directory,
            registry=registry,
            live_wait_s=20.0,
            traceparent={},
        )

    try:
        async with serve_asgi(app, name="relay") as base_url:
            yield Relay(base_url.replace("http://", "ws://", 1), script, registry)
    finally:
        await directory.close()


async def next_json(ws: websockets.ClientConnection, timeout_s: float) -> dict[str, Any]:
    document = json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout_s))
    assert isinstance(document, dict)
    return document


async def until_state(relay: Relay, session_id: str, wanted: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := relay.registry.active.get(session_id)) is None or not getattr(state, wanted):
        assert time.monotonic() < deadline, f"relay never had {wanted}: {state}"
        await asyncio.sleep(0.02)


async def test_ready_reaches_the_caller_when_the_output_opens_before_the_status_says_live(
    sidecar: RunningSidecar, relay: Relay, avatar_zip_path: Path
) -> None:
    publisher = await sidecar.prepare_recorded("early", avatar_zip_path)
    async with websockets.connect(f"{relay.url}/v1/sessions/early/audio") as ws:
        await ws.send(PCM_BEFORE_READY)  # kept by the relay, in order, until the sidecar is ready
        await until_state(relay, "early", "early_connects")
        with pytest.raises(TimeoutError):
            await next_json(ws, QUIET_S)
        reads_before_open = len(relay.script.reads)
        await sidecar.open_recorded("early", publisher)
        opened_s = time.monotonic()
        ready = await next_json(ws, 5.0)
        assert ready["type"] == "ready", ready
        # Woken by the output opening, not at the sidecar's wait bound (30 s by default).
        assert time.monotonic() - opened_s < 2.0
        # The relay read the status no more while it held the early connection.
        assert len(relay.script.reads) == reads_before_open
        assert set(relay.script.reads) == {Phase.OPENING_OUTPUT}  # it never saw `live`
        await ws.send(json.dumps({"type": "stats"}))
        stats = await next_json(ws, 5.0)
        while stats["type"] != "stats":
            stats = await next_json(ws, 5.0)
        assert stats["audio_samples_received"] == len(PCM_BEFORE_READY) // 2, stats
    await sidecar.sidecar_host.teardown("early")


async def test_an_early_connection_the_sidecar_refuses_is_not_the_callers_end(
    sidecar: RunningSidecar, relay: Relay, avatar_zip_path: Path
) -> None:
    """The status names a sidecar that does not host the session (it moved): the sidecar refuses the early
    connection, the relay waits again and connects there once the session is live."""
    async with websockets.connect(f"{relay.url}/v1/sessions/moved/audio") as ws:
        await until_state(relay, "moved", "early_refusals")
        with pytest.raises(TimeoutError):
            await next_json(ws, QUIET_S)  # the refusal is not passed on
        publisher = await sidecar.prepare_recorded("moved", avatar_zip_path)
        await sidecar.open_recorded("moved", publisher)
        relay.script.phase = Phase.LIVE
        ready = await next_json(ws, 5.0)
        assert ready["type"] == "ready", ready
        state = relay.registry.active["moved"]
        assert (state.early_connects, state.early_refusals) == (1, 1), state
    await sidecar.sidecar_host.teardown("moved")
