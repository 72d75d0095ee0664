"""Fast failover: an output server dies mid-session and the policy's next output is live within seconds.

A real sidecar process (`lipsync sidecar`, CPU preview engine) publishes to its own real
livekit-server (this test's, so killing it harms no other test) on the real Temporal dev
server; the request names LiveKit and RTMP (nginx-rtmp), the policy's order. livekit-server
is SIGKILLed: the publisher sees its connection break at once (the SDK's `reconnecting`) and
finds nothing listening at the server's address, the sidecar starts the admitted RTMP output as
a standby at that moment and moves the session to it as soon as it opens (no output-down timeout
for a server that is gone), under the same session clock, with no round trip through the workflow;
the workflow's status follows from the stats report the switch sends at once.
With the policy's switch back on, livekit-server started again brings the session back to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from infra import livekit, rtmp
from infra.process import ManagedProcess
from infra.rtmp import RtmpServerConfig
from infra.temporal import TemporalDevServerConfig
from realtime.outputs.registry import LiveKitParams, RtmpTarget
from tests.support.avcheck import RoomRecorder, token
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import Harness, fast_policy, wait_for_status
from tests.workflows.test_output_fallback import publishing_streams
from workflows.client import stop_session
from workflows.contracts import (
    EndReason,
    Phase,
)
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service
logger = logging.getLogger(__name__)

DETECTED_WITHIN_S = 3.0  # the dead LiveKit output ends the run
RTMP_LIVE_WITHIN_S = 5.0  # the RTMP stream is being published, counted from the kill
SLACK_S = 1.0  # 0.1 s polling of status and nginx's /stat, on two busy cores


@pytest.fixture
def own_livekit(tmp_path: Path) -> Iterator[tuple[livekit.LiveKitServerConfig, ManagedProcess]]:
    config = livekit.LiveKitServerConfig().with_free_ports()
    process = livekit.server_process(config, tmp_path / "livekit")
    process.start()
    try:
        yield config, process
    finally:
        process.stop()


@pytest.fixture
async def world(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path) as harness:
        yield harness


@pytest.fixture
def sidecars(
    temporal_dev_server: TemporalDevServerConfig,
    world: Harness,
    tmp_path: Path,
    own_livekit: tuple[livekit.LiveKitServerConfig, ManagedProcess],
) -> Iterator[SidecarProcesses]:
    config, _ = own_livekit
    processes = SidecarProcesses(
        temporal_dev_server.target, world, tmp_path, livekit_credentials=(config.api_key, config.api_secret)
    )
    yield processes
    processes.stop_all()


async def test_a_dead_livekit_output_fails_over_to_rtmp_within_seconds(
    world: Harness,
    sidecars: SidecarProcesses,
    own_livekit: tuple[livekit.LiveKitServerConfig, ManagedProcess],
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
) -> None:
    lk_config, lk_process = own_livekit
    sidecar_id = await sidecars.spawn("a")
    stream = f"failover-{world.suffix}"
    request = world.request(
        avatar_url,
        output_request(
            livekit=LiveKitParams(url=lk_config.ws_url, identity="lipsync-avatar-failover"),
            rtmp=RtmpTarget(url=rtmp_server.publish_url(stream)),
        ),
    )
    handle = await world.start(request, fast_policy())
    live = await wait_for_status(
        handle,
        lambda s: s.phase is Phase.LIVE and s.output == "livekit" and s.stats.get("frames_published", 0) > 0,
    )
    frames_before = int(live.stats["frames_published"])

    assert lk_process.pid is not None
    killed_at = time.monotonic()
    killed_unix_s = time.time()
    os.killpg(lk_process.pid, signal.SIGKILL)
    detected_s = rtmp_live_s = None
    while rtmp_live_s is None:
        elapsed_s = time.monotonic() - killed_at
        assert elapsed_s < 30, "no failover to RTMP within 30 s"
        status = await handle.query(SessionWorkflow.status)
        if detected_s is None and (status.phase is not Phase.LIVE or status.output != "livekit"):
            detected_s = elapsed_s
        if status.output == "rtmp" and stream in await asyncio.to_thread(publishing_streams, rtmp_server):
            rtmp_live_s = elapsed_s
        await asyncio.sleep(0.1)
    logger.info(
        "LiveKit death noticed after %.2f s; RTMP live %.2f s after the kill", detected_s, rtmp_live_s
    )
    print(
        f"\nfailover: LiveKit death noticed {detected_s:.2f} s, RTMP live {rtmp_live_s:.2f} s after SIGKILL"
    )

    assert detected_s is not None and detected_s <= DETECTED_WITHIN_S + SLACK_S, detected_s
    assert rtmp_live_s <= RTMP_LIVE_WITHIN_S + SLACK_S, rtmp_live_s
    moved = await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.stats.get("output") == "rtmp")
    assert moved.sidecar == sidecar_id and moved.replacements == 0 and moved.sidecar_losses == []
    assert [(a.kind, a.ok, a.live_switch) for a in moved.output_attempts] == [
        ("livekit", True, False),
        ("rtmp", True, True),
    ]
    # Same session, same clock: the counters go on from where LiveKit left them, and the switch is counted.
    assert int(moved.stats["frames_published"]) > frames_before and moved.stats["fallbacks"] == 1, moved.stats
    # The sidecar's own record of the steps (same host, wall clock): nothing listened at livekit-server's
    # address any more, so the switch waited for the RTMP standby only, not for the output-down timeout.
    steps = moved.stats["extra"]
    assert steps["failover_server_unreachable"] == 1.0 and steps["failover_waited_timeout"] == 0.0, {
        key: value for key, value in steps.items() if key.startswith(("failover", "livekit", "rtmp"))
    }
    assert steps["failover_detected_at_unix_s"] - killed_unix_s <= DETECTED_WITHIN_S, steps
    assert steps["failover_switched_at_unix_s"] - killed_unix_s <= RTMP_LIVE_WITHIN_S, steps

    await stop_session(world.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.output == "rtmp"
    # The sidecar switched on its own: no run ended output_failed and no switch_output went through Temporal.
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in (await handle.fetch_history()).events
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    assert "switch_output" not in scheduled and scheduled.count("run_session") == 1, scheduled


async def test_a_dead_rtmp_ingest_fails_over_to_livekit_within_seconds(
    world: Harness,
    sidecars: SidecarProcesses,
    own_livekit: tuple[livekit.LiveKitServerConfig, ManagedProcess],
    tmp_path: Path,
    avatar_url: str,
) -> None:
    """The other direction, policy order [rtmp, livekit]: nginx-rtmp (this test's own) is SIGKILLed
    mid-session."""
    lk_config, _ = own_livekit
    nginx_config = RtmpServerConfig().with_free_ports()
    nginx = rtmp.server_process(nginx_config, tmp_path / "nginx")
    nginx.start()
    try:
        sidecar_id = await sidecars.spawn("a")
        request = world.request(
            avatar_url,
            output_request(
                livekit=LiveKitParams(url=lk_config.ws_url, identity="lipsync-avatar-failover"),
                rtmp=RtmpTarget(url=nginx_config.publish_url(f"ingest-{world.suffix}")),
            ),
        )
        handle = await world.start(request, fast_policy(outputs__fallback_order=["rtmp", "livekit"]))
        await wait_for_status(
            handle,
            lambda s: s.phase is Phase.LIVE and s.output == "rtmp" and s.stats.get("frames_published", 0) > 0,
        )
        assert nginx.pid is not None
        killed_at = time.monotonic()
        os.killpg(nginx.pid, signal.SIGKILL)
        moved = await wait_for_status(
            handle,
            lambda s: s.phase is Phase.LIVE and s.output == "livekit" and s.stats.get("output") == "livekit",
            timeout_s=30,
        )
        switched_s = time.monotonic() - killed_at
        print(f"\nfailover: RTMP ingest death -> LiveKit live {switched_s:.2f} s after SIGKILL")
        assert switched_s <= RTMP_LIVE_WITHIN_S + SLACK_S, switched_s
        assert moved.sidecar == sidecar_id and moved.stats["fallbacks"] == 1, moved.stats
        await stop_session(world.client, request.session_id)
        result = await handle.result()
        assert result.end_reason is EndReason.STOPPED and result.output == "livekit"
    finally:
        nginx.stop()


async def test_after_livekit_returns_the_session_switches_back_to_it(
    *,
    world: Harness,
    sidecars: SidecarProcesses,
    own_livekit: tuple[livekit.LiveKitServerConfig, ManagedProcess],
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
    tmp_path: Path,
) -> None:
    """Policy `outputs.switch_back_retry_s`: livekit-server dies (the session fails over to RTMP), comes back
    on the same port, and the sidecar, retrying it in the background, moves the session back; a real
    subscriber then receives frames of the same session clock."""
    lk_config, lk_process = own_livekit
    sidecar_id = await sidecars.spawn("a")
    request = world.request(
        avatar_url,
        output_request(
            livekit=LiveKitParams(url=lk_config.ws_url, identity="lipsync-avatar-switch-back"),
            rtmp=RtmpTarget(url=rtmp_server.publish_url(f"switch-back-{world.suffix}")),
        ),
    )
    handle = await world.start(request, fast_policy(outputs__switch_back_retry_s=1.0))
    await wait_for_status(
        handle,
        lambda s: s.phase is Phase.LIVE and s.output == "livekit" and s.stats.get("frames_published", 0) > 0,
    )
    assert lk_process.pid is not None
    os.killpg(lk_process.pid, signal.SIGKILL)
    on_rtmp = await wait_for_status(
        handle,
        lambda s: s.output == "rtmp" and str(s.stats.get("output", "")).startswith("rtmp"),
        timeout_s=30,
    )
    frame_on_rtmp = int(on_rtmp.stats["frames_published"])

    restarted = livekit.server_process(lk_config, tmp_path / "livekit-again")  # same ports, a fresh server
    restarted.start()
    recorder = RoomRecorder(mouth_box=(0, 0, 8, 8))
    try:
        back = await wait_for_status(
            handle,
            lambda s: (
                s.phase is Phase.LIVE
                and s.output == "livekit"
                and str(s.stats.get("output", "")).startswith("livekit")
            ),
            timeout_s=30,
        )
        await recorder.connect(lk_config.ws_url, token(lk_config, f"viewer-{world.suffix}", request.room))
        # Frames of the session clock after the switch to RTMP: the clock went on, and the viewer sees it.
        await recorder.wait_for(
            lambda: sum(f.frame_id > frame_on_rtmp for f in recorder.frames) >= 25, timeout_s=20
        )
        assert back.sidecar == sidecar_id and back.replacements == 0 and back.sidecar_losses == []
        assert [(a.kind, a.ok, a.live_switch) for a in back.output_attempts] == [
            ("livekit", True, False),
            ("rtmp", True, True),
            ("livekit", True, True),
        ]
        # One fallback, one switch back: counted apart.
        assert back.stats["fallbacks"] == 1 and back.stats["extra"]["livekit_switch_backs"] == 1.0, back.stats
        await stop_session(world.client, request.session_id)
        result = await handle.result()
        assert result.end_reason is EndReason.STOPPED and result.output == "livekit"
    finally:
        await recorder.close()
        restarted.stop()
