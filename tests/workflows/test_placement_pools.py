"""Sharded placement registries, pools and cache affinity, on the real dev server through the production
client.

The registry tests drive `activities.placement_client.Placer` (what place_session, release_slot and
the sidecar worker use) against PlacementWorkflows on a real worker; the session tests run whole
sessions through the production control worker and sidecar workers (in-process test hosts) with
registries sharded two ways, and check that no registry keeps a slot afterwards.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.placement_client import Placer, check_pool, check_shards, shard_of
from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.placement import sidecar_beat
from tests.support.temporal_harness import (
    Harness,
    determinism_replayer,
    fast_policy,
    in_phase,
    replay_all,
    wait_for_status,
)
from workflows import search_attributes
from workflows.client import stop_session
from workflows.contracts import (
    AcquireSlot,
    EndReason,
    ErrorCode,
    Phase,
    PlacementReason,
    PlacementState,
    ReleaseSlot,
    placement_registry_id,
)
from workflows.placement import PlacementWorkflow
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service


@pytest.fixture
async def registry(temporal_client: Client) -> AsyncIterator[WorkflowHandle[PlacementWorkflow, None]]:
    queue = f"placement-test-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal_client, task_queue=queue, workflows=[PlacementWorkflow]):
        handle = await temporal_client.start_workflow(
            PlacementWorkflow.run, PlacementState(), id=f"placement-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        yield handle
        await handle.terminate("test over")
    assert await replay_all(temporal_client, [handle.id]) >= 1


class Fleet:
    """A sharded placement world: Placer plus the worker running its registries."""

    def __init__(self, client: Client, shards: int) -> None:
        self.client = client
        self.queue = f"placement-test-{uuid.uuid4().hex[:8]}"
        self.placer = Placer(client, f"placement-{uuid.uuid4().hex[:8]}", self.queue, shards=shards)

    def registry_ids(self, *pools: str) -> list[str]:
        return [
            placement_registry_id(self.placer.placement_id, pool, shard)
            for pool in pools
            for shard in range(self.placer.shards)
        ]

    async def held(self, *pools: str) -> dict[str, list[str]]:
        """sidecar -> sessions, over every registry of `pools` that exists."""
        held: dict[str, list[str]] = {}
        for registry_id in self.registry_ids(*pools):
            try:
                snapshot = await self.client.get_workflow_handle_for(
                    PlacementWorkflow.run, registry_id
                ).query(PlacementWorkflow.snapshot)
            except Exception as exc:
                if "not found" not in str(exc).lower():
                    raise
                continue
            held.update({record.sidecar_id: list(record.sessions) for record in snapshot.sidecars})
        return held


@pytest.fixture
async def fleet(temporal_client: Client) -> AsyncIterator[Fleet]:
    world = Fleet(temporal_client, shards=4)
    async with Worker(temporal_client, task_queue=world.queue, workflows=[PlacementWorkflow]):
        yield world
        for registry_id in world.registry_ids("default", "gpu.eu", "gpu.us"):
            try:
                await temporal_client.get_workflow_handle(registry_id).terminate("test over")
            except Exception as exc:
                if "not found" not in str(exc).lower():
                    raise
    await replay_all(temporal_client, world.registry_ids("default", "gpu.eu", "gpu.us"))


async def test_a_sidecar_that_prepared_the_avatar_is_preferred_while_it_has_room(
    registry: WorkflowHandle[PlacementWorkflow, None],
) -> None:
    await registry.signal(PlacementWorkflow.heartbeat, sidecar_beat("a", slots=2))
    await registry.signal(PlacementWorkflow.heartbeat, sidecar_beat("b", slots=4))

    async def place(session: str, avatar: str) -> tuple[str, str]:
        placement = await registry.execute_update(
            PlacementWorkflow.acquire, AcquireSlot(session, avatar_key=avatar)
        )
        assert placement.registry_id == registry.id
        return placement.sidecar_id, placement.reason

    assert await place("s1", "avatar-x") == ("b", PlacementReason.MOST_FREE_SLOTS)
    assert await place("s2", "avatar-y") == ("b", PlacementReason.MOST_FREE_SLOTS)
    # a and b now have 2 free slots each: without affinity the tie goes to `a`; b has avatar-x prepared.
    assert await place("s3", "avatar-x") == ("b", PlacementReason.AVATAR_CACHED)
    # Affinity beats spreading (a has more room now) ...
    assert await place("s4", "avatar-x") == ("b", PlacementReason.AVATAR_CACHED)
    # ... but only while the warm sidecar has room.
    assert await place("s5", "avatar-x") == ("a", PlacementReason.MOST_FREE_SLOTS)
    # A request without an avatar key is placed by free slots alone.
    assert await place("s6", "") == ("a", PlacementReason.MOST_FREE_SLOTS)


async def test_an_acquire_that_arrives_after_its_deadline_takes_no_slot(
    registry: WorkflowHandle[PlacementWorkflow, None],
) -> None:
    await registry.signal(PlacementWorkflow.heartbeat, sidecar_beat("a", slots=1))
    with pytest.raises(WorkflowUpdateFailedError) as late:
        await registry.execute_update(
            PlacementWorkflow.acquire, AcquireSlot("s1", not_after_s=time.time() - 5.0)
        )
    cause = late.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == ErrorCode.ACQUIRE_EXPIRED.value
    snapshot = await registry.query(PlacementWorkflow.snapshot)
    assert [record.sessions for record in snapshot.sidecars] == [[]]
    # Within its deadline it lands.
    placed = await registry.execute_update(
        PlacementWorkflow.acquire, AcquireSlot("s1", not_after_s=time.time() + 60.0)
    )
    assert placed.sidecar_id == "a"


async def test_a_release_signal_frees_the_slot_and_marks_a_lost_sidecar_suspect(
    registry: WorkflowHandle[PlacementWorkflow, None],
) -> None:
    await registry.signal(PlacementWorkflow.heartbeat, sidecar_beat("a", slots=1))
    await registry.signal(PlacementWorkflow.heartbeat, sidecar_beat("b", slots=1))
    first = await registry.execute_update(PlacementWorkflow.acquire, AcquireSlot("s1"))
    await registry.signal(
        PlacementWorkflow.release_slot, ReleaseSlot("s1", suspect_incarnations=[first.incarnation])
    )
    snapshot = await registry.query(PlacementWorkflow.snapshot)
    assert {record.sidecar_id: (record.sessions, record.suspect) for record in snapshot.sidecars} == {
        first.sidecar_id: ([], True),
        ("b" if first.sidecar_id == "a" else "a"): ([], False),
    }
    # The suspect sidecar gets no new session until it heartbeats again.
    assert (
        await registry.execute_update(PlacementWorkflow.acquire, AcquireSlot("s2"))
    ).sidecar_id != first.sidecar_id


async def test_sharded_registries_place_until_the_whole_pool_is_full_and_release_everywhere(
    fleet: Fleet,
) -> None:
    names = [f"gpu{index}" for index in range(8)]
    for name in names:
        await fleet.placer.heartbeat(name, f"{name}-1", 1, 60.0)
    homes = {fleet.placer.registry_of_sidecar(name, "default") for name in names}
    assert len(homes) >= 2, homes  # CRC-32 spreads these eight ids over several of the four shards

    # One avatar: every acquire starts at the same home shard and goes round the others when it is full.
    placements = [await fleet.placer.acquire(f"s{index}", "avatar-1") for index in range(8)]
    assert sorted(p.sidecar_id for p in placements) == names
    assert {p.registry_id for p in placements} == homes
    with pytest.raises(ApplicationError) as full:
        await fleet.placer.acquire("s8", "avatar-1")
    assert full.value.type == ErrorCode.NO_CAPACITY.value and "4 registries asked" in full.value.message

    # Release where the slot is held; a release that does not know where asks every registry of the pool.
    await fleet.placer.release("s0", placements[0].registry_id)
    assert await fleet.placer.release("s1") is True
    await wait_until_held(fleet, lambda held: sum(map(len, held.values())) == 6, "default")
    assert (await fleet.placer.acquire("s8", "avatar-2")).sidecar_id in {
        placements[0].sidecar_id,
        placements[1].sidecar_id,
    }


async def test_a_retried_acquire_leaves_no_slot_in_the_shard_it_moved_away_from(fleet: Fleet) -> None:
    for name in ("gpu-a", "gpu-b", "gpu-c", "gpu-d", "gpu-e", "gpu-f"):
        await fleet.placer.heartbeat(name, f"{name}-1", 2, 60.0)
    first = await fleet.placer.acquire("s1", "avatar-1")
    # The retry may start from another shard (here: another avatar key's home); release_first clears the old
    # one.
    other_key = next(
        f"avatar-{n}" for n in range(2, 100) if shard_of(f"avatar-{n}", 4) != shard_of("avatar-1", 4)
    )
    await fleet.placer.acquire("s1", other_key, release_first=True)
    held = await wait_until_held(fleet, lambda held: sum(map(len, held.values())) == 1, "default")
    assert [sessions for sessions in held.values() if sessions] == [["s1"]]
    assert first.registry_id  # the first placement named its registry


async def test_pools_are_tried_in_policy_order_and_a_pool_without_sidecars_is_skipped(fleet: Fleet) -> None:
    await fleet.placer.heartbeat("eu-1", "eu-1-1", 1, 60.0, pool="gpu.eu")
    await fleet.placer.heartbeat("us-1", "us-1-1", 1, 60.0, pool="gpu.us")
    order = ["gpu.asia", "gpu.eu", "gpu.us"]  # asia has no sidecar at all (a lost region)
    first = await fleet.placer.acquire("s1", "avatar-1", pools=order)
    second = await fleet.placer.acquire("s2", "avatar-1", pools=order)
    assert (first.sidecar_id, first.pool) == ("eu-1", "gpu.eu")
    assert (second.sidecar_id, second.pool) == ("us-1", "gpu.us")  # eu is full: the next pool
    with pytest.raises(ApplicationError) as full:
        await fleet.placer.acquire("s3", "avatar-1", pools=order)
    assert full.value.type == ErrorCode.NO_CAPACITY.value and "gpu.asia" in full.value.message
    # A session that asks only for eu never lands in us.
    with pytest.raises(ApplicationError):
        await fleet.placer.acquire("s4", "avatar-1", pools=["gpu.eu"])


def test_bad_pool_names_and_shard_counts_are_refused_with_a_reason() -> None:
    for bad in ("", "eu west", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="pool"):
            check_pool(bad)
    assert check_pool("h200.eu-west_2") == "h200.eu-west_2"
    for bad_count in (0, -1, 1025):
        with pytest.raises(ValueError, match="shards"):
            check_shards(bad_count)
    # Shard keys are stable across processes (CRC-32, not Python's salted hash).
    assert shard_of("gpu0", 16) == 9 and shard_of("avatar-1", 4) == shard_of("avatar-1", 4)


async def wait_until_held(fleet: Fleet, predicate: object, *pools: str) -> dict[str, list[str]]:
    """Releases are signals: poll the registries until `predicate(held)` holds."""
    assert callable(predicate)
    deadline = time.monotonic() + 10
    held = await fleet.held(*pools)
    while not predicate(held):
        assert time.monotonic() < deadline, f"registries still hold {held}"
        await asyncio.sleep(0.1)
        held = await fleet.held(*pools)
    return held


# --- whole sessions on sharded registries ------------------------------------------------------------

POOL = "gpu.test"


@pytest.fixture
async def sharded(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path, shards=2, pools=(POOL,)) as world:
        yield world


def names_in_both_shards(world: Harness) -> tuple[str, str]:
    """Two sidecar names whose ids hash to different shards of the world's two."""
    by_shard: dict[int, str] = {}
    for index in range(64):
        by_shard.setdefault(shard_of(world.sidecar_id(f"gpu{index}"), 2), f"gpu{index}")
        if len(by_shard) == 2:
            return by_shard[0], by_shard[1]
    raise AssertionError("64 names all hashed to one shard")


