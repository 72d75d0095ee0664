"""Placement requests batched per registry: many acquires in one update, many releases in one signal.

The registry tests run the production PlacementWorkflow on the real dev server through the production
client (`activities.placement_client.Placer`); the group-commit tests drive the client's batcher with a
plain async sender, since what they check (what goes together, what a cancelled caller sends) is the
client's own logic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from activities.placement_client import Placer, _GroupCommit
from tests.support.placement import RegistryHandle, running_registry, sidecar_beat
from tests.support.temporal_harness import replay_all
from workflows.contracts import (
    MAX_PLACEMENT_BATCH,
    AcquireBatch,
    AcquireSlot,
    ErrorCode,
    PlacementState,
)
from workflows.placement import PlacementWorkflow


@pytest.fixture
async def registry(temporal_client: Client) -> AsyncIterator[tuple[RegistryHandle, str]]:
    async with running_registry(temporal_client, PlacementState()) as running:
        yield running
    assert await replay_all(temporal_client, [running[0].id]) >= 1


async def _held(handle: WorkflowHandle[PlacementWorkflow, None]) -> dict[str, list[str]]:
    snapshot = await handle.query(PlacementWorkflow.snapshot)
    return {record.sidecar_id: sorted(record.sessions) for record in snapshot.sidecars}


@pytest.mark.service
async def test_concurrent_acquires_go_as_one_update_and_each_is_decided_on_its_own(
    temporal_client: Client, registry: tuple[WorkflowHandle[PlacementWorkflow, None], str]
) -> None:
    handle, queue = registry
    for name in ("a", "b", "c"):
        await handle.signal(PlacementWorkflow.heartbeat, sidecar_beat(name, slots=8))
    # One shard of the default pool: the registry id is the placement id itself.
    placer = Placer(temporal_client, handle.id, queue, shards=1)

    outcomes = await asyncio.gather(
        *(placer.acquire(f"s{index}", f"avatar-{index % 3}") for index in range(26)), return_exceptions=True
    )
    placed = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    # 24 slots: 24 placed, and the two over capacity are refused one by one, not the batch with them.
    assert len(placed) == 24 and len(refused) == 2
    assert all(
        isinstance(exc, ApplicationError) and exc.type == ErrorCode.NO_CAPACITY.value for exc in refused
    )
    held = await _held(handle)
    assert sorted(len(sessions) for sessions in held.values()) == [8, 8, 8]
    assert sorted(s for sessions in held.values() for s in sessions) == sorted(
        f"s{index}" for index in range(26) if not isinstance(outcomes[index], BaseException)
    )
    batching = placer.batching()
    assert batching["acquire_requests"] == 26 and batching["acquire_updates"] <= 2, batching

    # Releases batch the same way, as signals; every slot comes back.
    releases = [
        placer.release(f"s{i}", p.registry_id)
        for i, p in enumerate(outcomes)
        if not isinstance(p, BaseException)
    ]
    assert all(await asyncio.gather(*releases))
    assert placer.batching()["release_requests"] == 24 and placer.batching()["release_signals"] <= 2
    for _ in range(100):  # the signals are applied right after they are accepted
        if not any((held := await _held(handle)).values()):
            break
        await asyncio.sleep(0.1)
    assert not any(held.values()), held

    history = await handle.fetch_history()
    accepted = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    assert len(accepted) <= 2


@pytest.mark.service
async def test_a_batch_that_is_empty_or_too_large_is_refused_with_a_reason(
    registry: tuple[WorkflowHandle[PlacementWorkflow, None], str],
) -> None:
    handle, _ = registry
    too_many = [AcquireSlot(f"s{index}") for index in range(MAX_PLACEMENT_BATCH + 1)]
    for requests, problem in (
        ([], "0 requests"),
        (too_many, f"{MAX_PLACEMENT_BATCH + 1} requests (1 to {MAX_PLACEMENT_BATCH} per batch)"),
        ([AcquireSlot("s1"), AcquireSlot("")], "a request's session_id is empty"),
    ):
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(PlacementWorkflow.acquire_batch, AcquireBatch(requests))
        assert problem in str(refused.value.cause)
    assert await _held(handle) == {}


async def test_requests_arriving_while_a_batch_is_in_flight_go_together_in_the_next() -> None:
    sent: list[list[int]] = []
    release_first = asyncio.Event()

    async def send(requests: list[int]) -> list[int]:
        sent.append(list(requests))
        if len(sent) == 1:
            await release_first.wait()
        return [request * 10 for request in requests]

    group: _GroupCommit[int, int] = _GroupCommit(send, max_batch=3)
    first = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first request has left, alone
    later = [asyncio.create_task(group.submit(n)) for n in (2, 3, 4, 5, 6)]
    cancelled = later[1]  # request 3: its caller gives up before its batch leaves
    await asyncio.sleep(0)
    cancelled.cancel()
    release_first.set()
    answers = await asyncio.gather(first, *later, return_exceptions=True)
    assert sent == [[1], [2, 4, 5], [6]]  # at most max_batch per operation; 3 never sent
    assert answers[0] == 10 and answers[1] == 20 and isinstance(answers[2], asyncio.CancelledError)
    assert answers[3:] == [40, 50, 60]


async def test_a_failed_operation_fails_only_the_requests_it_carried() -> None:
    async def send(requests: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if 2 in requests:
            raise RuntimeError("registry unreachable")
        return requests

    group: _GroupCommit[int, int] = _GroupCommit(send, max_batch=2)
    answers = await asyncio.gather(*(group.submit(n) for n in (1, 2, 3, 4)), return_exceptions=True)
    # [1, 2] failed together (both callers see the error); [3, 4] went on and were answered.
    assert [type(a).__name__ if isinstance(a, BaseException) else a for a in answers] == [
        "RuntimeError",
        "RuntimeError",
        3,
        4,
    ]


async def test_with_batching_off_every_request_goes_at_once_on_its_own() -> None:
    in_flight: list[list[int]] = []
    all_sent = asyncio.Event()

    async def send(requests: list[int]) -> list[int]:
        in_flight.append(list(requests))
        if len(in_flight) == 3:
            all_sent.set()
        await asyncio.wait_for(all_sent.wait(), timeout=5)  # none waits for another to finish
        return requests

    group: _GroupCommit[int, int] = _GroupCommit(send, max_batch=1)
    assert await asyncio.gather(*(group.submit(n) for n in (1, 2, 3))) == [1, 2, 3]
    assert in_flight == [[1], [2], [3]] and group.batches_sent == group.requests_sent == 3


async def test_an_operation_that_never_returns_times_out_and_the_queue_goes_on() -> None:
    async def send(requests: list[int]) -> list[int]:
        if 1 in requests:
            await asyncio.Event().wait()  # a registry that never answers this one
        return requests

    group: _GroupCommit[int, int] = _GroupCommit(send, max_batch=8, timeout_s=0.2)
    stuck = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # 1 has left, alone
    answers = await asyncio.wait_for(asyncio.gather(stuck, group.submit(2), return_exceptions=True), 5)
    assert isinstance(answers[0], TimeoutError) and answers[1] == 2


async def test_wait_idle_returns_once_nothing_is_queued_or_in_flight() -> None:
    release = asyncio.Event()

    async def send(requests: list[int]) -> list[int]:
        await release.wait()
        return requests

    group: _GroupCommit[int, int] = _GroupCommit(send, max_batch=4)
    pending = [asyncio.create_task(group.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    idle = asyncio.create_task(group.wait_idle())
    await asyncio.sleep(0.05)
    assert not idle.done()  # a batch is in flight
    release.set()
    await asyncio.wait_for(idle, 5)
    assert [task.result() for task in pending] == [1, 2, 3]
