"""The livekit-agents avatar protocol against a real livekit-server.

`livekit-agents` itself cannot be installed next to livekit 1.2.1 (every release pins
`livekit==1.1.x`), so `FakeAgentOutput` does, with `livekit.rtc`, exactly what its
`DataStreamAudioOutput` (voice/avatar/_datastream_io.py) sends: one byte stream per segment
on topic `lk.audio_stream` to the avatar's identity, named `AUDIO_<id>`, attributes
`sample_rate` / `num_channels`, raw int16 frames written as the TTS produces them, closed at
the segment's end; `lk.clear_buffer` RPC with an empty payload; and it answers
`lk.playback_finished` / `lk.playback_started` RPCs, parsing the payload as it does
(`PlaybackFinishedEvent(**json.loads(payload))`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soxr
from livekit import rtc

from infra.livekit import LiveKitServerConfig
from realtime.host import (
    AvatarAsset,
    OutputTarget,
)
from realtime.outputs.registry import LIVEKIT, LiveKitTarget
from realtime.sidecar.host import SidecarHost
from tests.support.avcheck import agent_token, token
from tests.support.sidecar_harness import RunningSidecar, SpeechClip

pytestmark = pytest.mark.service

AGENT_RATE_HZ = 24_000
FRAME_MS = 20


class FakeAgentOutput:
    def __init__(self, room: rtc.Room, avatar_identity: str) -> None:
        self.room = room
        self.avatar_identity = avatar_identity
        self.finished: list[dict[str, object]] = []
        self.started = 0
        self._writer: rtc.ByteStreamWriter | None = None
        room.local_participant.register_rpc_method("lk.playback_finished", self._on_finished)
        room.local_participant.register_rpc_method("lk.playback_started", self._on_started)

    def _on_finished(self, data: rtc.RpcInvocationData) -> str:
        assert data.caller_identity == self.avatar_identity
        event = json.loads(data.payload)
        assert set(event) == {"playback_position", "interrupted"}  # PlaybackFinishedEvent(**payload)
        self.finished.append(event)
        return "ok"

    def _on_started(self, data: rtc.RpcInvocationData) -> str:
        assert data.caller_identity == self.avatar_identity and data.payload == ""
        self.started += 1
        return "ok"

    async def capture_frame(self, pcm: np.ndarray) -> None:
        if self._writer is None:
            self._writer = await self.room.local_participant.stream_bytes(
                name=f"AUDIO_{uuid.uuid4().hex[:12]}",
                topic="lk.audio_stream",
                destination_identities=[self.avatar_identity],
                attributes={"sample_rate": str(AGENT_RATE_HZ), "num_channels": "1"},
            )
        await self._writer.write(pcm.astype("<i2").tobytes())

    async def flush(self) -> None:
        """Segment end: close the stream."""
        if self._writer is not None:
            await self._writer.aclose()
            self._writer = None

    async def clear_buffer(self) -> str:
        return await self.room.local_participant.perform_rpc(
            destination_identity=self.avatar_identity, method="lk.clear_buffer", payload=""
        )

    async def say(self, pcm: np.ndarray) -> None:
        step = AGENT_RATE_HZ * FRAME_MS // 1000
        for start in range(0, len(pcm), step):
            await self.capture_frame(pcm[start : start + step])


async def until(predicate: object, timeout_s: float = 15.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def at_agent_rate(speech: SpeechClip) -> np.ndarray:
    samples = soxr.resample(speech.float32(), speech.rate_hz, AGENT_RATE_HZ)
    return (np.clip(samples, -1, 1) * 32767).astype(np.int16)


async def test_an_agent_drives_the_avatar_over_byte_streams_and_rpc(
    sidecar: RunningSidecar, livekit_server: LiveKitServerConfig, avatar_zip_path: Path, speech: SpeechClip
) -> None:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    session_id, room_name = "agent-driven", "room-agent"
    agent_identity, avatar_identity = "agent-7", "lipsync-avatar-agent-driven"
    agent_room, viewer = rtc.Room(), rtc.Room()
    await agent_room.connect(livekit_server.ws_url, agent_token(livekit_server, agent_identity, room_name))
    await viewer.connect(livekit_server.ws_url, token(livekit_server, "viewer", room_name))
    agent = FakeAgentOutput(agent_room, avatar_identity)
    await host.prepare_avatar(session_id, AvatarAsset(avatar_zip_path, "frames_zip", ""), lambda _p: None)
    # The avatar's token does not carry lk.publish_on_behalf: the sidecar sets it after joining.
    target = LiveKitTarget(
        url=livekit_server.ws_url,
        room=room_name,
        identity=avatar_identity,
        token=agent_token(livekit_server, avatar_identity, room_name),
        publish_on_behalf=agent_identity,
    )
    await host.open_output(session_id, OutputTarget(LIVEKIT.name, target))
    runtime = host.runtime(session_id)
    assert runtime is not None
    try:
        await until(lambda: avatar_identity in viewer.remote_participants)
        avatar = viewer.remote_participants[avatar_identity]
        await until(lambda: avatar.attributes.get("lk.publish_on_behalf") == agent_identity)
        assert avatar.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        await until(
            lambda: {p.name for p in avatar.track_publications.values()} == {"avatar_audio", "avatar_video"}
        )

        # Segment 1: played to the end, then playback_finished(interrupted=false) at its full length.
        pcm = at_agent_rate(speech)
        first = pcm[: AGENT_RATE_HZ * 3 // 2]  # 1.5 s
        await agent.say(first)
        await agent.flush()
        await until(lambda: len(agent.finished) == 1)
        assert agent.finished[0] == {"playback_position": pytest.approx(1.5, abs=0.001), "interrupted": False}
        assert agent.started == 1
        assert runtime.timeline.accounting.rendered == 24_000

        # Segment 2: cleared mid-way; the rest of its stream (sent after the clear) never plays.
        await agent.say(pcm)
        # 1.2 s handed to the output: at least 1 s heard (the position reports what was heard, not what was
        # handed)
        await until(lambda: runtime.playing and runtime.timeline.accounting.rendered > 24_000 + 19_200)
        assert await agent.clear_buffer() == "ok"
        await until(lambda: len(agent.finished) == 2)
        cut = agent.finished[1]
        assert cut["interrupted"] is True
        assert 1.0 <= float(cut["playback_position"]) < len(pcm) / AGENT_RATE_HZ - 1.0  # type: ignore[arg-type]
        rendered_at_cut = runtime.timeline.accounting.rendered
        await agent.say(pcm[: AGENT_RATE_HZ // 2])  # the agent was still writing when it got the answer
        await agent.flush()
        await asyncio.sleep(0.8)
        assert runtime.timeline.accounting.rendered == rendered_at_cut
        assert not runtime.playing

        # A clear with nothing playing is answered too.
        assert await agent.clear_buffer() == "ok"
        await until(lambda: len(agent.finished) == 3)
        assert agent.finished[2] == {"playback_position": 0.0, "interrupted": True}

        stats = runtime.stats()
        assert stats.audio_samples_received == (
            stats.audio_samples_rendered
            + stats.audio_samples_pending
            + stats.audio_samples_rejected
            + stats.audio_samples_flushed
        ), stats
        # Speech handed to WebRTC but not yet playing when the clear came is dropped, not published.
        cleared = int(stats.extra["livekit_audio_samples_dropped"])
        assert 0 <= cleared <= 2 * 3 * 640, stats.extra  # two clears: at most the headroom and one tick each
        assert stats.audio_samples_published + cleared == stats.audio_samples_rendered
        # Everything the agent sent is received: segment 1, segment 2, and the tail after the clear.
        sent = len(first) + len(pcm) + AGENT_RATE_HZ // 2
        assert abs(stats.audio_samples_received - sent * 16_000 // AGENT_RATE_HZ) <= 3
    finally:
        await host.teardown(session_id)
        await agent_room.disconnect()
        await viewer.disconnect()
