"""`lipsync sidecar --no-temporal` as its own process: health, the dev control API, audio in, frames out at a
subscriber."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from infra.paths import PROJECT_ROOT
from infra.process import free_port, spawn, stop_process_group
from tests.support.avcheck import RoomRecorder, token
from tests.support.credentials import audio_token, service_headers

pytestmark = pytest.mark.service


async def wait_healthy(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout_s: float = 60.0
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sidecar process exited during startup"
        try:
            response = await client.get("/healthz")
            if response.status_code == 200:
                return dict(response.json())
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the sidecar did not become healthy")


def start_sidecar_process(
    port: int, tmp_path: Path, log: IO[bytes], *, dev_avatar_dir: Path, livekit_url: str
) -> subprocess.Popen[bytes]:
    """`lipsync sidecar --no-temporal` with the dev control API on, limited to `dev_avatar_dir` and one
    LiveKit URL.

    Tethered (infra.process.spawn): it dies with this test process however that ends."""
    return spawn(
        [
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
            *("--cache-dir", str(tmp_path / "cache"), "--sidecar-id", "sidecar-proc", "--slots", "2"),
            *("--dev-api", "--dev-avatar-dir", str(dev_avatar_dir), "--dev-livekit-url", livekit_url),
        ],
        log=log,
        cwd=PROJECT_ROOT,
    )


async def test_sidecar_process_serves_a_session_end_to_end(
    livekit_server: LiveKitServerConfig, avatar_zip_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "sidecar.log").open("wb")
    proc = start_sidecar_process(
        port, tmp_path, log, dev_avatar_dir=avatar_zip_path.parent, livekit_url=livekit_server.ws_url
    )
    room, session_id = "room-process", "proc-1"
    recorder = RoomRecorder(mouth_box=(0, 0, 16, 16))
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=service_headers()
        ) as client:
            health = await wait_healthy(client, proc)
            assert health["engine"]["name"] == "preview" and health["engine"]["warm"] is True
            assert health["capacity"] == {
                "sidecar_id": "sidecar-proc",
                "task_queue": "sidecar-proc",
                "slots_total": 2,
                "slots_free": 2,
            }
            await recorder.connect(livekit_server.ws_url, token(livekit_server, "viewer", room))
            identity = f"lipsync-avatar-{session_id}"
            body = {
                "avatar_path": str(avatar_zip_path),
                "livekit": {
                    "url": livekit_server.ws_url,
                    "room": room,
                    "identity": identity,
                    "token": token(livekit_server, identity, room),
                },
            }
            started = await client.post(f"/v1/sessions/{session_id}", json=body)
            assert started.status_code == 200, started.text
            assert started.json()["output"] == {"kind": "livekit", "detail": room}
            assert started.json()["avatar"]["width_px"] == 256
            await recorder.wait_for(lambda: len(recorder.frames) >= 10, 20)

            audio_url = (
                f"ws://127.0.0.1:{port}/v1/sessions/{session_id}/audio?token={audio_token(session_id)}"
            )
            async with websockets.connect(audio_url) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                t = np.arange(16_000) / 16_000
                await ws.send((0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2").tobytes())
                await ws.send(json.dumps({"type": "end_of_utterance"}))
                while (message := json.loads(await asyncio.wait_for(ws.recv(), 10)))[
                    "type"
                ] != "playback_finished":
                    assert message["type"] != "error", message
                assert message["playback_position"] == pytest.approx(1.0)
            stats = (await client.get(f"/v1/sessions/{session_id}/stats")).json()
            assert stats["audio_samples_rendered"] == stats["audio_samples_published"] == 16_000
            assert stats["audio_samples_received"] == (
                stats["audio_samples_rendered"]
                + stats["audio_samples_pending"]
                + stats["audio_samples_rejected"]
                + stats["audio_samples_flushed"]
            ), stats

            # A session that cannot be prepared is refused with a typed error and frees its slot.
            missing = str(avatar_zip_path.parent / "none.zip")
            bad = await client.post("/v1/sessions/proc-bad", json={**body, "avatar_path": missing})
            assert bad.status_code == 422 and bad.json()["code"]
            stopped = await client.delete(f"/v1/sessions/{session_id}")
            assert stopped.status_code == 200
            health = (await client.get("/healthz")).json()
            assert health["sessions"] == {} and health["capacity"]["slots_free"] == 2
            assert (await client.delete(f"/v1/sessions/{session_id}")).status_code == 404
        assert recorder.track_names == {"avatar_video": "video", "avatar_audio": "audio"}
    finally:
        await recorder.close()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop_process_group(proc.pid)
            raise
        log.close()
    assert code == 0, (tmp_path / "sidecar.log").read_text()[-3000:]
