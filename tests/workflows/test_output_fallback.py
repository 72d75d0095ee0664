"""Output fallback by policy: LiveKit unreachable -> RTMP, visible in status and search attributes.

At open time the sidecar is a real `lipsync sidecar` process (SidecarHost, preview engine): its
LiveKit publisher really fails to connect, its RTMP output really streams into nginx-rtmp, and
the MP4 recording a session asks for is really written. The live switch (output lost while
live) uses the in-process test host, whose output a test can take away on cue; it still probes
the real livekit-server and nginx-rtmp.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av
import httpx
import pytest
from temporalio.client import Client, WorkflowHistory

from infra.livekit import LiveKitServerConfig
from infra.process import free_port
from infra.rtmp import RtmpServerConfig
from infra.temporal import TemporalDevServerConfig
from realtime.outputs.registry import LiveKitParams, RtmpTarget
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import (
    Harness,
    determinism_replayer,
    failed_with,
    fast_policy,
    in_phase,
    wait_for_status,
)
from workflows import search_attributes
from workflows.client import stop_session
from workflows.contracts import (
    EndReason,
    ErrorCode,
    Phase,
)

pytestmark = pytest.mark.service


@pytest.fixture
async def world(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path) as harness:
        yield harness


@pytest.fixture
def sidecars(
    temporal_dev_server: TemporalDevServerConfig, world: Harness, tmp_path: Path
) -> Iterator[SidecarProcesses]:
    # Credentials let the sidecar mint a token; the LiveKit URL itself points at a closed port.
    processes = SidecarProcesses(
        temporal_dev_server.target, world, tmp_path, livekit_credentials=("devkey", "x" * 32)
    )
    yield processes
    processes.stop_all()


def unreachable_livekit() -> LiveKitParams:
    return LiveKitParams(url=f"ws://127.0.0.1:{free_port()}", identity="lipsync-avatar-test")


def publishing_streams(rtmp_server: RtmpServerConfig) -> set[str]:
    """Stream names nginx-rtmp reports as being published right now (its /stat XML)."""
    xml = httpx.get(rtmp_server.stat_url, timeout=5, trust_env=False).text
    streams = re.findall(r"<stream>(.*?)</stream>", xml, flags=re.S)
    return {
        match.group(1)
        for stream in streams
        if "<publishing/>" in stream and (match := re.search(r"<name>(.*?)</name>", stream)) is not None
    }


async def test_livekit_unreachable_falls_back_to_rtmp(
    world: Harness, sidecars: SidecarProcesses, rtmp_server: RtmpServerConfig, avatar_url: str, tmp_path: Path
) -> None:
    recordings = tmp_path / "recordings"
    sidecar_id = await sidecars.spawn("gpu0", recordings_dir=recordings)
    stream = f"fallback-{world.suffix}"
    request = world.request(
        avatar_url,
        output_request(
            livekit=unreachable_livekit(), rtmp=RtmpTarget(url=rtmp_server.publish_url(stream)), record=True
        ),
    )
    handle = await world.start(request, fast_policy(outputs__fallback_order=["livekit", "rtmp"]))

    live = await wait_for_status(
        handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0, timeout_s=60
    )
    assert live.output == "rtmp" and live.sidecar == sidecar_id
    assert live.stats["output"].split(",") == ["rtmp", "recording"]  # the sidecar's own view of its outputs
    assert live.output_detail.startswith(f"rtmp://127.0.0.1:{rtmp_server.rtmp_port}/")
    attempts = [(a.kind, a.ok, a.error.code if a.error else None) for a in live.output_attempts]
    # The sidecar's own reason code for the failed attempt is kept (realtime.outputs.livekit's).
    assert attempts == [("livekit", False, "livekit_connect_failed"), ("rtmp", True, None)]
    assert live.output_attempts[0].error is not None and live.output_attempts[0].error.message
    description = await handle.describe()
    assert description.typed_search_attributes.get(search_attributes.OUTPUT) == "rtmp"
    assert stream in publishing_streams(rtmp_server)  # the sidecar really streams to nginx

    await stop_session(world.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.output == "rtmp"
    assert stream not in publishing_streams(rtmp_server)  # teardown closed the stream
    # The recording beside the live output was finalised at teardown and holds the session's video.
    with av.open(str(recordings / f"{request.session_id}.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames > 0
    assert [r.sessions for r in (await world.snapshot()).sidecars] == [[]]


async def test_policy_without_rtmp_fails_when_livekit_is_unreachable(
    world: Harness, sidecars: SidecarProcesses, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    """The fallback order is the policy's: with [livekit] only, an RTMP target in the request is not used."""
    await sidecars.spawn("gpu0")
    stream = f"unused-{world.suffix}"
    request = world.request(
        avatar_url,
        output_request(livekit=unreachable_livekit(), rtmp=RtmpTarget(url=rtmp_server.publish_url(stream))),
    )
    handle = await world.start(request, fast_policy(outputs__fallback_order=["livekit"]))
    _, status = await failed_with(handle, ErrorCode.OUTPUT_UNAVAILABLE)
    assert status.error is not None and "livekit" in status.error.message
    assert [a.kind for a in status.output_attempts] == ["livekit"]
    assert stream not in publishing_streams(rtmp_server)
    # Teardown ran: placement got the slot back.
    assert [r.sessions for r in (await world.snapshot()).sidecars] == [[]]
    history = await handle.fetch_history()
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert names.count("open_output") == 1 and names.count("teardown") == 1


