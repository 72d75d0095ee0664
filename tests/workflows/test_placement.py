"""PlacementWorkflow on the real dev server: slots, leases, restarts, continue-as-new — through its real
protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.placement import running_registry, sidecar_beat
from tests.support.temporal_harness import Harness, replay_all
from workflows.contracts import (
    AcquireSlot,
    ErrorCode,
    Placement,
    PlacementState,
    ReleaseSlot,
    SidecarDeparture,
    SidecarHeartbeat,
    sidecar_task_queue,
)
from workflows.placement import PlacementWorkflow

pytestmark = pytest.mark.service

Registry = tuple[WorkflowHandle[PlacementWorkflow, None], str]


@pytest.fixture
async def registry(temporal_client: Client) -> AsyncIterator[Registry]:
    async with running_registry(temporal_client, PlacementState(continue_as_new_after_events=60)) as running:
        yield running
    assert await replay_all(temporal_client, [running[0].id]) >= 1


def beat(name: str, incarnation: str = "i1", *, slots: int = 2, lease_s: float = 30.0) -> SidecarHeartbeat:
    return sidecar_beat(name, incarnation, slots=slots, lease_s=lease_s)


async def sessions_by_sidecar(handle: WorkflowHandle[PlacementWorkflow, None]) -> dict[str, list[str]]:
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    return {record.sidecar_id: record.sessions for record in snapshot.sidecars}


async def acquire(
    handle: WorkflowHandle[PlacementWorkflow, None], session: str, exclude: list[str] | None = None
) -> Placement:
    return await handle.execute_update(PlacementWorkflow.acquire, AcquireSlot(session, exclude or []))


async def test_slots_are_spread_counted_released_and_never_doubled(registry: Registry) -> None:
    handle, _ = registry
    await handle.signal(PlacementWorkflow.heartbeat, beat("a", slots=2))
    await handle.signal(PlacementWorkflow.heartbeat, beat("b", slots=2))

    first = await acquire(handle, "s1")
    second = await acquire(handle, "s2")
    assert {first.sidecar_id, second.sidecar_id} == {"a", "b"}  # most free slots first spreads the load
    assert first.task_queue == sidecar_task_queue(first.sidecar_id)
    # Acquiring again (a retried activity, a re-placement) moves the session, never holds two slots.
    again = await acquire(handle, "s1")
    occupancy = await sessions_by_sidecar(handle)
    assert sorted(s for sessions in occupancy.values() for s in sessions) == ["s1", "s2"]
    assert "s1" in occupancy[again.sidecar_id]

    await acquire(handle, "s3")
    await acquire(handle, "s4")
    occupancy = await sessions_by_sidecar(handle)
    assert sorted(len(sessions) for sessions in occupancy.values()) == [2, 2]
    with pytest.raises(WorkflowUpdateFailedError) as full:
        await acquire(handle, "s5")
    assert (
        isinstance(full.value.cause, ApplicationError)
        and full.value.cause.type == ErrorCode.NO_CAPACITY.value
    )
    assert "4 slots in use" in full.value.cause.message

    assert await handle.execute_update(PlacementWorkflow.release, ReleaseSlot("s2")) is True
    assert await handle.execute_update(PlacementWorkflow.release, ReleaseSlot("s2")) is False  # idempotent
    await acquire(handle, "s5")
    occupancy = await sessions_by_sidecar(handle)
    assert sorted(s for sessions in occupancy.values() for s in sessions) == ["s1", "s3", "s4", "s5"]


async def test_expired_lease_reclaims_every_slot_of_a_silent_sidecar(registry: Registry) -> None:
    handle, _ = registry
    await handle.signal(PlacementWorkflow.heartbeat, beat("dying", slots=2, lease_s=1.0))
    await handle.signal(PlacementWorkflow.heartbeat, beat("healthy", slots=1, lease_s=60.0))
    placements = {p.sidecar_id for p in [await acquire(handle, "x"), await acquire(handle, "y")]}
    assert "dying" in placements

    deadline = time.monotonic() + 10
    while "dying" in await sessions_by_sidecar(handle):  # the workflow's own lease timer drops it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    assert snapshot.reclaimed_sessions >= 1
    assert [r.sidecar_id for r in snapshot.sidecars] == ["healthy"]


async def test_a_sidecar_cut_off_past_its_lease_gets_back_the_slots_of_sessions_it_had_not_started(
    registry: Registry,
) -> None:
    """A lapsed lease does not prove the process dead: the same incarnation registering again gets back
    the slots of sessions placed on it that it had not started yet (so it reports none of them), except
    those released meanwhile; a new incarnation gets none of its predecessor's."""
    handle, _ = registry
    await handle.signal(PlacementWorkflow.heartbeat, beat("cut", "c1", slots=2, lease_s=1.0))
    await handle.signal(PlacementWorkflow.heartbeat, beat("dead", "d1", slots=1, lease_s=1.0))
    assert [(await acquire(handle, s)).sidecar_id for s in ["pending", "ended", "orphan"]] == [
        "cut",
        "cut",
        "dead",
    ]

    deadline = time.monotonic() + 10
    while await sessions_by_sidecar(handle):  # no heartbeats: both leases lapse
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    assert {r.sidecar_id: r.sessions for r in snapshot.lapsed} == {
        "cut": ["pending", "ended"],
        "dead": ["orphan"],
    }
    assert snapshot.reclaimed_sessions == 3

    # `ended` ends while its sidecar is cut off; then `cut` is heard again, reporting no session (`pending`
    # had not reached it), and `dead` comes back as a new process.
    assert await handle.execute_update(PlacementWorkflow.release, ReleaseSlot("ended")) is False
    await handle.signal(PlacementWorkflow.heartbeat, beat("cut", "c1", slots=2))
    await handle.signal(PlacementWorkflow.heartbeat, beat("dead", "d2", slots=1))
    assert await sessions_by_sidecar(handle) == {"cut": ["pending"], "dead": []}
    assert (await handle.query(PlacementWorkflow.snapshot)).lapsed == []

    assert (await acquire(handle, "new1")).sidecar_id in {"cut", "dead"}
    assert (await acquire(handle, "new2")).sidecar_id in {"cut", "dead"}
    with pytest.raises(WorkflowUpdateFailedError):
        await acquire(handle, "new3")  # cut: pending + one new; dead: one new


