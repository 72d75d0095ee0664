"""Placement across a Temporal outage: a sidecar's slots stay held until it is heard again.

A real Temporal dev server (its own, restarted on its database file), the production control
worker running the PlacementWorkflow, and the production sidecar worker around the loopback
host (tests/support/temporal_harness.py). While the server is down every registration heartbeat
is refused, and when it returns the registry's lease timer is long overdue. The registry must
not reclaim the leases that fell due while it was itself down (a live sidecar's sessions would
hold no slot until it registers again: placement could over-admit), and the sidecar must be
heard again within the one lease period the registry gives it. A sidecar that died meanwhile is
still reclaimed, one lease later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from activities.placement_client import Placer
from infra import temporal
from tests.support.restartable_temporal import RestartableTemporal
from tests.support.temporal_harness import Harness
from workflows.contracts import PlacementSnapshot, SidecarHeartbeat, sidecar_task_queue

pytestmark = pytest.mark.service
logger = logging.getLogger(__name__)

LEASE_S = 3.0  # the harness's sidecar lease
OUTAGE_S = 8.0  # well past every lease: the registry's timer is overdue when the server returns


@pytest.fixture
async def world(temporal_server: RestartableTemporal, tmp_path: Path) -> AsyncIterator[Harness]:
    client = await Client.connect(temporal_server.config.target, namespace=temporal.NAMESPACE)
    async with Harness(client, tmp_path, lease_s=LEASE_S, registration_interval_s=0.5) as harness:
        yield harness


async def snapshot_after_outage(world: Harness, deadline: float) -> PlacementSnapshot:
    """The registry's snapshot once the restarted server and the control worker answer again."""
    while True:
        try:
            return await world.snapshot()
        except RPCError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_temporal_outage_leaves_live_sidecars_registered_with_their_sessions(
    world: Harness, temporal_server: RestartableTemporal
) -> None:
    host = await world.add_sidecar("a", slots=2)
    placer = Placer(world.client, world.placement_id, world.control_queue)
    # A sidecar that registered holding a session and dies during the outage (no heartbeat after it).
    await placer.send_heartbeat(
        SidecarHeartbeat(
            sidecar_id="gone",
            incarnation="gone-1",
            task_queue=sidecar_task_queue("gone"),
            slots_total=2,
            slots_free=1,
            lease_s=LEASE_S,
            sessions=["s-on-gone"],
        )
    )
    before = await world.snapshot()
    assert [(r.sidecar_id, r.sessions) for r in before.sidecars] == [
        (host.sidecar_id, []),
        ("gone", ["s-on-gone"]),
    ]

    await asyncio.to_thread(temporal_server.stop)
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(temporal_server.start)

    # The first answer after the outage already includes the timer that fell due during it: nothing was
    # reclaimed for the registry's own outage, each lease got one more period.
    first = await snapshot_after_outage(world, time.monotonic() + 60)
    registered = {r.sidecar_id: r for r in first.sidecars}
    assert sorted(registered) == sorted([host.sidecar_id, "gone"]), first
    assert registered["gone"].sessions == ["s-on-gone"] and first.reclaimed_sessions == 0, first

    # The live sidecar is heard again within that period (never dropped, not even for a moment), and the
    # dead one is reclaimed one lease later, its session's slot with it.
    deadline = time.monotonic() + LEASE_S + 20
    while True:
        snapshot = await world.snapshot()
        registered = {r.sidecar_id: r for r in snapshot.sidecars}
        assert host.sidecar_id in registered, ("the live sidecar was dropped after the outage", snapshot)
        if "gone" not in registered and not registered[host.sidecar_id].outage_renewed:
            break
        assert time.monotonic() < deadline, ("the dead sidecar was never reclaimed", snapshot)
        await asyncio.sleep(0.2)
    assert snapshot.reclaimed_sessions == 1, snapshot
