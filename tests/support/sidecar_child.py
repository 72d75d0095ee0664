"""One real sidecar process (`lipsync sidecar --no-temporal`, preview engine) with one LiveKit session.

The sidecar runs in its own process so that what a test measures at its subscriber (this process) is not
the sidecar's own event loop, and so that the test can stop it (SIGSTOP) like a stalled host. It inherits
the test run's service secret (tests/support/credentials.py): its dev API is called with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.livekit import LiveKitServerConfig
from infra.paths import PROJECT_ROOT
from infra.process import free_port, log_tail
from tests.support.avcheck import token
from tests.support.credentials import audio_token, service_headers

START_TIMEOUT_S = 90.0  # process start and engine warm-up, on two busy cores


def on_core_0(argv: list[str]) -> list[str]:
    """`taskset -c 0`: every thread the process starts stays on core 0 (shared with a CPU hog, in stress
    tests)."""
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.fail("taskset is not installed (apt-get install util-linux)")
    return [taskset, "-c", "0", *argv]


@dataclass
class SidecarChild:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def audio_url(self, session_id: str, sample_rate_hz: int) -> str:
        return (
            f"ws://127.0.0.1:{self.port}/v1/sessions/{session_id}/audio"
            f"?sample_rate={sample_rate_hz}&token={audio_token(session_id)}"
        )

    def stall(self, seconds: float) -> None:
        """SIGSTOP the whole process (event loop, WebRTC threads, the audio source's pull thread), then
        SIGCONT."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    async def open_livekit_session(
        self, livekit: LiveKitServerConfig, session_id: str, room: str, avatar_zip: Path, identity: str
    ) -> None:
        response = await start_livekit_session(
            self.base_url, livekit, session_id, room=room, avatar_zip=avatar_zip, identity=identity
        )
        assert response.status_code == 200, response.text

    async def stats(self, session_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10, trust_env=False, headers=service_headers()) as client:
            response = await client.get(f"{self.base_url}/v1/sessions/{session_id}/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def close_session(self, session_id: str) -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False, headers=service_headers()) as client:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"{self.base_url}/v1/sessions/{session_id}")


async def start_livekit_session(
    base_url: str,
    livekit: LiveKitServerConfig,
    session_id: str,
    *,
    room: str,
    avatar_zip: Path,
    identity: str,
) -> httpx.Response:
    """Ask a sidecar's dev API at `base_url` to start `session_id` with the avatar at `avatar_zip`, published
    into `room` of `livekit` as `identity`; the sidecar's answer."""
    body = {
        "avatar_path": str(avatar_zip),
        "livekit": {
            "url": livekit.ws_url,
            "room": room,
            "identity": identity,
            "token": token(livekit, identity, room),
        },
    }
    async with httpx.AsyncClient(timeout=90, trust_env=False, headers=service_headers()) as client:
        return await client.post(f"{base_url}/v1/sessions/{session_id}", json=body)


@contextlib.asynccontextmanager
async def sidecar_child(
    work_dir: Path,
    livekit: LiveKitServerConfig,
    avatar_dir: Path,
    *,
    pinned: bool = False,
    extra_args: tuple[str, ...] = (),
) -> AsyncIterator[SidecarChild]:
    """A running sidecar process whose dev API opens avatars from `avatar_dir` and publishes to `livekit`;
    stopped
    (never left stopped) at the end. `pinned`: on core 0 (see on_core_0)."""
    port = free_port()
    log_path = work_dir / "sidecar.log"
    argv = [
        sys.executable, "-m", "infra.cli", "sidecar", "--no-temporal",
        "--port", str(port), "--engine", "preview", "--device", "cpu",
        "--cache-dir", str(work_dir / "sidecar-cache"), "--slots", "1", "--sidecar-id", "timing",
        "--dev-api", "--dev-avatar-dir", str(avatar_dir), "--dev-livekit-url", livekit.ws_url, *extra_args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the wait below is async)
            on_core_0(argv) if pinned else argv, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    child = SidecarChild(process, port, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2, trust_env=False, headers=service_headers()) as client:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"sidecar exited with {process.returncode}:\n{log_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{child.base_url}/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"sidecar did not start:\n{log_tail(log_path)}"
                await asyncio.sleep(0.2)
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # never leave it stopped
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 5)
