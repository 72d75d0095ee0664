"""Readiness over sharded placement registries, and the settings that say which registries there are."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from activities.placement_client import shard_of
from api.app import create_app
from api.settings import ApiSettings, SettingsError
from tests.support.temporal_harness import Harness, fast_policy

POOL = "gpu.test"


@pytest.fixture
async def world(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path, shards=4, pools=(POOL,)) as harness:
        yield harness


@pytest.mark.service
async def test_readyz_finds_a_sidecar_in_any_shard_of_the_configured_pools(world: Harness) -> None:
    # A sidecar whose id hashes to a shard other than 0: the unsharded check would never see it.
    name = next(f"gpu{index}" for index in range(64) if shard_of(world.sidecar_id(f"gpu{index}"), 4) != 0)
    settings = ApiSettings(
        api_keys=("k",),
        admin_keys=("admin",),  # the checks' details are for admins
        livekit_api_secret="secret-0123456789abcdef0123456789abcdef",
        control_task_queue=world.control_queue,
        placement_workflow_id=world.placement_id,
        placement_shards=4,
        placement_pools=(POOL,),
    )
    app = create_app(settings, temporal_client=world.client, policy=fast_policy())
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
