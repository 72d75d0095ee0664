"""The LiveKit publisher survives a livekit-server restart: the session goes on and a new viewer sees it
again.

It restarts the session's shared livekit-server fixture on the same ports (stop, start): the
fixture is healthy again when this test ends, whether it passed or not.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from livekit import api
from livekit.rtc._proto.room_pb2 import SimulateScenarioKind

from infra.livekit import LiveKitServerConfig
from infra.process import ManagedProcess
from realtime.host import RunLimits, SessionEndReason
from realtime.ingest.input import AudioInput
from realtime.outputs.base import SERVER_UNREACHABLE
from realtime.outputs.livekit import LiveKitPublisher
from tests.realtime.sidecar.test_livekit_e2e import host_of, open_livekit_session
from tests.support.avcheck import RoomRecorder, token
from tests.support.sidecar_harness import RunningSidecar

pytestmark = pytest.mark.service


async def until(predicate: object, timeout_s: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met in {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_the_publisher_rejoins_after_the_livekit_server_restarts(
    sidecar: RunningSidecar,
    livekit_service: tuple[LiveKitServerConfig, ManagedProcess],
    avatar_zip_path: Path,
) -> None:
    config, server = livekit_service
    session_id, room = "e2e-reconnect", "room-e2e-reconnect"
    box, _ = await open_livekit_session(sidecar, config, session_id, room, avatar_zip_path)
    host = host_of(sidecar)
    runtime = host.runtime(session_id)
    assert runtime is not None
    publisher = runtime.publishers[0]
    before = RoomRecorder(mouth_box=box)
    await before.connect(config.ws_url, token(config, "viewer-before", room))
    after: RoomRecorder | None = None
    restarted = False
    try:
        await before.wait_for(lambda: len(before.frames) >= 10, 20)
        await before.close()
        frames_before = publisher.stats().frames_published

        await asyncio.to_thread(server.stop)
        outage_started = time.monotonic()
        # Nothing listens at the server's address: the publisher says its server is gone, not just slow.
        await until(lambda: publisher.stats().extra.get(SERVER_UNREACHABLE) == 1.0, 5.0)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - outage_started)))
        ticks_during_outage = runtime.tick
        await asyncio.to_thread(server.start)
        restarted = True

        # A viewer that joins after the restart gets the avatar's video and audio again.
        after = RoomRecorder(mouth_box=box)
        await after.connect(config.ws_url, token(config, "viewer-after", room))
        await after.wait_for(lambda: len(after.frames) >= 25 and len(after.audio_chunks) >= 50, 60)
        recovered_s = time.monotonic() - outage_started

        # The session's clock never stopped, and speech sent now is heard by the new viewer.
        assert runtime.tick > ticks_during_outage
        audio_input = AudioInput(runtime, "test")
        t = np.arange(16_000) / 16_000
        audio_input.push((0.4 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
        audio_input.end_utterance()
        await after.wait_for(lambda: any(np.abs(c).max() > 0.2 * 32768 for _, c in after.audio_chunks), 10)
        stats = publisher.stats()
        print(
            f"\nreconnect: viewer saw frames again {recovered_s:.1f} s after the server went down; "
            f"reconnects={stats.reconnects} dropped={stats.frames_dropped} last_error={stats.last_error!r}"
        )
        assert stats.connected and SERVER_UNREACHABLE not in stats.extra, stats.extra
        assert stats.frames_published > frames_before + 25
        assert after.fps(since_s=after.frames[0].arrival_s + 0.5) > 20.0
    finally:
        if after is not None:
            await after.close()
        if not restarted or not server.running():
            await asyncio.to_thread(server.start)
        await host.teardown(session_id)


async def test_the_publisher_rejoins_when_the_server_makes_it_leave(
    sidecar: RunningSidecar, livekit_server: LiveKitServerConfig, avatar_zip_path: Path
) -> None:
    """A server-initiated leave ends the SDK's session (no resume): the publisher joins again on its own."""
    session_id, room = "e2e-server-leave", "room-e2e-server-leave"
    box, _ = await open_livekit_session(sidecar, livekit_server, session_id, room, avatar_zip_path)
    host = host_of(sidecar)
    runtime = host.runtime(session_id)
    assert runtime is not None
    publisher = getattr(runtime.publishers[0], "current", runtime.publishers[0])
    assert isinstance(publisher, LiveKitPublisher) and publisher.room is not None
    viewer = RoomRecorder(mouth_box=box)
    try:
        await publisher.room.simulate_scenario(SimulateScenarioKind.SIMULATE_SERVER_LEAVE)
        await until(lambda: publisher.stats().reconnects >= 1 and publisher.stats().connected, 30)
        await viewer.connect(livekit_server.ws_url, token(livekit_server, "viewer", room))
        await viewer.wait_for(lambda: len(viewer.frames) >= 25 and len(viewer.audio_chunks) >= 50, 30)
        print(f"\nserver leave: {publisher.stats().last_error!r}, reconnects={publisher.stats().reconnects}")
        assert viewer.track_names == {"avatar_video": "video", "avatar_audio": "audio"}
    finally:
        await viewer.close()
        await host.teardown(session_id)


async def test_an_avatar_removed_from_its_room_does_not_rejoin(
    sidecar: RunningSidecar, livekit_server: LiveKitServerConfig, avatar_zip_path: Path
) -> None:
    """Removal (server API) is deliberate: rejoining would fight whoever removed it; the output reports
    down."""
    session_id, room = "e2e-removed", "room-e2e-removed"
    await open_livekit_session(sidecar, livekit_server, session_id, room, avatar_zip_path)
    host = host_of(sidecar)
    runtime = host.runtime(session_id)
    assert runtime is not None
    publisher = runtime.publishers[0]
    try:
        async with api.LiveKitAPI(
            livekit_server.http_url, livekit_server.api_key, livekit_server.api_secret
        ) as lk:
            await lk.room.remove_participant(
                api.RoomParticipantIdentity(room=room, identity=f"lipsync-avatar-{session_id}")
            )
        await until(lambda: not publisher.stats().connected, 10)
        await asyncio.sleep(3.0)  # longer than the first rejoin backoff
        stats = publisher.stats()
        assert not stats.connected and stats.reconnects == 0
        assert "PARTICIPANT_REMOVED" in stats.last_error
        assert stats.extra.get("final_disconnect") == 1.0
        # The session learns at once (no output_down_timeout_s wait): the workflow can fall back or end it.
        limits = RunLimits(idle_timeout_s=60.0, max_duration_s=60.0, stats_interval_s=0.2)
        started = time.monotonic()
        ended = await asyncio.wait_for(host.run_session(session_id, limits, lambda _s: None), timeout=5)
        assert ended.reason is SessionEndReason.OUTPUT_FAILED
        assert time.monotonic() - started < 1.0
    finally:
        await host.teardown(session_id)
