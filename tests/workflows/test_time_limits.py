"""Idle timeout and max duration end sessions — on the time-skipping test server (an hour passes in seconds).

The sidecar is a real `lipsync sidecar` process (SidecarHost, preview engine, streaming RTMP to
nginx) on a wall clock: it never sees an hour go by. What ends the session is the workflow's
own durable limit timer (it survives re-placements and misbehaving hosts), which then asks
the sidecar to stop with that reason.

How the hour passes: the (V1) test server never skips time while any activity is pending —
each one holds a time-skipping lock — and a live session always has run_session pending. So
the test releases the environment's own lock and sleeps: virtual time jumps to the next timer,
the workflow's limit. The stop and teardown steps that follow hold their own locks, so they run
in ordinary time; when the session has ended the test takes the environment's lock back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.testing import WorkflowEnvironment

from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import (
    Harness,
    fast_policy,
    in_phase,
    is_terminal,
    register_search_attributes,
    wait_for_status,
)
from workflows.contracts import (
    EndReason,
    Phase,
    SessionStatus,
)
from workflows.policy import SessionPolicy

pytestmark = pytest.mark.service

# Few signals during the skip: each stats report and each sidecar registration is a workflow task,
# and while one is out the test server does not skip time. With a report every 1 s and a
# registration every 0.5 s from the sidecar process, the skip stalled in about 1 run of 5 (virtual
# time crept at wall speed); at 5 s each it did not stall in 8 runs.
REPORT_INTERVAL_S = 5.0
REGISTRATION_INTERVAL_S = 5.0
SLOW_STEPS_S = 120.0  # schedule-to-start / grace for the steps after the skip: never skipped past


@pytest.fixture
async def world(time_skipping_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[Harness]:
    await register_search_attributes(time_skipping_env.client)
    async with Harness(time_skipping_env.client, tmp_path) as harness:
        yield harness


@pytest.fixture
async def sidecar(
    time_skipping_env: WorkflowEnvironment, world: Harness, tmp_path: Path
) -> AsyncIterator[SidecarProcesses]:
    """A real `lipsync sidecar` process connected to the time-skipping server."""
    # A lease far longer than any skip: the sidecar stays registered while hours pass.
    processes = SidecarProcesses(
        time_skipping_env.client.service_client.config.target_host,
        world,
        tmp_path,
        lease_s=10 * 3600,
        registration_interval_s=REGISTRATION_INTERVAL_S,
    )
    try:
        await processes.spawn("gpu0")
        yield processes
    finally:
        processes.stop_all()


def limits_policy(idle_timeout_s: float, max_duration_s: float) -> SessionPolicy:
    return fast_policy(
        session__idle_timeout_s=idle_timeout_s,
        session__max_duration_s=max_duration_s,
        session__stats_interval_s=REPORT_INTERVAL_S,
        session__stats_report_interval_s=REPORT_INTERVAL_S,
        session__stop_grace_s=SLOW_STEPS_S,
        # Longer than the skip: a skipped hour must not look like a dead host.
        activities__run_session__heartbeat_timeout_s=4 * max(idle_timeout_s, max_duration_s),
        # The policy refuses a grace shorter than the heartbeat timeout it must outlast.
        session__control_plane_grace_s=8 * max(idle_timeout_s, max_duration_s),
        activities__stop_session__schedule_to_start_s=SLOW_STEPS_S,
        activities__teardown__schedule_to_start_s=SLOW_STEPS_S,
        activities__release_slot__schedule_to_close_s=SLOW_STEPS_S,
    )


def live_seconds(status: SessionStatus) -> float:
    """Virtual seconds from going live to the end: the limit timer fired on time, not after some later
    jump."""
    return (
        datetime.fromisoformat(status.ended_at) - datetime.fromisoformat(status.live_since)
    ).total_seconds()


async def run_until_limit(
    env: WorkflowEnvironment,
    world: Harness,
    sidecar: SidecarProcesses,
    *,
    rtmp_url: str,
    avatar_url: str,
    policy: SessionPolicy,
    limit_s: float,
) -> tuple[SessionStatus, timedelta, float]:
    """Go live, skip to just past `limit_s` of live time, and let the session end. Returns status, skipped,
    wall s."""
    request = world.request(avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_url)))
    handle = await world.start(request, policy)
    live = await wait_for_status(handle, in_phase(Phase.LIVE), timeout_s=60)
    assert live.stats_reported_at == "" or live.stats.get("audio_samples_received", 0) == 0  # no audio, ever
    assert list((await sidecar.healthz("gpu0"))["sessions"]) == [request.session_id]

    wall_started = time.monotonic()
    server_started = await env.get_current_time()
    test_service = env.client.test_service
    await test_service.unlock_time_skipping(UnlockTimeSkippingRequest())  # the environment's own lock
    try:
        await env.sleep(timedelta(seconds=limit_s + 1.0))  # lands 1 s past the workflow's limit timer
        final = await wait_for_status(handle, is_terminal, timeout_s=60)
        skipped = await env.get_current_time() - server_started
    finally:
        await test_service.lock_time_skipping(LockTimeSkippingRequest())
    result = await handle.result()
    assert result.end_reason == final.end_reason
    assert (await sidecar.healthz("gpu0"))["sessions"] == {}  # torn down on the sidecar
    return final, skipped, time.monotonic() - wall_started


async def test_idle_timeout_ends_the_session(
    time_skipping_env: WorkflowEnvironment,
    world: Harness,
    sidecar: SidecarProcesses,
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
) -> None:
    idle_timeout_s = 600.0
    policy = limits_policy(idle_timeout_s=idle_timeout_s, max_duration_s=4 * idle_timeout_s)
    # The workflow learns of audio only through stats reports, so its backstop waits one report longer.
    final, skipped, wall_s = await run_until_limit(
        time_skipping_env,
        world,
        sidecar,
        rtmp_url=rtmp_server.publish_url("idle"),
        avatar_url=avatar_url,
        policy=policy,
        limit_s=idle_timeout_s + REPORT_INTERVAL_S,
    )
    assert final.phase is Phase.COMPLETED and final.end_reason is EndReason.IDLE_TIMEOUT
    assert final.error is None and final.teardown_errors == []
    assert skipped >= timedelta(seconds=idle_timeout_s)
    assert idle_timeout_s <= live_seconds(final) <= idle_timeout_s + REPORT_INTERVAL_S + 5
    assert wall_s < 30


async def test_max_duration_ends_the_session(
    time_skipping_env: WorkflowEnvironment,
    world: Harness,
    sidecar: SidecarProcesses,
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
) -> None:
    max_duration_s = 3600.0
    policy = limits_policy(idle_timeout_s=2 * max_duration_s, max_duration_s=max_duration_s)
    final, skipped, wall_s = await run_until_limit(
        time_skipping_env,
        world,
        sidecar,
        rtmp_url=rtmp_server.publish_url("max"),
        avatar_url=avatar_url,
        policy=policy,
        limit_s=max_duration_s,
    )
    assert final.phase is Phase.COMPLETED and final.end_reason is EndReason.MAX_DURATION
    assert final.error is None and final.teardown_errors == []
    assert skipped >= timedelta(seconds=max_duration_s)
    assert max_duration_s <= live_seconds(final) <= max_duration_s + 5
    assert wall_s < 30