async def test_restart_suspect_and_departure(registry: Registry) -> None:
    handle, _ = registry
    await handle.signal(PlacementWorkflow.heartbeat, beat("a", "old", slots=1))
    await handle.signal(PlacementWorkflow.heartbeat, beat("b", "b1", slots=1))
    placed = await acquire(handle, "s1")
    assert placed.sidecar_id == "a" and placed.incarnation == "old"

    # s1 lost `a` (old incarnation): it is excluded and marked suspect, so nobody else lands there either.
    moved = await acquire(handle, "s1", exclude=["old"])
    assert moved.sidecar_id == "b"
    with pytest.raises(WorkflowUpdateFailedError):
        await acquire(handle, "s2")  # a is suspect, b is full

    # `a` restarts as a new process: fresh incarnation, all slots free, no longer suspect.
    await handle.signal(PlacementWorkflow.heartbeat, beat("a", "new", slots=1))
    assert (await acquire(handle, "s2")).incarnation == "new"

    # Graceful departure drops it at once; a stale departure (old incarnation) is ignored.
    await handle.signal(PlacementWorkflow.depart, SidecarDeparture("a", "old"))
    assert "a" in await sessions_by_sidecar(handle)
    await handle.signal(PlacementWorkflow.depart, SidecarDeparture("a", "new"))
    assert "a" not in await sessions_by_sidecar(handle)


async def test_state_survives_continue_as_new(registry: Registry) -> None:
    handle, _ = registry
    await handle.signal(PlacementWorkflow.heartbeat, beat("a", slots=3))
    first_run = (await handle.describe()).run_id
    await acquire(handle, "kept")
    for _ in range(40):  # each heartbeat is a few history events: enough to pass the 60-event threshold
        await handle.signal(PlacementWorkflow.heartbeat, beat("a", slots=3))
    deadline = time.monotonic() + 15
    while (await handle.describe()).run_id == first_run:
        assert time.monotonic() < deadline, "no continue-as-new"
        await asyncio.sleep(0.2)
    assert await sessions_by_sidecar(handle) == {"a": ["kept"]}
    assert (await acquire(handle, "next")).sidecar_id == "a"


async def test_session_fails_with_no_capacity_when_no_sidecar_is_registered(
    harness: Harness, avatar_url: str
) -> None:
    from temporalio.client import WorkflowFailureError

    request = harness.request(avatar_url, output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x")))
    handle = await harness.start(request)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == ErrorCode.NO_CAPACITY.value


async def test_waiting_out_the_placement_time_limit_fails_as_no_capacity(
    harness: Harness, avatar_url: str
) -> None:
    """Retries ended by the time limit (not by attempts) still report why: no_capacity, not a bare timeout.

    Temporal ends them either with a schedule-to-close timeout (the last failure as its cause) or,
    when the next backoff would overrun the limit, with the last failure itself: both must read no_capacity.
    """
    from temporalio.client import WorkflowFailureError

    from tests.support.temporal_harness import fast_policy

    policy = fast_policy(
        activities__place_session__retry__maximum_attempts=1000,
        activities__place_session__start_to_close_s=1.0,
        activities__place_session__schedule_to_close_s=2.0,
    )
    request = harness.request(avatar_url, output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x")))
    handle = await harness.start(request, policy)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == ErrorCode.NO_CAPACITY.value, cause
