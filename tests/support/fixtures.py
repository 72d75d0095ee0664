"""Fixtures shared by the orchestration and security tests: a loopback asset server with a good avatar, an
isolated Temporal harness, and real sidecar processes. A conftest imports the ones its folder uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from infra.livekit import LiveKitServerConfig
from infra.temporal import TemporalDevServerConfig
from tests.support.asset_server import AssetServer
from tests.support.media import frames_zip
from tests.support.sidecar_process import SidecarProcesses
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
def sidecars(
    temporal_dev_server: TemporalDevServerConfig,
    harness: Harness,
    tmp_path: Path,
    livekit_server: LiveKitServerConfig,
) -> Iterator[SidecarProcesses]:
    """Real sidecar processes serving `harness`, publishing to the test livekit-server."""
    processes = SidecarProcesses(
        temporal_dev_server.target,
        harness,
        tmp_path,
        livekit_credentials=(livekit_server.api_key, livekit_server.api_secret),
    )
    yield processes
    processes.stop_all()