async def test_sessions_show_pool_and_reason_and_the_second_one_goes_where_its_avatar_is(
    sharded: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    first_name, second_name = names_in_both_shards(sharded)
    await sharded.add_sidecar(first_name, slots=2, pool=POOL)
    await sharded.add_sidecar(second_name, slots=2, pool=POOL)
    policy = fast_policy(placement__pools=[POOL])

    async def live_session(stream: str) -> tuple[str, str, str]:
        output = output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url(stream)))
        request = sharded.request(avatar_url, output)
        handle = await sharded.start(request, policy)
        live = await wait_for_status(handle, in_phase(Phase.LIVE))
        assert (await handle.describe()).typed_search_attributes.get(search_attributes.POOL) == POOL
        await stop_session(sharded.client, request.session_id)
        assert (await handle.result()).end_reason is EndReason.STOPPED
        return live.sidecar, live.pool, live.placement_reason

    first = await live_session(f"pool-a-{sharded.suffix}")
    assert first[1:] == (POOL, PlacementReason.MOST_FREE_SLOTS)
    # Same avatar: same home shard, and the sidecar there that prepared it has room.
    second = await live_session(f"pool-b-{sharded.suffix}")
    assert second == (first[0], POOL, PlacementReason.AVATAR_CACHED)
    await wait_for_no_slot_held(sharded)