@pytest.fixture
async def live_world(
    temporal_client: Client, tmp_path: Path, livekit_server: LiveKitServerConfig
) -> AsyncIterator[Harness]:
    credentials = (livekit_server.api_key, livekit_server.api_secret)
    async with Harness(temporal_client, tmp_path, livekit_credentials=credentials) as harness:
        yield harness


async def test_output_lost_while_live_switches_to_the_next_output(
    live_world: Harness, livekit_server: LiveKitServerConfig, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    host = await live_world.add_sidecar("gpu0")
    request = live_world.request(
        avatar_url,
        output_request(
            livekit=LiveKitParams(url=livekit_server.ws_url, identity="lipsync-avatar-test"),
            rtmp=RtmpTarget(url=rtmp_server.publish_url(f"switch-{live_world.suffix}")),
        ),
    )
    handle = await live_world.start(request, fast_policy(outputs__fallback_order=["livekit", "rtmp"]))
    live = await wait_for_status(handle, in_phase(Phase.LIVE))
    assert live.output == "livekit"

    host.lose_output(request.session_id)  # LiveKit went away under the live session
    switched = await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.output == "rtmp")
    assert switched.sidecar == host.sidecar_id and switched.replacements == 0  # same sidecar, same session
    assert [(a.kind, a.ok, a.live_switch) for a in switched.output_attempts] == [
        ("livekit", True, False),
        ("rtmp", True, True),
    ]
    assert (await handle.describe()).typed_search_attributes.get(search_attributes.OUTPUT) == "rtmp"
    with_stats = await wait_for_status(
        handle, lambda s: s.stats.get("fallbacks") == 1 and s.stats["output"] == "rtmp"
    )
    assert with_stats.phase is Phase.LIVE

    await stop_session(live_world.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.output == "rtmp"
    history = await handle.fetch_history()
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert (
        names.count("run_session") == 2
        and names.count("switch_output") == 1
        and names.count("open_output") == 1
    )
    assert request.session_id in host.torn_down and not host.sessions


async def test_output_lost_while_live_fails_the_session_when_no_output_is_left(
    live_world: Harness, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    host = await live_world.add_sidecar("gpu0")
    request = live_world.request(
        avatar_url,
        output_request(livekit=LiveKitParams(url=livekit_server.ws_url, identity="lipsync-avatar")),
    )
    handle = await live_world.start(request, fast_policy(outputs__fallback_order=["livekit", "rtmp"]))
    await wait_for_status(handle, in_phase(Phase.LIVE))
    host.lose_output(request.session_id)  # no RTMP target in the request: nothing to switch to
    _, status = await failed_with(handle, ErrorCode.OUTPUT_FAILED)
    assert status.end_reason is EndReason.FAILED
    assert request.session_id in host.torn_down and [
        r.sessions for r in (await live_world.snapshot()).sidecars
    ] == [[]]


async def test_a_dead_session_runtime_fails_the_session_with_its_reason_instead_of_looking_live(
    live_world: Harness, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    host = await live_world.add_sidecar("gpu0")
    request = live_world.request(
        avatar_url,
        output_request(livekit=LiveKitParams(url=livekit_server.ws_url, identity="lipsync-avatar")),
    )
    handle = await live_world.start(request, fast_policy(outputs__fallback_order=["livekit"]))
    await wait_for_status(handle, in_phase(Phase.LIVE))
    host.break_runtime(request.session_id, "clock-x failed: RuntimeError('idle frame 3 is unreadable')")
    _, status = await failed_with(handle, ErrorCode.RUNTIME_FAILED)
    assert status.error is not None and "idle frame 3 is unreadable" in status.error.message
    assert request.session_id in host.torn_down


async def test_a_session_history_from_before_output_specs_still_replays() -> None:
    """A run recorded by the code that named each output in its own request field (LiveKit opened, lost while
    live, switched to RTMP) replays on this code: `OutputRequest.offered` reads those fields as specs."""
    text = (Path(__file__).parent / "data" / "session-history-before-output-specs.json").read_text()
    history = WorkflowHistory.from_json("session-before-output-specs", text)
    await determinism_replayer().replay_workflow(history)
