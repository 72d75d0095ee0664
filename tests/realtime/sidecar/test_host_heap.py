"""The sidecar freezes what loading left once its engine is warm, and reports collector pauses on /healthz
(`realtime.heap`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from realtime.engine.protocol import EngineConfig
from realtime.sidecar.config import HostConfig, ServerConfig
from realtime.sidecar.engine_adapter import EngineAdapter
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.server import create_app
from tests.support.credentials import SIDECAR_SECRET, service_headers
from tests.support.heap_state import unfrozen_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def _nothing_frozen() -> Iterator[None]:
    """Each test starts unfrozen (an earlier module's sidecar fixture may have frozen the heap) and leaves no
    disabled collector behind (tests.support.heap_state)."""
    with unfrozen_heap():
        yield


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[SidecarHost]:
    """A sidecar host on the preview engine (no model files), not warmed up yet."""
    engine = EngineAdapter(EngineConfig(engine="preview", device="cpu", cache_dir=tmp_path / "cache"))
    sidecar_host = SidecarHost(engine, HostConfig(sidecar_id="sidecar-heap", slots_total=2))
    try:
        yield sidecar_host
    finally:
        sidecar_host.gc_pauses.uninstall()
        await sidecar_host.close()


async def test_the_first_warm_up_collects_and_then_freezes_the_heap(host: SidecarHost) -> None:
    assert gc.get_freeze_count() == 0
    gc.disable()  # only the warm-up's own collection may free the cycle below
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    cycle = weakref.ref(first)
    del first, second
    assert cycle() is not None

    result = await host.warm_up()

    assert not result.already_warm and result.engine == "preview"
    assert gc.get_freeze_count() > 0
    assert cycle() is None  # collected before the freeze, not kept alive in the permanent generation
    # Already warm: nothing loaded, nothing frozen again.
    gc.unfreeze()
    assert (await host.warm_up()).already_warm
    assert gc.get_freeze_count() == 0


async def test_healthz_reports_collector_pauses_to_the_service_only(host: SidecarHost) -> None:
    host.gc_pauses.install()  # as process.serve does
    await host.warm_up()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    gc.collect()
    app = create_app(host, ServerConfig(service_secret=SIDECAR_SECRET))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sidecar.test"
    ) as client:
        anonymous = (await client.get("/healthz")).json()
        assert anonymous == {"status": "ok"}
        health = (await client.get("/healthz", headers=service_headers())).json()
    report = health["gc"]
    assert set(report) == {
        "collections_by_generation",
        "pause_ms_max_by_generation",
        "pause_ms_total",
        "frozen_objects",
    }
    collections = report["collections_by_generation"]
    assert len(collections) == 3 and len(report["pause_ms_max_by_generation"]) == 3
    assert collections[2] >= 2  # the warm-up's collection and the one above
    assert report["pause_ms_total"] >= 0.0
    # The permanent generation as it is now: frozen objects freed by reference counting leave it.
    assert 0 < report["frozen_objects"] <= frozen