async def test_a_draining_sidecar_s_session_moves_to_the_other_shard_and_no_slot_is_left(
    sharded: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    first_name, second_name = names_in_both_shards(sharded)
    await sharded.add_sidecar(first_name, slots=1, pool=POOL)
    request = sharded.request(
        avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url(f"drain-{sharded.suffix}")))
    )
    handle = await sharded.start(request, fast_policy(placement__pools=[POOL]))
    live = await wait_for_status(handle, in_phase(Phase.LIVE))
    assert live.sidecar == sharded.sidecar_id(first_name)

    await sharded.add_sidecar(second_name, slots=1, pool=POOL)
    await sharded.stop_sidecar(sharded.sidecar_id(first_name))  # SIGTERM's path: depart, then drain
    moved = await wait_for_status(handle, lambda s: s.phase is Phase.LIVE and s.replacements == 1)
    assert moved.sidecar == sharded.sidecar_id(second_name)
    assert await sharded.slots_held() == {moved.sidecar: [request.session_id]}

    await stop_session(sharded.client, request.session_id)
    assert (await handle.result()).end_reason is EndReason.STOPPED
    await wait_for_no_slot_held(sharded)


async def test_a_session_past_the_pool_s_slots_waits_in_placement_and_takes_a_slot_freed_on_another_shard(
    sharded: Harness, rtmp_server: RtmpServerConfig, avatar_url: str
) -> None:
    """Admission across shards: the pool admits what its sidecars report (one slot each here); a session
    past that waits in placement holding nothing, and takes the first slot freed in any shard of the pool."""
    first_name, second_name = names_in_both_shards(sharded)
    await sharded.add_sidecar(first_name, slots=1, pool=POOL)
    await sharded.add_sidecar(second_name, slots=1, pool=POOL)
    # no_capacity is retried every 0.2-0.5 s (fast policy): enough attempts to outlast the wait below.
    policy = fast_policy(placement__pools=[POOL], activities__place_session__retry__maximum_attempts=200)

    async def start(stream: str) -> tuple[str, WorkflowHandle[SessionWorkflow, Any]]:
        output = output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url(f"{stream}-{sharded.suffix}")))
        request = sharded.request(avatar_url, output)
        return request.session_id, await sharded.start(request, policy)

    # One avatar, so one home shard: the second session finds it full and goes round to the other.
    sessions = [await start("admit-a"), await start("admit-b")]
    live = [await wait_for_status(handle, in_phase(Phase.LIVE)) for _, handle in sessions]
    assert {status.sidecar for status in live} == {
        sharded.sidecar_id(first_name),
        sharded.sidecar_id(second_name),
    }

    waiting_id, waiting = await start("admit-c")
    await wait_for_status(waiting, in_phase(Phase.PLACING))
    await asyncio.sleep(2.0)  # several refused placement attempts
    assert (await waiting.query(SessionWorkflow.status)).phase is Phase.PLACING
    assert sorted(session for held in (await sharded.slots_held()).values() for session in held) == sorted(
        session_id for session_id, _ in sessions
    )

    # The slot freed is in the shard the waiting session's avatar does not start at.
    freed_id, freed = sessions[1]
    await stop_session(sharded.client, freed_id)
    assert (await freed.result()).end_reason is EndReason.STOPPED
    placed = await wait_for_status(waiting, in_phase(Phase.LIVE))
    assert placed.sidecar == live[1].sidecar
    assert await sharded.slots_held() == {live[0].sidecar: [sessions[0][0]], live[1].sidecar: [waiting_id]}

    for session_id, handle in (sessions[0], (waiting_id, waiting)):
        await stop_session(sharded.client, session_id)
        assert (await handle.result()).end_reason is EndReason.STOPPED
    await wait_for_no_slot_held(sharded)


