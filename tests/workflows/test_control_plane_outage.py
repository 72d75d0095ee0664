"""Control-plane outages: a live session survives Temporal being down, and is lost only when its sidecar is.

Each test runs its own real Temporal dev server with a persistent database file, stops it
(SIGTERM, the whole server gone: frontend, history, matching) while a session is live, and
starts it again on the same ports with the same file, as a rolling restart of a Temporal
cluster would look to the workers. The sidecar is the production sidecar worker around the
loopback test host (tests/support/temporal_harness.py), in this process, so the test can look
at the host's own view of the session while Temporal is away.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from infra import temporal
from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.restartable_temporal import RestartableTemporal
from tests.support.session_host import LoopbackSessionHost
from tests.support.temporal_harness import Harness, failed_with, fast_policy, wait_for_status
from workflows.client import stop_session
from workflows.contracts import (
    EndReason,
    ErrorCode,
    OutputRequest,
    Phase,
)
from workflows.policy import SessionPolicy
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service
logger = logging.getLogger(__name__)

# Long enough for every timer of the session (heartbeat timeout, placement lease) to expire during it;
# the survival logic does not depend on the duration (only on the grace, which is far longer).
OUTAGE_S = 20.0
HEARTBEAT_TIMEOUT_S = 2.0
RECONCILE_S = 15.0  # covers the workers' poll back-off after the outage


@pytest.fixture
async def world(temporal_server: RestartableTemporal, tmp_path: Path) -> AsyncIterator[Harness]:
    client = await Client.connect(temporal_server.config.target, namespace=temporal.NAMESPACE)
    async with Harness(client, tmp_path) as harness:
        yield harness


def outage_policy(**overrides: Any) -> SessionPolicy:
    return fast_policy(
        activities__run_session__heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        activities__run_session__reconcile_s=RECONCILE_S,
        **overrides,
    )


def rtmp_output(server: RtmpServerConfig) -> OutputRequest:
    return output_request(rtmp=RtmpTarget(url=server.publish_url(f"outage-{uuid.uuid4().hex[:8]}")))


async def ride_out_outage(server: RestartableTemporal, host: LoopbackSessionHost, session_id: str) -> float:
    """Stop Temporal for OUTAGE_S while checking the sidecar keeps the session live; restart it. Returns the
    outage."""
    await asyncio.to_thread(server.stop)
    stopped_at = time.monotonic()
    while time.monotonic() - stopped_at < OUTAGE_S:
        session = host.sessions.get(session_id)
        assert session is not None and session.stop_reason is None, (
            "the sidecar ended the session during the outage"
        )
        await asyncio.sleep(0.5)
    await asyncio.to_thread(server.start)
    outage_s = time.monotonic() - stopped_at
    logger.info("Temporal was down for %.1f s", outage_s)
    return outage_s


async def test_a_live_session_survives_a_temporal_outage_and_carries_on(
    world: Harness,
    temporal_server: RestartableTemporal,
    rtmp_server: RtmpServerConfig,
    avatar_url: str,
) -> None:
    host = await world.add_sidecar("a", slots=2)
    request = world.request(avatar_url, rtmp_output(rtmp_server))
    handle = await world.start(request, outage_policy())
    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0)

    await ride_out_outage(temporal_server, host, request.session_id)
    back_at = datetime.now(UTC)

    # Back: the workflow hears from the same sidecar again (a fresh stats report) and stays with it. Then wait
    # out a full heartbeat timeout + reconcile more, so a loss declared late would show too.
    await wait_for_status(
        handle,
        lambda s: bool(s.stats_reported_at) and datetime.fromisoformat(s.stats_reported_at) > back_at,
        timeout_s=RECONCILE_S + 30,
    )
    await asyncio.sleep(HEARTBEAT_TIMEOUT_S + RECONCILE_S / 3)
    status = await handle.query(SessionWorkflow.status)
    logger.info("after the outage: reconciles=%d phase=%s", status.reconciles, status.phase)
    assert status.sidecar_losses == [] and status.replacements == 0, status
    assert status.phase is Phase.LIVE and status.sidecar == host.sidecar_id and status.error is None, status
    session = host.sessions.get(request.session_id)
    assert session is not None and session.stop_reason is None and host.torn_down == []
    # Placement still counts the session's slot on its sidecar (its lease lapsed during the outage).
    snapshot = await world.snapshot()
    assert [(r.sidecar_id, r.sessions) for r in snapshot.sidecars] == [
        (host.sidecar_id, [request.session_id])
    ]

    await stop_session(world.client, request.session_id)
    result = await handle.result()
    assert (
        result.end_reason is EndReason.STOPPED
        and result.sidecar == host.sidecar_id
        and result.replacements == 0
    )
    assert host.torn_down == [request.session_id]
    snapshot = await world.snapshot()
    assert [(r.sidecar_id, r.sessions) for r in snapshot.sidecars] == [
        (host.sidecar_id, [])
    ]  # no slot leaked


async def test_a_sidecar_ends_the_session_after_its_grace_and_the_workflow_says_exactly_that(
    world: Harness, temporal_server: RestartableTemporal, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    """An outage longer than the policy's grace: the sidecar ends the session on its own; once Temporal is
    back,
    the reconcile learns it and the session fails `sidecar_session_gone` (policy `end`), not a vague loss."""
    grace_s = HEARTBEAT_TIMEOUT_S + RECONCILE_S + 1.0  # the shortest grace the policy accepts, give or take
    host = await world.add_sidecar("a", slots=2)
    request = world.request(avatar_url, rtmp_output(rtmp_server))
    policy = outage_policy(session__control_plane_grace_s=grace_s, host_failure__on_sidecar_lost="end")
    handle = await world.start(request, policy)
    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0)

    stopped_at = time.monotonic()
    await asyncio.to_thread(temporal_server.stop)
    while request.session_id not in host.torn_down:
        assert time.monotonic() - stopped_at < grace_s + 10, "the sidecar kept the session past its grace"
        await asyncio.sleep(0.2)
    ended_after_s = time.monotonic() - stopped_at
    logger.info("the sidecar ended the session %.1f s into the outage (grace %.1f s)", ended_after_s, grace_s)
    # Grace counts from the last report that reached Temporal (at most one report interval before the stop).
    assert grace_s - 1.0 <= ended_after_s, ended_after_s
    await asyncio.to_thread(temporal_server.start)

    _, status = await failed_with(handle, ErrorCode.SIDECAR_SESSION_GONE)
    assert status.error is not None and "without contact with the control plane" in status.error.message, (
        status
    )
    [loss] = status.sidecar_losses
    assert loss.sidecar_id == host.sidecar_id and loss.timeout_type == ErrorCode.SIDECAR_SESSION_GONE.value
    assert status.reconciles >= 1
    snapshot = await world.snapshot()
    assert [(r.sidecar_id, r.sessions) for r in snapshot.sidecars] == [
        (host.sidecar_id, [])
    ]  # no slot leaked
