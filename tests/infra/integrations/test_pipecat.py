"""The Pipecat integration in a real Pipecat pipeline against the real service.

The pipeline (tests/infra/integrations/pipecat_app.py: an espeak-ng `TTSService` feeding
`LipsyncVideoService`) runs in its own env with pipecat-ai==1.14.0, built by this module's
fixture under the per-user cache. A subscriber in the LiveKit room must see the lips move
during the speech and hear it; an `InterruptionFrame` must cut the next utterance; the
pipeline's `EndFrame` must stop the session; a dropped audio connection must be reconnected by the
processor itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from lipsync_client import LipsyncClient

from infra.demo import speech_pcm
from infra.paths import PROJECT_ROOT
from tests.support.api_stack import (
    AVATAR_SIDE_PX,
    ApiStack,
    heard_speech_correlation,
    lips_move_with_speech,
    loud_frame_offsets,
)
from tests.support.avcheck import RoomRecorder
from tests.support.avcheck import token as viewer_token_for
from tests.support.framework_venv import framework_python_or_skip, integration_pythonpath

pytestmark = pytest.mark.service

PIPECAT_REQUIREMENTS = ["pipecat-ai==1.14.0", "httpx==0.28.1", "websockets==17.4"]
INTEGRATION_DIR = PROJECT_ROOT / "infra" / "integrations" / "pipecat-lipsync"
PIPECAT_APP = Path(__file__).with_name("pipecat_app.py")
SENTENCE = "Hello from the pipeline. The quick brown fox jumps over the lazy dog."
EVENT_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def pipecat_python() -> Path:
    return framework_python_or_skip(
        "pipecat-1.14.0", PIPECAT_REQUIREMENTS, Path(__file__).with_name("pipecat-constraints.txt")
    )


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


async def next_event(
    process: asyncio.subprocess.Process, name: str, log: Path, timeout_s: float
) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"pipeline: no {name!r} within {timeout_s} s\n{tail(log)}") from None
        if not line:
            raise AssertionError(f"pipeline exited before {name!r}:\n{tail(log)}")
        if not line.startswith(b"{"):
            continue  # a library's own stdout line
        event: dict[str, Any] = json.loads(line)
        assert event["event"] != "audio_error", event
        if event["event"] == name:
            return event


async def test_a_pipecat_pipeline_drives_the_avatar(
    pipecat_python: Path, stack: ApiStack, tmp_path: Path
) -> None:
    room = "pipecat-room"
    log = tmp_path / "pipeline.log"
    env = {**os.environ, "PYTHONPATH": integration_pythonpath(INTEGRATION_DIR)}
    env.pop("VIRTUAL_ENV", None)
    async with LipsyncClient(stack.api_url, stack.api_key) as client:
        # The viewer joins before any session runs in the room, so its token comes from LiveKit's keys: the
        # API
        # mints viewer tokens only for rooms where one of the caller's sessions runs.
        viewer_jwt = viewer_token_for(stack.livekit, "pipecat-viewer", room)
        viewer = RoomRecorder(mouth_box=(0, 0, AVATAR_SIDE_PX, AVATAR_SIDE_PX))
        await viewer.connect(stack.livekit.ws_url, viewer_jwt)
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                str(pipecat_python), str(PIPECAT_APP),
                "--api-url", stack.api_url, "--api-key", stack.api_key,
                "--avatar-url", stack.avatar_url, "--room", room, "--text", SENTENCE,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env,
            )  # fmt: skip
        assert process.stdin is not None

        async def command(word: str) -> None:
            assert process.stdin is not None
            process.stdin.write(word.encode() + b"\n")
            await process.stdin.drain()

        try:
            ready = await next_event(process, "ready", log, EVENT_TIMEOUT_S)
            session_id = ready["session_id"]
            stack.harness.workflow_ids.append(f"session-{session_id}")
            assert ready["avatar_identity"] == f"avatar-{session_id}"
            assert (await client.get_session(session_id)).phase == "live"
            await viewer.wait_for(lambda: len(viewer.frames) >= 50, 30)  # idle first

            await command("say")
            spoken = await next_event(process, "spoken", log, 60)
            await command("drop")
            await next_event(process, "dropped", log, 10)
            await command("say")  # on a new connection, made by the processor itself
            spoken_again = await next_event(process, "spoken", log, 60)
            await command("interrupt")
            interrupted = await next_event(process, "interrupted", log, 60)
            await command("end")
            await next_event(process, "ended", log, 60)
            assert await asyncio.wait_for(process.wait(), 30) == 0, tail(log)
            final = await client.wait_for_phase(session_id, {"completed"}, timeout_s=30)
        finally:
            await viewer.close()
            if process.returncode is None:
                process.kill()
                await process.wait()

    reference = speech_pcm(SENTENCE)
    seconds = len(reference) / 2 / 16_000
    finished = spoken["finished"]
    assert finished["interrupted"] is False and abs(float(finished["playback_position"]) - seconds) < 0.3, (
        spoken
    )
    again = spoken_again["finished"]
    assert again["interrupted"] is False and abs(float(again["playback_position"]) - seconds) < 0.3, (
        spoken_again
    )
    cut = interrupted["finished"]
    assert cut["interrupted"] is True and 0.5 < float(cut["playback_position"]) < 5.0, interrupted
    assert final.end_reason == "stopped" and final.error is None, final.raw

    # The subscriber saw the lips move with the first utterance, and heard it.
    first_frame = int(spoken["started"]["frame_id"])
    speech_change, idle_change, idle_n, spoken_n = lips_move_with_speech(
        viewer.frames, first_frame, loud_frame_offsets(reference)
    )
    assert idle_n >= 25 and spoken_n >= 20, (idle_n, spoken_n)
    assert speech_change > max(2.0 * idle_change, 12.0), (speech_change, idle_change)
    sent = np.frombuffer(reference, dtype="<i2").astype(np.float32) / 32768.0
    sent48 = np.asarray(soxr.resample(sent, 16_000, 48_000), dtype=np.float32)
    correlation = heard_speech_correlation(viewer.audio(), sent48)
    assert correlation >= 0.8, correlation
    sys.stdout.write(
        f"pipeline speech: envelope correlation {correlation:.2f}; mouth change {speech_change:.1f} speaking "
        "vs "
        f"{idle_change:.1f} idle; cut after {cut['playback_position']} s\n"
    )