async def wait_for_no_slot_held(world: Harness) -> None:
    deadline = time.monotonic() + 10
    held = await world.slots_held()
    while any(held.values()):
        assert time.monotonic() < deadline, f"slots still held after the sessions ended: {held}"
        await asyncio.sleep(0.1)
        held = await world.slots_held()


def test_sidecar_and_worker_command_lines_refuse_a_bad_pool_or_shard_count(tmp_path: Path) -> None:
    import subprocess
    import sys

    from infra.cli import build_parser
    from infra.cli.sidecar import temporal_options_from_args
    from infra.paths import PROJECT_ROOT

    parser = build_parser()
    options = temporal_options_from_args(
        parser.parse_args(["sidecar", "--pool", "h200.eu-west", "--placement-shards", "16"]), tmp_path
    )
    assert options is not None and (options.pool, options.placement_shards) == ("h200.eu-west", 16)
    with pytest.raises(ValueError, match="pool 'eu west'"):
        temporal_options_from_args(parser.parse_args(["sidecar", "--pool", "eu west"]), tmp_path)
    with pytest.raises(ValueError, match="between 1 and 1024"):
        temporal_options_from_args(parser.parse_args(["sidecar", "--placement-shards", "0"]), tmp_path)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "worker",
            "--placement-shards",
            "0",
            "--asset-dir",
            str(tmp_path),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --placement-shards: placement shards must be between 1 and 1024 (got 0)" in result.stderr


