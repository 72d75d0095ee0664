"""Fixtures for the integration tests: the whole service in this process, once per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from infra.livekit import LiveKitServerConfig
from infra.temporal import TemporalDevServerConfig
from tests.support.api_stack import ApiStack, api_stack


@pytest.fixture(scope="module")
async def stack(
    temporal_dev_server: TemporalDevServerConfig,
    livekit_server: LiveKitServerConfig,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[ApiStack]:
    work_dir = tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}-stack")
    async with api_stack(temporal_dev_server, livekit_server, work_dir) as world:
        yield world
