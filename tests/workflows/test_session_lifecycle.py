"""SessionWorkflow end to end on the real Temporal dev server: every phase to `live`, stop, teardown,
completed.

The happy path runs a real `lipsync sidecar` process into the real livekit-server; the
stop/cancel edge cases use the in-process test host (tests/support/session_host.py), which
can be slowed down to catch a session mid-prepare.
"""

from __future__ import annotations

import gc
import inspect
import types
from pathlib import Path

import pytest
from livekit import api
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError, CancelledError, WorkflowAlreadyStartedError

from infra.livekit import LiveKitServerConfig
from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import LiveKitParams, RtmpTarget
from tests.support import media
from tests.support.asset_server import AssetServer
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import Harness, fast_policy, in_phase, wait_for_status
from workflows import search_attributes
from workflows.client import session_status, stop_session
from workflows.contracts import (
    EndReason,
    ErrorCode,
    OutputRequest,
    Phase,
)
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service


def livekit_output(server: LiveKitServerConfig) -> OutputRequest:
    return output_request(livekit=LiveKitParams(url=server.ws_url, identity="lipsync-avatar-test"))


async def room_participants(server: LiveKitServerConfig, room: str) -> dict[str, list[str]]:
    """identity -> kinds of the tracks it publishes, as livekit-server itself reports the room."""
    client = api.LiveKitAPI(server.http_url, server.api_key, server.api_secret, failover=False)
    try:
        response = await client.room.list_participants(api.ListParticipantsRequest(room=room))
    finally:
        await client.aclose()
    return {p.identity: sorted(api.TrackType.Name(t.type) for t in p.tracks) for p in response.participants}


def phases_upserted(history: WorkflowHistory) -> list[str]:
    """The LipsyncPhase values the workflow upserted, in order, repeats collapsed (from its history)."""
    converter = DataConverter.default.payload_converter
    phases: list[str] = []
    for event in history.events:
        if event.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            if search_attributes.PHASE.name in fields:
                phase = converter.from_payload(fields[search_attributes.PHASE.name], str)
                if not phases or phases[-1] != phase:
                    phases.append(phase)
    return phases


async def test_happy_path_goes_live_then_stops_tears_down_and_completes(
    harness: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    """A real `lipsync sidecar` (SidecarHost, preview engine) publishing into the real livekit-server."""
    sidecar_id = await sidecars.spawn("gpu0")
    request = harness.request(avatar_url, livekit_output(livekit_server))
    handle = await harness.start(request)

    live = await wait_for_status(handle, in_phase(Phase.LIVE), timeout_s=60)
    assert live.output == "livekit" and live.output_detail == request.room
    assert live.sidecar == sidecar_id
    assert live.avatar is not None and live.avatar.frame_count == 6 and not live.avatar.cache_hit
    assert [(a.kind, a.ok) for a in live.output_attempts] == [("livekit", True)]

    # Stats flow from the sidecar's heartbeats into `status`.
    with_stats = await wait_for_status(handle, lambda s: s.stats.get("frames_published", 0) > 0)
    assert with_stats.stats["session_id"] == request.session_id
    description = await handle.describe()
    attributes = description.typed_search_attributes
    assert attributes.get(search_attributes.PHASE) == "live"
    assert attributes.get(search_attributes.ROOM) == request.room
    assert attributes.get(search_attributes.OUTPUT) == "livekit"
    assert attributes.get(search_attributes.SIDECAR) == sidecar_id
    snapshot = await harness.snapshot()
    assert [r.sessions for r in snapshot.sidecars] == [[request.session_id]]
    # The sidecar really hosts it, and the avatar really is in the room with video and audio.
    hosted = (await sidecars.healthz("gpu0"))["sessions"]
    assert list(hosted) == [request.session_id] and hosted[request.session_id]["frames_published"] > 0
    participants = await room_participants(livekit_server, request.room)
    assert participants == {"lipsync-avatar-test": ["AUDIO", "VIDEO"]}, participants

    # A second start with the same session id is refused (the API answers 409).
    with pytest.raises(WorkflowAlreadyStartedError):
        await harness.start(request)

    status_at_stop = await stop_session(harness.client, request.session_id, "user hung up")
    assert status_at_stop.stop_note == "user hung up"
    assert (await session_status(harness.client, request.session_id)).stop_note == "user hung up"
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED
    assert result.output == "livekit"
    assert result.stats["frames_published"] > 0

    final = await handle.query(SessionWorkflow.status)
    assert final.phase is Phase.COMPLETED and final.error is None and final.teardown_errors == []
    assert (await sidecars.healthz("gpu0"))["sessions"] == {}  # torn down on the sidecar
    assert await room_participants(livekit_server, request.room) == {}  # it left the room
    snapshot = await harness.snapshot()
    assert [r.sessions for r in snapshot.sidecars] == [[]]  # slot released
    description = await handle.describe()
    assert description.typed_search_attributes.get(search_attributes.PHASE) == "completed"
    history = await handle.fetch_history()
    assert phases_upserted(history) == [
        "pending",
        "fetching",
        "validating",
        "placing",
        "preparing",
        "warming_up",
        "opening_output",
        "live",
        "stopping",
        "tearing_down",
        "completed",
    ]


async def test_stop_while_preparing_cancels_the_step_and_tears_down(
    harness: Harness, rtmp_server: RtmpServerConfig, asset_server: AssetServer
) -> None:
    # A fresh avatar (no cache hit) and a slow host: the session is caught mid-prepare.
    url = asset_server.serve("/avatars/slow-prepare.zip", media.frames_zip(count=12, side_px=112))
    host = await harness.add_sidecar("gpu0", prepare_frame_delay_s=0.25)
    request = harness.request(url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("prep"))))
    handle = await harness.start(request)
    await wait_for_status(handle, in_phase(Phase.PREPARING))
    await stop_session(harness.client, request.session_id, "changed my mind")
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.output == ""
    final = await handle.query(SessionWorkflow.status)
    assert final.phase is Phase.COMPLETED and final.live_since == "" and final.teardown_errors == []
    assert request.session_id in host.torn_down and not host.sessions
    history = await handle.fetch_history()
    assert any(
        e.HasField("activity_task_canceled_event_attributes") for e in history.events
    )  # prepare cancelled
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert "open_output" not in names and "run_session" not in names
    assert [r.sessions for r in (await harness.snapshot()).sidecars] == [[]]