@pytest.mark.parametrize(
    ("pools", "problem"),
    [
        ([], "placement.pools: must name at least one pool"),
        (["gpu.eu", "gpu.eu"], "placement.pools: names a pool twice"),
        (["gpu.eu", "eu west"], "placement.pools[1]: 'eu west' is not a pool name"),
    ],
)
def test_a_policy_with_bad_pools_is_refused_naming_the_key(pools: list[str], problem: str) -> None:
    from api.policy_file import PolicyError, load_policies

    with pytest.raises(PolicyError, match=re.escape(problem)):
        load_policies(overrides={"placement.pools": pools})
    assert load_policies(overrides={"placement.pools": ["h200.eu-west", "h200.us-east"]}).placement.pools == [
        "h200.eu-west",
        "h200.us-east",
    ]


async def test_a_registry_history_from_before_sharding_still_replays() -> None:
    """A run started by the one-registry code (recorded: heartbeats, acquires, a re-placement, a lease
    expiry, a release, a departure) replays on this code: its loop re-armed a timer on every event,
    which the `workflow.patched` gate keeps for such runs."""
    from temporalio.client import WorkflowHistory

    text = (Path(__file__).parent / "data" / "placement-history-one-registry.json").read_text()
    history = WorkflowHistory.from_json("placement-one-registry", text)
    await determinism_replayer().replay_workflow(history)
