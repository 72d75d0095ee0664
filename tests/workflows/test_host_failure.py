"""Host failure: a sidecar PROCESS killed (SIGKILL) or stopped (SIGTERM) mid-session, on the real Temporal dev
server.

Each sidecar is a real `lipsync sidecar` process (tests/support/sidecar_process.py): the
production sidecar (`SidecarHost`, CPU preview engine, HTTP server, LiveKit publishing to the
real livekit-server) with its Temporal worker on its own task queue. Killing it with SIGKILL is
a real dead host: no goodbye to placement, no activity completion, its task queue simply stops
being polled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.client import Client

from infra.livekit import LiveKitServerConfig
from infra.temporal import TemporalDevServerConfig
from realtime.outputs.registry import LiveKitParams
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import Harness, failed_with, fast_policy, wait_for_status
from workflows.client import stop_session
from workflows.contracts import (
    EndReason,
    ErrorCode,
    OutputRequest,
    Phase,
)
from workflows.policy import SessionPolicy

pytestmark = pytest.mark.service
logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 2.0
# A silent sidecar is reconciled with before it is declared lost: a dead one does not pick the reconcile up.
RECONCILE_S = 1.5
LEASE_S = 3.0
DETECTION_SLACK_S = 1.5  # server timer processing + our 0.1 s status polling, on two busy cores


@pytest.fixture(params=[1, 2], ids=["one-registry", "two-shards"])
async def world(
    temporal_client: Client, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path, shards=request.param) as harness:
        yield harness


@pytest.fixture
def sidecars(
    temporal_dev_server: TemporalDevServerConfig,
    world: Harness,
    tmp_path: Path,
    livekit_server: LiveKitServerConfig,
) -> Iterator[SidecarProcesses]:
    processes = SidecarProcesses(
        temporal_dev_server.target,
        world,
        tmp_path,
        livekit_credentials=(livekit_server.api_key, livekit_server.api_secret),
        lease_s=LEASE_S,
    )
    yield processes
    processes.stop_all()


def livekit_output(server: LiveKitServerConfig) -> OutputRequest:
    return output_request(livekit=LiveKitParams(url=server.ws_url, identity="lipsync-avatar-failover"))


def host_failure_policy(action: str) -> SessionPolicy:
    return fast_policy(
        host_failure__on_sidecar_lost=action,
        activities__run_session__heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        activities__run_session__reconcile_s=RECONCILE_S,
    )


async def wait_for_lease_expiry(world: Harness, sidecar_id: str) -> None:
    deadline = time.monotonic() + LEASE_S + 10
    while sidecar_id in await world.slots_held():
        assert time.monotonic() < deadline, f"{sidecar_id} still registered long after its lease"
        await asyncio.sleep(0.2)


async def test_sigkilled_sidecar_is_detected_and_the_session_moves_to_another(
    world: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    first = await sidecars.spawn("a")
    request = world.request(avatar_url, livekit_output(livekit_server))
    handle = await world.start(request, host_failure_policy("replace"))
    live = await wait_for_status(
        handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0
    )
    assert live.sidecar == first and live.avatar is not None and not live.avatar.cache_hit
    second = await sidecars.spawn("b")

    killed_at = datetime.now(UTC)
    sidecars.kill("a")

    moved = await wait_for_status(
        handle, lambda s: s.phase is Phase.LIVE and s.sidecar == second, timeout_s=30
    )
    [loss] = moved.sidecar_losses
    assert loss.sidecar_id == first and loss.timeout_type == "HEARTBEAT" and loss.phase is Phase.LIVE
    detection_s = (datetime.fromisoformat(loss.detected_at) - killed_at).total_seconds()
    logger.info(
        "sidecar loss detected %.2f s after SIGKILL (heartbeat timeout %.1f s + reconcile %.1f s)",
        detection_s,
        HEARTBEAT_TIMEOUT_S,
        RECONCILE_S,
    )
    assert 0 < detection_s <= HEARTBEAT_TIMEOUT_S + RECONCILE_S + DETECTION_SLACK_S, detection_s
    assert moved.replacements == 1
    assert moved.avatar is not None and moved.avatar.cache_hit  # prepared avatar reused, no refetch
    assert moved.output == "livekit" and moved.stats.get("output") == "livekit"
    history = await handle.fetch_history()
    fetches = [
        e
        for e in history.events
        if e.activity_task_scheduled_event_attributes.activity_type.name == "fetch_assets"
    ]
    assert len(fetches) == 1  # assets were not fetched or validated again

    # The dead sidecar's lease lapses and its slot is reclaimed; the session holds exactly one slot, on b.
    await wait_for_lease_expiry(world, first)
    assert await world.slots_held() == {second: [request.session_id]}

    await stop_session(world.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.sidecar == second and result.replacements == 1
    assert await world.slots_held() == {second: []}  # no slot leaked


async def test_sigkilled_sidecar_ends_the_session_when_policy_says_end(
    world: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    first = await sidecars.spawn("a")
    request = world.request(avatar_url, livekit_output(livekit_server))
    handle = await world.start(request, host_failure_policy("end"))
    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0)
    second = await sidecars.spawn("b")  # a healthy sidecar exists, yet policy says end

    killed_at = datetime.now(UTC)
    sidecars.kill("a")
    _, status = await failed_with(handle, ErrorCode.SIDECAR_LOST)
    assert status.error is not None and first in status.error.message
    [loss] = status.sidecar_losses
    detection_s = (datetime.fromisoformat(loss.detected_at) - killed_at).total_seconds()
    logger.info(
        "sidecar loss detected %.2f s after SIGKILL (heartbeat timeout %.1f s + reconcile %.1f s)",
        detection_s,
        HEARTBEAT_TIMEOUT_S,
        RECONCILE_S,
    )
    assert 0 < detection_s <= HEARTBEAT_TIMEOUT_S + RECONCILE_S + DETECTION_SLACK_S, detection_s

    await wait_for_lease_expiry(world, first)
    # No slot leaked anywhere: released at teardown or reclaimed with the dead sidecar's lease, whichever came
    # first.
    assert await world.slots_held() == {second: []}


async def test_sigterm_moves_the_session_at_once_instead_of_waiting_for_a_heartbeat_timeout(
    world: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    """A graceful stop departs placement and cuts its steps short with `sidecar_shutting_down`."""
    slow_heartbeat_timeout_s = 30.0  # far longer than a graceful stop takes: that is not what detects it
    first = await sidecars.spawn("a", lease_s=600.0)  # nor is the lease: only the departure drops it
    request = world.request(avatar_url, livekit_output(livekit_server))
    policy = fast_policy(
        host_failure__on_sidecar_lost="replace",
        activities__run_session__heartbeat_timeout_s=slow_heartbeat_timeout_s,
    )
    handle = await world.start(request, policy)
    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.stats.get("frames_published", 0) > 0)
    second = await sidecars.spawn("b")

    stopped_at = datetime.now(UTC)
    assert await sidecars.terminate("a") == 0
    assert first not in await world.slots_held()  # departed, slot reclaimed

    moved = await wait_for_status(
        handle, lambda s: s.phase is Phase.LIVE and s.sidecar == second, timeout_s=30
    )
    [loss] = moved.sidecar_losses
    assert loss.sidecar_id == first and loss.phase is Phase.LIVE
    assert loss.timeout_type == ErrorCode.SIDECAR_SHUTTING_DOWN.value
    detection_s = (datetime.fromisoformat(loss.detected_at) - stopped_at).total_seconds()
    logger.info("graceful sidecar stop noticed %.2f s after SIGTERM", detection_s)
    assert 0 < detection_s < slow_heartbeat_timeout_s / 3, detection_s
    assert moved.replacements == 1 and moved.avatar is not None and moved.avatar.cache_hit

    await stop_session(world.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.sidecar == second
    assert await world.slots_held() == {second: []}  # no slot leaked
