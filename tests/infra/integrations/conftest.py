"""Fixtures for the integration tests: the whole service in this process, once per test module; the agents
env."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.livekit import LiveKitServerConfig
from infra.temporal import TemporalDevServerConfig
from tests.support.api_stack import ApiStack, api_stack
from tests.support.framework_venv import framework_python_or_skip
from tests.support.sidecar_harness import avatar_zip_path

__all__ = ["agents_python", "avatar_zip_path", "stack"]

AGENTS_REQUIREMENTS = ["livekit-agents==1.8.9", "httpx==0.28.1", "websockets==17.4"]


@pytest.fixture(scope="module")
def agents_python() -> Path:
    """The livekit-agents 1.8.9 env (it pins livekit 1.1.21, the service another): built once, cached."""
    return framework_python_or_skip(
        "livekit-agents-1.8.9", AGENTS_REQUIREMENTS, Path(__file__).with_name("agents-constraints.txt")
    )


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
