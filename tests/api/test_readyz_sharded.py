"""Readiness over sharded placement registries, and the settings that say which registries there are."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from activities.placement_client import Placer, shard_of
from api.app import create_app
from api.readiness import ReadinessCache
from api.routes.ops import MAX_POLLER_LOOKUPS
from api.settings import ApiSettings, SettingsError
from tests.support.temporal_harness import Harness, fast_policy

POOL = "gpu.test"


@pytest.fixture
async def world(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path, shards=4, pools=(POOL,)) as harness:
        yield harness


def _settings(world: Harness) -> ApiSettings:
    return ApiSettings(
        api_keys=("k",),
        admin_keys=("admin",),  # the checks' details are for admins
        livekit_api_secret="secret-0123456789abcdef0123456789abcdef",
        control_task_queue=world.control_queue,
        placement_workflow_id=world.placement_id,
        placement_shards=4,
        placement_pools=(POOL,),
    )


@pytest.mark.service
async def test_readyz_finds_a_sidecar_in_any_shard_of_the_configured_pools(world: Harness) -> None:
    # A sidecar whose id hashes to a shard other than 0: the unsharded check would never see it.
    name = next(f"gpu{index}" for index in range(64) if shard_of(world.sidecar_id(f"gpu{index}"), 4) != 0)
    app = create_app(_settings(world), temporal_client=world.client, policy=fast_policy())
    admin = {"X-API-Key": "admin"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test", headers=admin
    ) as api:
        before = (await api.get("/readyz")).json()["checks"]["sidecars"]
        await world.add_sidecar(name, pool=POOL)
        deadline = time.monotonic() + 15
        while (after := await api.get("/readyz")).status_code != 200 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    assert not before["ok"] and "no placement registry exists yet" in before["error"]
    assert after.status_code == 200, after.text
    registered = after.json()["checks"]["sidecars"]["registered"]
    assert registered[world.sidecar_id(name)]["pollers"] and registered[world.sidecar_id(name)]["lease_ok"]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (
            "LIPSYNC_PLACEMENT_SHARDS",
            "0",
            "LIPSYNC_PLACEMENT_SHARDS must be an integer from 1 to 1024, got '0'",
        ),
        (
            "LIPSYNC_PLACEMENT_SHARDS",
            "many",
            "LIPSYNC_PLACEMENT_SHARDS must be an integer from 1 to 1024, got 'many'",
        ),
        ("LIPSYNC_POOLS", "gpu.eu,eu west", "LIPSYNC_POOLS names ['eu west'], which are not pool names"),
    ],
)
def test_settings_refuse_bad_placement_shards_or_pools(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv("LIPSYNC_API_KEYS", "k")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s")
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        ApiSettings.from_env()
    assert problem in str(refused.value)


def test_settings_read_placement_shards_and_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPSYNC_API_KEYS", "k")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s")
    monkeypatch.setenv("LIPSYNC_PLACEMENT_SHARDS", "16")
    monkeypatch.setenv("LIPSYNC_POOLS", "h200.eu-west, h200.us-east")
    settings = ApiSettings.from_env()
    assert (settings.placement_shards, settings.placement_pools) == (16, ("h200.eu-west", "h200.us-east"))


@pytest.mark.service
async def test_readyz_looks_up_a_bounded_number_of_task_queues_and_shares_its_answer(world: Harness) -> None:
    # Many registered sidecars that poll nothing (registrations only), each with one slot: readiness must not
    # ask Temporal about every one of their queues.
    placer = Placer(world.client, world.placement_id, world.control_queue, shards=4)
    registered = 30
    for index in range(registered):
        await placer.heartbeat(f"idle-{index:02d}", f"idle-{index:02d}-1", 1, 60.0, pool=POOL)
    app = create_app(_settings(world), temporal_client=world.client, policy=fast_policy())
    cache = app.state.services.readiness
    admin = {"X-API-Key": "admin"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test", headers=admin
    ) as api:
        cache.max_age_s = 60.0  # one answer for every probe below, until the test asks for a new one
        first, second, health = await api.get("/readyz"), await api.get("/readyz"), await api.get("/health")
        computed = cache.computations

        # A polling sidecar with more free slots than the idle ones: the first looked up, and enough.
        await world.add_sidecar("gpu", slots=2, pool=POOL)
        cache.max_age_s = 0.0
        deadline = time.monotonic() + 15
        while (after := await api.get("/readyz")).status_code != 200 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    sidecars = first.json()["checks"]["sidecars"]
    assert first.status_code == 503 and not sidecars["ok"]
    assert len(sidecars["registered"]) == registered
    assert sidecars["poller_lookups"] == MAX_POLLER_LOOKUPS  # bounded, not one per registered sidecar
    assert (
        sum(entry["pollers"] is not None for entry in sidecars["registered"].values()) == MAX_POLLER_LOOKUPS
    )
    # The second probe and /health got the same answer, computed once, with its age.
    assert computed == 1 and second.json()["checks"] == first.json()["checks"]
    assert first.json()["checks_age_s"] == 0.0 and second.json()["checks_age_s"] > 0.0
    assert health.json()["ready"] is False and health.json()["checks"] == first.json()["checks"]
    assert after.status_code == 200, after.text
    ready = after.json()["checks"]["sidecars"]
    assert ready["poller_lookups"] == 1 and ready["registered"][world.sidecar_id("gpu")]["pollers"]
    assert len(ready["registered"]) == registered + 1


def test_the_readiness_cache_refuses_a_negative_age() -> None:
    with pytest.raises(ValueError, match="max_age_s must be >= 0"):
        ReadinessCache(max_age_s=-1.0)
