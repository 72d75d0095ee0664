"""A bring-up step that no worker picks up in time is asked once more before its sidecar counts as lost.

After a Temporal outage a live sidecar's pollers back off for up to ~10 s before they poll again; a session
placed on it in that window (a drain right after the outage moves every session at once) saw its
`prepare_avatar` time out schedule-to-start, counted the healthy sidecar as lost, excluded it, and failed
`no_capacity` when no other was left (the chaos test, CI). `SessionWorkflow._on_sidecar` now schedules such a
step once more with `run_session.reconcile_s` (the allowance a reconcile gets for that same back-off).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from temporalio.client import WorkflowHandle

from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.temporal_harness import Harness, failed_with, fast_policy, wait_for_status
from workflows.client import stop_session
from workflows.contracts import EndReason, ErrorCode, Phase, SessionRequest
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service

SCHEDULE_TO_START_S = 2.0  # fast_policy's, for every bring-up step
ASK_AGAIN_S = 6.0  # run_session.reconcile_s: the second schedule's allowance
POLLS_AFTER_S = 4.0  # later than the first schedule allows, within the second


async def start_on_late_sidecar(
    harness: Harness, rtmp_server: RtmpServerConfig, avatar_url: str, name: str, polls_after_s: float | None
) -> tuple[SessionRequest, WorkflowHandle[SessionWorkflow, Any]]:
    """The world's only sidecar polls `polls_after_s` late; a session is started onto it."""
    await harness.add_late_polling_sidecar(name, polls_after_s=polls_after_s)
    request = harness.request(
        avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url(f"{name}-{harness.suffix}")))
    )
    handle = await harness.start(request, fast_policy(activities__run_session__reconcile_s=ASK_AGAIN_S))
    return request, handle


async def test_a_sidecar_that_polls_late_keeps_the_session(
    harness: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    request, handle = await start_on_late_sidecar(harness, rtmp_server, avatar_url, "late", POLLS_AFTER_S)
    status = await wait_for_status(
        handle,
        lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0,
        timeout_s=POLLS_AFTER_S + 30.0,
    )
    assert status.sidecar == harness.sidecar_id("late")
    assert status.sidecar_losses == [] and status.replacements == 0, status
    # prepare_avatar and warm_up (scheduled together) were each asked again once
    assert status.steps_asked_again == 2, status
    history = await handle.fetch_history()
    summaries = [
        e.user_metadata.summary.data.decode()
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes") and e.HasField("user_metadata")
    ]
    assert sum("asked again" in summary for summary in summaries) == 2, summaries
    await stop_session(harness.client, request.session_id)
    assert (await handle.result()).end_reason is EndReason.STOPPED


async def test_a_sidecar_that_never_polls_is_lost_after_the_second_schedule(
    harness: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    started_s = time.monotonic()
    _, handle = await start_on_late_sidecar(harness, rtmp_server, avatar_url, "wedged", None)
    # Lost once both schedules ran out, then no other sidecar: the session fails for want of capacity.
    _, status = await failed_with(handle, ErrorCode.NO_CAPACITY)
    assert time.monotonic() - started_s >= SCHEDULE_TO_START_S + ASK_AGAIN_S
    (loss,) = status.sidecar_losses
    assert loss.sidecar_id == harness.sidecar_id("wedged")
    assert loss.timeout_type == "SCHEDULE_TO_START" and loss.phase is Phase.PREPARING
    assert status.steps_asked_again == 2
    final = await handle.query(SessionWorkflow.status)
    assert final.phase is Phase.FAILED
