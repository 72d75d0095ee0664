"""A registry continuing as new while heartbeats and acquires keep arriving, on the real dev server.

The server refuses a workflow task that closes the run (continue-as-new) while a signal arrived during
it (cause `UnhandledCommand`), aborts every update that task delivered with a non-retryable "Unable to
perform workflow execution update due to unexpected workflow task failure." (none of them took effect),
and the worker replays the whole run for the next task. A registry at fleet scale always has heartbeats
arriving: it must not try again from that replayed task (it would lose again, task after task), and its
clients must not lose an acquire to the race.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client, WorkflowHandle

from activities.placement_client import Placer
from tests.support.placement import running_registry, sidecar_beat
from tests.support.temporal_harness import replay_all
from workflows import placement
from workflows.contracts import AcquireSlot, PlacementState, SidecarHeartbeat
from workflows.placement import MAX_CONTINUE_AS_NEW_DEFERRALS, PlacementWorkflow

pytestmark = pytest.mark.service

# Low enough that the registry continues as new every second or so under the load below.
CONTINUE_AS_NEW_AFTER_EVENTS = 120
# How long the load runs: enough for a dozen continue-as-new on a loaded 2-core machine.
LOAD_S = 10.0
# Each run's continue-as-new races the traffic; at least this many must have happened for the test to
# have tested anything.
MIN_RUNS = 3
SIDECARS = 4
HEARTBEAT_LOOPS = 4
# Between two heartbeats of one loop: together the loops send several times the renewals one registry
# gets from 250 sidecars renewing every 20 s, so heartbeats arrive during most workflow tasks.
HEARTBEAT_PAUSE_S = 0.05
ACQUIRE_LOOPS = 4
# Between one plain acquire and the next of the same loop (the Placer test sends back to back).
ACQUIRE_PAUSE_S = 0.02


def beat(name: str) -> SidecarHeartbeat:
    # never full: every refusal the test sees is a failure, not capacity
    return sidecar_beat(name, slots=100_000, lease_s=600.0)


Registry = tuple[WorkflowHandle[PlacementWorkflow, None], str]


@dataclass
class Load:
    acquires_ok: int = 0
    failures: list[str] = field(default_factory=list)


@pytest.fixture
async def registry(
    temporal_client: Client,
) -> AsyncIterator[tuple[WorkflowHandle[PlacementWorkflow, None], str]]:
    state = PlacementState(continue_as_new_after_events=CONTINUE_AS_NEW_AFTER_EVENTS)
    async with running_registry(temporal_client, state, name="placement-can") as (handle, queue):
        for index in range(SIDECARS):
            await handle.signal(PlacementWorkflow.heartbeat, beat(f"gpu-{index}"))
        yield handle, queue
    assert await replay_all(temporal_client, [handle.id]) >= MIN_RUNS


async def _heartbeats(handle: WorkflowHandle[PlacementWorkflow, None], loop: int, until: float) -> None:
    while time.monotonic() < until:
        await handle.signal(PlacementWorkflow.heartbeat, beat(f"gpu-{loop % SIDECARS}"))
        await asyncio.sleep(HEARTBEAT_PAUSE_S)


async def _runs(client: Client, workflow_id: str) -> list[str]:
    return [execution.run_id async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'")]


async def _workflow_task_outcomes(client: Client, workflow_id: str) -> list[list[str]]:
    """Per run, each workflow task's outcome in order: "completed" or the cause it was refused for."""
    outcomes = []
    for run_id in await _runs(client, workflow_id):
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        outcomes.append(
            [
                "completed"
                if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
                else WorkflowTaskFailedCause.Name(
                    event.workflow_task_failed_event_attributes.cause
                ).removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")
                for event in history.events
                if event.event_type
                in (EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
            ]
        )
    return outcomes


async def test_a_refused_continue_as_new_is_never_followed_by_another_and_takes_no_slot(
    temporal_client: Client, registry: Registry
) -> None:
    """Plain acquire updates (no client-side resend) among heartbeats, through many continue-as-new."""
    handle, _ = registry
    load = Load()
    until = time.monotonic() + LOAD_S

    async def acquires(loop: int) -> None:
        index = 0
        while time.monotonic() < until:
            index += 1
            try:
                await handle.execute_update(PlacementWorkflow.acquire, AcquireSlot(f"s{loop}-{index}"))
                load.acquires_ok += 1
            except Exception as exc:
                load.failures.append(f"{exc.__class__.__name__}: {exc}")
            await asyncio.sleep(ACQUIRE_PAUSE_S)

    await asyncio.gather(
        *(_heartbeats(handle, loop, until) for loop in range(HEARTBEAT_LOOPS)),
        *(acquires(loop) for loop in range(ACQUIRE_LOOPS)),
    )
    runs = await _runs(temporal_client, handle.id)
    assert len(runs) >= MIN_RUNS, f"only {len(runs)} runs: the load did not make the registry continue as new"
    outcomes = await _workflow_task_outcomes(temporal_client, handle.id)
    refused = [outcome for run in outcomes for outcome in run if outcome != "completed"]
    # Refusals happen (heartbeats keep arriving) and are all the race, nothing else.
    assert set(refused) <= {"UNHANDLED_COMMAND"}, refused
    # The task after a refused one completes: one replay per lost race, never a run of them.
    repeated = [run for run in outcomes if any("completed" not in pair for pair in itertools.pairwise(run))]
    assert not repeated, (
        f"refused tasks in a row ({len(refused)} refused over {len(runs)} runs): {repeated[0]}"
    )
    # An acquire the server aborted took no slot; every one answered holds exactly one.
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    assert sum(len(record.sessions) for record in snapshot.sidecars) == load.acquires_ok
    assert all("unexpected workflow task failure" in failure for failure in load.failures), load.failures[:3]


@pytest.mark.parametrize("deferrals", [MAX_CONTINUE_AS_NEW_DEFERRALS, 0], ids=["registry-waits", "any-task"])
async def test_placer_acquires_and_releases_survive_continue_as_new_under_heartbeats(
    monkeypatch: pytest.MonkeyPatch, temporal_client: Client, registry: Registry, deferrals: int
) -> None:
    """The production client (batched acquire updates back to back, release signals) through the same races.

    Whichever task the registry continues as new from (any task with no deferral, as before), the
    client's own resend of a batch the server aborted is what keeps every acquire."""
    # Set before the registry fixture and undone after it (argument order), so the histories are replayed
    # at teardown with the value that produced them.
    monkeypatch.setattr(placement, "MAX_CONTINUE_AS_NEW_DEFERRALS", deferrals)
    handle, queue = registry
    placer = Placer(temporal_client, handle.id, queue, shards=1)
    load = Load()
    until = time.monotonic() + LOAD_S

    async def sessions(loop: int) -> None:
        index = 0
        while time.monotonic() < until:
            index += 1
            session = f"p{loop}-{index}"
            try:
                await placer.acquire(session, f"avatar-{index % 7}")
                load.acquires_ok += 1
                if index % 2:
                    await placer.release(session, handle.id)
            except Exception as exc:
                load.failures.append(f"{exc.__class__.__name__}: {exc}")

    await asyncio.gather(
        *(_heartbeats(handle, loop, until) for loop in range(HEARTBEAT_LOOPS)),
        *(sessions(loop) for loop in range(2 * ACQUIRE_LOOPS)),
    )
    await placer.wait_idle()
    runs = await _runs(temporal_client, handle.id)
    assert len(runs) >= MIN_RUNS, f"only {len(runs)} runs: the load did not make the registry continue as new"
    assert load.failures == [], (
        f"{len(load.failures)} of {len(load.failures) + load.acquires_ok} acquires failed over "
        f"{len(runs)} runs; first: {load.failures[0]}"
    )
    # Released sessions hold nothing; the others hold exactly one slot each.
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    held = [session for record in snapshot.sidecars for session in record.sessions]
    assert len(held) == len(set(held))
    assert all(int(session.rsplit("-", 1)[1]) % 2 == 0 for session in held)


# An acquire that meets a registry closing its run waits for the registry (the replay after a refused task
# and the new run's first task: tens of ms for the short runs here), not for a client-side backoff: the
# SDK's own retry of the server's "workflow is closing" refusal reached the registry only after ~1 s.
SLOWEST_ACQUIRE_S = 0.8


async def test_acquires_that_meet_a_closing_registry_wait_for_the_registry_not_a_backoff(
    temporal_client: Client, registry: Registry
) -> None:
    """The production Placer among heartbeats, the registry continuing as new every second or so (many
    refused tasks among them)."""
    handle, queue = registry
    placer = Placer(temporal_client, handle.id, queue, shards=1)
    latencies_s: list[float] = []
    until = time.monotonic() + LOAD_S

    async def sessions(loop: int) -> None:
        index = 0
        while time.monotonic() < until:
            index += 1
            began = time.monotonic()
            await placer.acquire(f"w{loop}-{index}", f"avatar-{index % 7}")
            latencies_s.append(time.monotonic() - began)

    await asyncio.gather(
        *(_heartbeats(handle, loop, until) for loop in range(HEARTBEAT_LOOPS)),
        *(sessions(loop) for loop in range(ACQUIRE_LOOPS)),
    )
    await placer.wait_idle()
    runs = await _runs(temporal_client, handle.id)
    assert len(runs) >= MIN_RUNS, f"only {len(runs)} runs: the load did not make the registry continue as new"
    # Continue-as-new lost races (refused tasks: the longest closing windows), or this tested little.
    outcomes = await _workflow_task_outcomes(temporal_client, handle.id)
    assert any(outcome != "completed" for run in outcomes for outcome in run), (
        f"no refused task in {len(runs)} runs"
    )
    # Measured on this 2-core machine: at most 0.14 s with the Placer's own retries, 1.1-1.8 s before.
    assert max(latencies_s) < SLOWEST_ACQUIRE_S, (
        f"slowest acquires {sorted(round(s, 3) for s in latencies_s)[-4:]} s over {len(runs)} runs"
    )
