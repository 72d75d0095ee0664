"""End to end through the API only: start -> WS speech -> a LiveKit subscriber sees the lips move and hears
the
speech -> stop -> completed, with one trace id from the HTTP request to the sidecar's activities.

Real services: Temporal dev server, livekit-server; the production control worker (Harness), the
production sidecar (`realtime.sidecar.process.serve` with `run_sidecar_worker`, CPU preview engine)
and the API served by uvicorn. Everything runs in this process so one in-memory span exporter
sees every span.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soxr
import websockets

from infra.demo import speech_pcm
from infra.livekit import LiveKitServerConfig
from infra.temporal import TemporalDevServerConfig
from tests.api.tracing_support import span_exporter, span_names
from tests.support.api_stack import AVATAR_SIDE_PX, api_stack, gray
from tests.support.avcheck import RoomRecorder, align, envelope_correlation
from tests.support.temporal_harness import Harness

pytestmark = pytest.mark.service

KEY = "e2e-key"
AUTH = {"X-API-Key": KEY}
ADMIN_AUTH = {"X-API-Key": "e2e-admin-key"}
SENTENCE = "Hello there. The quick brown fox jumps over the lazy dog, and this is a lip sync test."
RATE_HZ = 16_000
CHUNK_MS = 100
SIDE_PX = AVATAR_SIDE_PX
LIVEKIT = {"livekit": {"room": "e2e-relay-room"}}


@dataclass
class World:
    api: httpx.AsyncClient
    api_url: str
    harness: Harness
    livekit: LiveKitServerConfig
    avatar_url: str


@pytest.fixture
async def world(
    temporal_dev_server: TemporalDevServerConfig, livekit_server: LiveKitServerConfig, tmp_path: Path
) -> AsyncIterator[World]:
    span_exporter()
    admin_keys = (ADMIN_AUTH["X-API-Key"],)
    async with (
        api_stack(
            temporal_dev_server, livekit_server, tmp_path, api_keys=(KEY,), admin_keys=admin_keys
        ) as stack,
        httpx.AsyncClient(base_url=stack.api_url, headers=AUTH, timeout=30) as api,
    ):
        yield World(api, stack.api_url, stack.harness, stack.livekit, stack.avatar_url)


async def next_event(ws: Any, kind: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        if isinstance(message, str):
            event: dict[str, Any] = json.loads(message)
            assert event.get("type") != "error", event
            if event.get("type") == kind:
                return event


async def wait_phase(
    api: httpx.AsyncClient, session_id: str, phases: set[str], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = (await api.get(f"/v1/sessions/{session_id}")).json()
        if body["phase"] in phases:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def test_a_session_through_the_api_only(world: World) -> None:
    api = world.api
    room = "e2e-api-room"
    created = await api.post(
        "/v1/sessions",
        json={"avatar": {"frames_zip_url": world.avatar_url}, "output": {"livekit": {"room": room}}},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    session_id, trace_id = body["session_id"], created.headers["X-Trace-Id"]
    world.harness.workflow_ids.append(f"session-{session_id}")
    token = (await api.post("/v1/livekit/token", json={"room": room, "identity": "e2e-viewer"})).json()
    viewer = RoomRecorder(
        mouth_box=(0, 0, SIDE_PX, SIDE_PX)
    )  # the whole frame: the face is still but the mouth
    await viewer.connect(token["url"], token["token"])
    pcm = speech_pcm(SENTENCE)
    try:
        async with websockets.connect(body["audio_ws_url"], additional_headers=AUTH) as ws:
            ready = await next_event(ws, "ready", timeout_s=90)  # the relay answers once the session is live
            assert ready["session_id"] == session_id
            await viewer.wait_for(lambda: len(viewer.frames) >= 25 and len(viewer.audio_chunks) >= 50, 30)
            await asyncio.sleep(1.0)  # idle frames before the speech
            chunk = RATE_HZ * 2 * CHUNK_MS // 1000
            started_s = time.monotonic()
            for index, offset in enumerate(range(0, len(pcm), chunk)):
                await asyncio.sleep(max(0.0, started_s + index * CHUNK_MS / 1000 - time.monotonic()))
                await ws.send(pcm[offset : offset + chunk])
            await ws.send(json.dumps({"type": "end_of_utterance"}))
            started = await next_event(ws, "playback_started")
            finished = await next_event(ws, "playback_finished")
            await asyncio.sleep(1.0)
            debug = (await api.get("/debug/audio", params={"session_id": session_id})).json()
            debug_all = (
                await api.get("/debug/audio", headers=ADMIN_AUTH)
            ).json()  # every session: admins only
            metrics = (await api.get("/metrics", headers=ADMIN_AUTH)).text
        stopped = await api.post(f"/v1/sessions/{session_id}/stop", json={"reason": "e2e done"})
        final = await wait_phase(api, session_id, {"completed", "failed", "cancelled"}, 30)
    finally:
        await viewer.close()

    # The session's life, as the API reports it.
    assert stopped.status_code == 200 and stopped.headers["X-Trace-Id"] == trace_id
    assert final["phase"] == "completed" and final["end_reason"] == "stopped", final
    assert final["output"] == "livekit" and final["error"] is None
    assert finished["interrupted"] is False
    assert abs(finished["playback_position"] - len(pcm) / 2 / RATE_HZ) < 0.05

    # /debug/audio: every byte relayed, every sample accounted for at the sidecar.
    relay, ingest = debug["relay"], debug["ingest"]
    assert relay["state"] == "connected" and relay["bytes_to_sidecar"] == len(pcm)
    assert ingest["audio_samples_received"] == len(pcm) // 2
    assert ingest["audio_samples_received"] == (
        ingest["audio_samples_rendered"]
        + ingest["audio_samples_pending"]
        + ingest["audio_samples_rejected"]
        + ingest["audio_samples_flushed"]
    )
    assert ingest["audio_samples_rejected"] == 0
    assert debug["publishers"]["livekit"]["connected"] is True
    every = debug_all["sessions"][session_id]
    assert every["relay"]["bytes_to_sidecar"] == len(pcm) and every["sidecar_stats"]["frames_published"] > 0
    ttff = re.search(
        rf'lipsync_session_ttff_ms{{session_id="{session_id}",sidecar="[^"]+"}} ([0-9.e+]+)', metrics
    )
    assert ttff is not None and 0 < float(ttff.group(1)) < 2000, metrics
    labels = rf'kind="received",session_id="{session_id}",sidecar="[^"]+"'
    pattern = rf"lipsync_session_audio_samples_total{{{labels}}} (\S+)"
    received = re.search(pattern, metrics)
    assert received is not None and float(received.group(1)) == len(pcm) // 2, metrics
    assert 'lipsync_sessions{phase="live"}' in metrics
    # The sidecar's send-side A/V offset (last frame sent; positive = video late), measured once speech went
    # out.
    av_offset = re.search(
        rf'lipsync_session_av_offset_ms{{session_id="{session_id}",sidecar="[^"]+"}} (\S+)', metrics
    )
    assert av_offset is not None and abs(float(av_offset.group(1))) < 1000, metrics

    # The subscriber saw the lips move with the speech and rest before it.
    n0 = int(started["frame_id"])
    speech = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    per_frame = speech[: len(speech) // 640 * 640].reshape(-1, 640)
    level = np.sqrt((per_frame**2).mean(axis=1))
    loud = {n0 + k for k in np.nonzero(level > 0.3 * level.max())[0]}
    # Full-size frames only (a WebRTC receiver may get a smaller layer while bandwidth ramps up).
    full = [f for f in viewer.frames if (f.width_px, f.height_px) == (SIDE_PX, SIDE_PX)]
    idle = [f for f in full if f.frame_id < n0 - 2]
    spoken = [f for f in full if f.frame_id in loud]
    assert len(idle) >= 25 and len(spoken) >= 20, (
        len(idle),
        len(spoken),
        {(f.width_px, f.height_px) for f in viewer.frames},
    )
    reference = np.median(np.stack([gray(f.mouth) for f in idle[-25:]]), axis=0)

    def change(frame: Any) -> float:
        return float(np.percentile(np.abs(gray(frame.mouth) - reference), 99.5))

    idle_change = float(np.median([change(f) for f in idle[-25:]]))
    speech_change = float(np.median([change(f) for f in spoken]))
    assert speech_change > max(2.0 * idle_change, 12.0), (speech_change, idle_change)

    # ... and heard the speech: the received audio's envelope follows what was sent.
    sent48 = np.asarray(soxr.resample(speech, RATE_HZ, 48_000), dtype=np.float32)
    heard = viewer.audio()
    lag, _ = align(heard, sent48)
    assert envelope_correlation(heard, sent48, lag) >= 0.85

    # One trace: the HTTP request, the workflow, control and sidecar activities, the audio relay and the stop.
    names = set(span_names(trace_id))
    expected = {
        "POST /v1/sessions",
        "StartWorkflow:SessionWorkflow",
        "RunWorkflow:SessionWorkflow",
        "RunActivity:fetch_assets",
        "RunActivity:validate_assets",
        "RunActivity:prepare_avatar",
        "RunActivity:open_output",
        "RunActivity:run_session",
        "RunActivity:teardown",
        "session.audio",
        "session.stop",
    }
    assert expected <= names, sorted(expected - names)


async def test_audio_relay_auth_failure_and_interrupt(world: World) -> None:
    api = world.api
    # No key: the handshake is refused.
    ws_url = f"ws://{world.api_url.removeprefix('http://')}/v1/sessions/whatever/audio"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url):
            pass
    assert refused.value.response.status_code == 403

    # A session that fails before it is live: the relay says why, with the session's error code.
    missing = world.avatar_url.replace("/astronaut.zip", "/missing.zip")
    failing = (
        await api.post("/v1/sessions", json={"avatar": {"frames_zip_url": missing}, "output": LIVEKIT})
    ).json()
    world.harness.workflow_ids.append(f"session-{failing['session_id']}")
    async with websockets.connect(failing["audio_ws_url"], additional_headers=AUTH) as ws:
        error = json.loads(await asyncio.wait_for(ws.recv(), 30))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert error["type"] == "error" and error["code"] == "asset_http_error", error
    assert ws.close_code == 1011

    # Interrupt through the API cuts the utterance being played.
    created = await api.post(
        "/v1/sessions", json={"avatar": {"frames_zip_url": world.avatar_url}, "output": LIVEKIT}
    )
    session_id = created.json()["session_id"]
    world.harness.workflow_ids.append(f"session-{session_id}")
    pcm = speech_pcm(SENTENCE)
    # audio_ws_url carries the session's audio token: the client streams without any key.
    assert "token=" in created.json()["audio_ws_url"]
    async with websockets.connect(created.json()["audio_ws_url"]) as ws:
        # The whole utterance at once, before the session is even live: the relay keeps it and forwards it
        # first.
        await ws.send(pcm)
        await next_event(ws, "ready", timeout_s=90)
        await next_event(ws, "playback_started")
        await asyncio.sleep(1.0)
        interrupted = await api.post(f"/v1/sessions/{session_id}/interrupt")
        finished = await next_event(ws, "playback_finished")
        debug = (await api.get("/debug/audio", params={"session_id": session_id})).json()
    await api.post(f"/v1/sessions/{session_id}/stop")
    final = await wait_phase(api, session_id, {"completed", "failed", "cancelled"}, 30)
    assert interrupted.status_code == 200 and interrupted.json() == {
        "session_id": session_id,
        "interrupted": True,
    }
    assert interrupted.headers["X-Trace-Id"] == created.headers["X-Trace-Id"]
    assert finished["interrupted"] is True
    assert 0.5 < finished["playback_position"] < len(pcm) / 2 / RATE_HZ - 1.0, finished
    assert debug["relay"]["early_bytes"] == len(pcm) == debug["relay"]["bytes_to_sidecar"]
    ingest = debug["ingest"]
    assert ingest["audio_samples_received"] == len(pcm) // 2
    assert ingest["audio_samples_flushed"] > 0
    assert ingest["audio_samples_received"] == (
        ingest["audio_samples_rendered"]
        + ingest["audio_samples_pending"]
        + ingest["audio_samples_rejected"]
        + ingest["audio_samples_flushed"]
    )
    assert final["phase"] == "completed"


async def test_the_seed_orchestrator_streams_to_audio_on_the_api(world: World) -> None:
    """The seed opens `/audio?session_id=` on the service it called `/session/start` on: the API relays it
    like
    `/v1/sessions/{id}/audio` (same auth, same protocol); the start response names the avatar's identity."""
    api = world.api
    base = f"ws://{world.api_url.removeprefix('http://')}"
    with pytest.raises(websockets.InvalidStatus) as refused:  # no key: refused like the other route
        async with websockets.connect(f"{base}/audio?session_id=whatever"):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(f"{base}/audio", additional_headers=AUTH) as ws:
        missing = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert missing["code"] == "missing_session_id" and ws.close_code == 1008, missing

    started = await api.post("/session/start", json={"room": "seed-room", "frames_zip_url": world.avatar_url})
    assert started.status_code == 200, started.text
    body = started.json()
    session_id = body["session_id"]
    world.harness.workflow_ids.append(f"session-{session_id}")
    assert (
        body["livekit"]["identity"] == f"avatar-{session_id}"
    )  # what an agent passes as destination_identity
    pcm = speech_pcm(SENTENCE)[: RATE_HZ * 2]  # 1 s
    async with websockets.connect(
        f"{base}/audio?session_id={session_id}&sample_rate={RATE_HZ}", additional_headers=AUTH
    ) as ws:
        ready = await next_event(ws, "ready", timeout_s=90)
        await ws.send(pcm)
        await ws.send(json.dumps({"type": "end_of_utterance"}))
        finished = await next_event(ws, "playback_finished")
    await api.post(f"/v1/sessions/{session_id}/stop")
    await wait_phase(api, session_id, {"completed", "failed", "cancelled"}, 30)
    assert ready["session_id"] == session_id and ready["format"]["sample_rate"] == RATE_HZ
    assert finished["interrupted"] is False
    assert finished["playback_position"] == pytest.approx(len(pcm) / 2 / RATE_HZ, abs=0.001)