async def test_cancelling_the_workflow_still_runs_teardown(
    harness: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    """Teardown runs from `finally` in its own activities, so a cancelled workflow still cleans up."""
    host = await harness.add_sidecar("gpu0")
    request = harness.request(avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("cx"))))
    handle = await harness.start(request)
    await wait_for_status(handle, in_phase(Phase.LIVE))
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    final = await handle.query(SessionWorkflow.status)
    assert final.phase is Phase.CANCELLED and final.end_reason is EndReason.CANCELLED
    assert final.teardown_errors == []
    assert request.session_id in host.torn_down and not host.sessions
    assert [r.sessions for r in (await harness.snapshot()).sidecars] == [[]]
    history = await handle.fetch_history()
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert names.count("teardown") == 1 and names.count("release_slot") == 1


async def test_invalid_request_fails_before_any_work(harness: Harness, avatar_url: str) -> None:
    request = harness.request(avatar_url, output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x")))
    handle = await harness.start(request, fast_policy(outputs__fallback_order=["livekit"]))
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == ErrorCode.INVALID_REQUEST.value
    assert "fallback order" in cause.message
    history = await handle.fetch_history()
    assert not any(e.HasField("activity_task_scheduled_event_attributes") for e in history.events)


async def test_control_worker_restart_mid_session_leaves_the_session_live(
    temporal_client: Client,
    tmp_path: Path,
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker that runs the workflow stops (deploy, crash): its cached workflows are evicted, not ended.

    Eviction must not run the session's teardown (the session goes on, rebuilt from history by the
    next worker): no teardown activity, no workflow API called from outside the workflow's loop, and no
    teardown begun and dropped when the evicted workflow's coroutine is closed (the SDK ends its pending
    steps with its own BaseException, and a coroutine collected unfinished gets GeneratorExit; neither is a
    CancelledError).
    """
    # Its own harness, closed inside this test: the stopped worker's evicted workflows are collected here.
    async with Harness(temporal_client, tmp_path) as harness:
        host = await harness.add_sidecar("gpu0")
        request = harness.request(
            avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("rw")))
        )
        handle = await harness.start(request)
        await wait_for_status(handle, in_phase(Phase.LIVE))

        await harness.restart_control_worker()
        gc.collect()  # an orphaned workflow future reports its exception when it is collected
        assert "Not in workflow event loop" not in caplog.text
        assert "Future exception was never retrieved" not in caplog.text

        status = await wait_for_status(handle, in_phase(Phase.LIVE))  # the new worker, from history
        assert status.sidecar == host.sidecar_id and request.session_id in host.sessions
        await stop_session(harness.client, request.session_id)
        result = await handle.result()
        assert result.end_reason is EndReason.STOPPED
        history = await handle.fetch_history()
        names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
        assert names.count("teardown") == 1 and names.count("run_session") == 1
    # Its workflow objects go with the closed harness: a teardown begun while they were evicted or closed was
    # created and never run (collected later, it warns "coroutine ... was never awaited").
    gc.collect()
    unstarted = [
        coro
        for coro in gc.get_objects()
        # type(), not isinstance(): the latter reads `__class__`, which some collected objects (torch's
        # deprecated aliases) answer with a warning.
        if type(coro) is types.CoroutineType
        and coro.__qualname__ == "SessionWorkflow._teardown"
        and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
    ]
    assert not unstarted, "eviction began a teardown"
