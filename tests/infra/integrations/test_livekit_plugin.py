"""The LiveKit Agents plugin with a real livekit-agents `AgentSession` against the real service.

The agent runs in its own env with livekit-agents==1.8.9 (which pins livekit 1.1.21; the service
pins another), built by this module's fixture under the per-user cache. The main test runs a
livekit-agents worker (tests/infra/integrations/agents_job_app.py) whose job entrypoint is the README's
example; livekit-server dispatches it to a room, where it starts `lipsync.AvatarSession` through
the API of tests/support/api_stack.py and says a sentence through an espeak-ng TTS. A separate
subscriber in the room must see the avatar's lips move during the speech and hear it; closing the
agent session must stop the lipsync-live session. The error cases drive the plugin from a plain
connected room (tests/infra/integrations/agents_app.py).
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
from livekit import api as livekit_api
from livekit import rtc

from infra.demo import avatar_zip_bytes, speech_pcm
from infra.paths import PROJECT_ROOT
from tests.support.api_stack import AVATAR_SIDE_PX, ApiStack, gray, heard_speech_correlation
from tests.support.asset_server import Route
from tests.support.avcheck import RoomRecorder, agent_token, idle_and_loud_frames, received_frames_summary
from tests.support.avcheck import token as viewer_token_for
from tests.support.framework_venv import integration_pythonpath

pytestmark = pytest.mark.service

PLUGIN_DIR = PROJECT_ROOT / "infra" / "integrations" / "livekit-plugins-lipsync"
AGENT_APP = Path(__file__).with_name("agents_app.py")
AGENT_JOB_APP = Path(__file__).with_name("agents_job_app.py")
SENTENCE = "Hello, I am the agent. The quick brown fox jumps over the lazy dog."
EVENT_TIMEOUT_S = 90.0  # avatar preparation and the agent env's imports, on two busy cores


class AgentProcess:
    """The agent app as a child process: JSON events from its stdout, commands to its stdin."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def spawn(
        cls,
        python: Path,
        stack: ApiStack,
        *,
        room: str,
        identity: str,
        avatar_url: str,
        log: Path,
        join_timeout_s: float = EVENT_TIMEOUT_S,
    ) -> Any:
        env = {**os.environ, "PYTHONPATH": integration_pythonpath(PLUGIN_DIR)}
        env.pop("VIRTUAL_ENV", None)
        argv = [
            str(python), str(AGENT_APP),
            "--livekit-url", stack.livekit.ws_url,
            "--token", agent_token(stack.livekit, identity, room),
            "--api-url", stack.api_url, "--api-key", stack.api_key,
            "--avatar-url", avatar_url, "--text", SENTENCE, "--join-timeout-s", str(join_timeout_s),
        ]  # fmt: skip
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env
            )
        return cls(process, log)

    async def event(self, name: str, timeout_s: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = await asyncio.wait_for(
                    self.process.stdout.readline(), max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                raise AssertionError(f"agent: no {name!r} within {timeout_s} s\n{self.log_tail()}") from None
            if not line:
                raise AssertionError(f"agent exited before {name!r}:\n{self.log_tail()}")
            if not line.startswith(b"{"):
                continue  # a library's own stdout line
            event: dict[str, Any] = json.loads(line)
            if event["event"] == name:
                return event
            raise AssertionError(f"agent: expected {name!r}, got {event}\n{self.log_tail()}")

    async def command(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word.encode() + b"\n")
        await self.process.stdin.drain()

    async def finish(self) -> int:
        if self.process.returncode is None:
            try:
                return await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return int(self.process.returncode or 0)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


async def spawn_job_worker(python: Path, stack: ApiStack, *, agent_name: str, log: Path) -> AgentProcess:
    """tests/infra/integrations/agents_job_app.py: an AgentServer whose entrypoint is the README's example."""
    env = {
        **os.environ,
        "PYTHONPATH": integration_pythonpath(PLUGIN_DIR),
        "LIPSYNC_API_URL": stack.api_url,
        "LIPSYNC_API_KEY": stack.api_key,
    }
    env.pop("VIRTUAL_ENV", None)
    argv = [
        str(python), str(AGENT_JOB_APP),
        "--livekit-url", stack.livekit.ws_url,
        "--livekit-api-key", stack.livekit.api_key, "--livekit-api-secret", stack.livekit.api_secret,
        "--agent-name", agent_name, "--avatar-url", stack.avatar_url, "--text", SENTENCE,
    ]  # fmt: skip
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env
        )
    return AgentProcess(process, log)


async def dispatch(stack: ApiStack, agent_name: str, room: str) -> None:
    """Ask livekit-server to dispatch the agent to `room`, as a deployment's backend would."""
    async with livekit_api.LiveKitAPI(
        stack.livekit.ws_url, stack.livekit.api_key, stack.livekit.api_secret
    ) as lk:
        await lk.agent_dispatch.create_dispatch(
            livekit_api.CreateAgentDispatchRequest(agent_name=agent_name, room=room)
        )


async def test_an_agent_job_with_the_readme_example_drives_the_avatar(
    agents_python: Path, stack: ApiStack, tmp_path: Path
) -> None:
    room, agent_name = "agents-room", "lipsync-test-agent"
    agent = await spawn_job_worker(agents_python, stack, agent_name=agent_name, log=tmp_path / "agent.log")
    try:
        await agent.event("registered")
        async with LipsyncClient(stack.api_url, stack.api_key) as client:
            # The viewer joins before any session runs in the room, so its token comes from LiveKit's keys:
            # the API
            # mints viewer tokens only for rooms where one of the caller's sessions runs.
            viewer_jwt = viewer_token_for(stack.livekit, "agents-viewer", room)
            viewer = RoomRecorder(mouth_box=(0, 0, AVATAR_SIDE_PX, AVATAR_SIDE_PX))
            await viewer.connect(stack.livekit.ws_url, viewer_jwt)
            try:
                await dispatch(stack, agent_name, room)
                started = await agent.event("job_started")
                session_id = started["session_id"]
                stack.harness.workflow_ids.append(f"session-{session_id}")
                assert started["avatar_identity"] == f"avatar-{session_id}"  # as the service named it
                live = await client.get_session(session_id)
                assert live.phase == "live" and live.output == "livekit", live.raw
                avatar = viewer.room.remote_participants[started["avatar_identity"]]
                assert avatar.attributes.get("lk.publish_on_behalf") == started["local_identity"]
                # The agent publishes no audio of its own: the avatar speaks for it.
                agent_participant = viewer.room.remote_participants[started["local_identity"]]
                audio = [
                    p
                    for p in agent_participant.track_publications.values()
                    if p.kind == rtc.TrackKind.KIND_AUDIO
                ]
                assert not audio, audio

                await viewer.wait_for(lambda: len(viewer.frames) >= 50, 30)  # two seconds of idle first
                await agent.command("say")
                spoken_event = await agent.event("spoken", timeout_s=60)
                assert spoken_event["interrupted"] is False
                await asyncio.sleep(1.0)
                stats = (await client.get_session(session_id)).stats

                await agent.command("close")
                await agent.event("agent_session_closed", timeout_s=30)
                final = await client.wait_for_phase(session_id, {"completed"}, timeout_s=30)
            finally:
                await viewer.close()
    finally:
        if agent.process.returncode is None:
            agent.process.terminate()
            try:
                await asyncio.wait_for(agent.process.wait(), 20)
            except TimeoutError:
                agent.process.kill()
                await agent.process.wait()

    # Closing the agent session stopped ours, with the plugin's reason.
    assert final.end_reason == "stopped" and final.error is None, final.raw
    # The agent's speech reached the avatar over the data stream (the only way in: no WebSocket here).
    assert stats.get("audio_samples_received", 0) > 0 and stats.get("speech_frames", 0) > 25, stats
    # The subscriber heard the speech: the received envelope follows espeak-ng's.
    reference = np.frombuffer(speech_pcm(SENTENCE), dtype="<i2").astype(np.float32) / 32768.0
    sent48 = np.asarray(soxr.resample(reference, 16_000, 48_000), dtype=np.float32)
    correlation = heard_speech_correlation(viewer.audio(), sent48)
    assert correlation >= 0.8, correlation
    # ... and saw the lips move while it was loud, not before.
    idle, spoken = idle_and_loud_frames(viewer, AVATAR_SIDE_PX)
    assert len(idle) >= 25 and len(spoken) >= 20, (
        len(idle),
        len(spoken),
        received_frames_summary(viewer),
        stats,
    )
    reference_mouth = np.median(np.stack([gray(f.mouth) for f in idle[-25:]]), axis=0)

    def change(frame: Any) -> float:
        return float(np.percentile(np.abs(gray(frame.mouth) - reference_mouth), 99.5))

    idle_change = float(np.median([change(f) for f in idle[-25:]]))
    speech_change = float(np.median([change(f) for f in spoken]))
    assert speech_change > max(2.0 * idle_change, 12.0), (speech_change, idle_change)
    sys.stdout.write(
        f"agent speech: envelope correlation {correlation:.2f}; mouth change {speech_change:.1f} speaking vs "
        f"{idle_change:.1f} idle ({len(spoken)} / {len(idle)} frames)\n"
    )


async def test_a_failing_avatar_is_a_clear_error_not_a_wait(
    agents_python: Path, stack: ApiStack, tmp_path: Path
) -> None:
    missing = stack.avatar_url.replace("/astronaut.zip", "/missing.zip")
    agent = await AgentProcess.spawn(
        agents_python,
        stack,
        room="agents-fail-room",
        identity="agent-fail",
        avatar_url=missing,
        log=tmp_path / "a.log",
    )
    started_s = time.monotonic()
    try:
        failed = await agent.event("avatar_failed", timeout_s=60)
    finally:
        if agent.process.returncode is None:
            agent.process.kill()
        await agent.process.wait()
    assert failed["code"] == "asset_http_error", failed
    assert "ended before the avatar joined" in failed["message"]
    assert time.monotonic() - started_s < 60
    stack.harness.workflow_ids.append(f"session-{failed['session_id']}")
    assert "livekit.agents" not in sys.modules  # the agent ran in its own interpreter and env


async def test_an_avatar_that_does_not_join_in_time_is_a_clear_error_and_its_session_stops(
    agents_python: Path, stack: ApiStack, tmp_path: Path
) -> None:
    # An avatar whose download takes 2.5 s (five pieces, 0.5 s apart: inside the fetch limits), so the
    # avatar cannot have joined when the 0.5 s join timeout passes.
    body = avatar_zip_bytes(side_px=AVATAR_SIDE_PX)
    slow = Route(
        body=body,
        headers=(("Content-Type", "application/zip"),),
        chunk_bytes=len(body) // 5 + 1,
        chunk_delay_s=0.5,
    )
    slow_url = stack.assets.add("/slow-astronaut.zip", slow)
    agent = await AgentProcess.spawn(
        agents_python,
        stack,
        room="agents-slow-room",
        identity="agent-slow",
        avatar_url=slow_url,
        log=tmp_path / "slow.log",
        join_timeout_s=0.5,
    )
    try:
        failed = await agent.event("avatar_failed", timeout_s=60)
    finally:
        if agent.process.returncode is None:
            agent.process.kill()
        await agent.process.wait()
    session_id = failed["session_id"]
    stack.harness.workflow_ids.append(f"session-{session_id}")
    assert failed["code"] == "avatar_join_timeout", failed
    assert f"avatar-{session_id}" in failed["message"] and "did not join" in failed["message"], failed
    async with LipsyncClient(stack.api_url, stack.api_key) as client:
        final = await client.wait_for_phase(session_id, {"completed", "failed", "cancelled"}, timeout_s=60)
    assert final.phase == "completed" and final.end_reason == "stopped", final.raw  # the plugin stopped it
