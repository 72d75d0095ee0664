"""Fixtures for the orchestration tests: a loopback asset server, avatars, and an isolated Temporal harness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from infra import temporal
from tests.support.asset_server import AssetServer
from tests.support.media import frames_zip
from tests.support.restartable_temporal import RestartableTemporal
from tests.support.temporal_harness import Harness


@pytest.fixture(scope="session")
def asset_server() -> Iterator[AssetServer]:
    server = AssetServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def avatar_url(asset_server: AssetServer) -> str:
    """A good avatar: astronaut frames in a zip, served from 127.0.0.1."""
    return asset_server.serve("/avatars/astronaut.zip", frames_zip(), "application/zip")


@pytest.fixture
async def harness(temporal_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path) as world:
        yield world


@pytest.fixture
def temporal_server(tmp_path: Path, service_logs_dir: Path) -> Iterator[RestartableTemporal]:
    config = temporal.TemporalDevServerConfig(db_file=tmp_path / "temporal.db").with_free_ports()
    server = RestartableTemporal(config, service_logs_dir / f"temporal-outage-{config.port}.log")
    try:
        server.start()
        yield server
    finally:
        server.stop_all()
