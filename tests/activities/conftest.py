"""Fixtures for activity unit tests: the loopback asset server and the fast test policy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.asset_server import AssetServer
from tests.support.temporal_harness import fast_policy
from workflows.policy import SessionPolicy


@pytest.fixture(scope="module")
def asset_server() -> Iterator[AssetServer]:
    server = AssetServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def policy() -> SessionPolicy:
    return fast_policy()
