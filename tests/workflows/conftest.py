"""Fixtures for the orchestration tests: a loopback asset server, avatars, and an isolated Temporal
harness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import temporal
from tests.support.fixtures import asset_server, avatar_url, harness, sidecars
from tests.support.restartable_temporal import RestartableTemporal

__all__ = ["asset_server", "avatar_url", "harness", "sidecars"]


@pytest.fixture
def temporal_server(tmp_path: Path, service_logs_dir: Path) -> Iterator[RestartableTemporal]:
    config = temporal.TemporalDevServerConfig(db_file=tmp_path / "temporal.db").with_free_ports()
    server = RestartableTemporal(config, service_logs_dir / f"temporal-outage-{config.port}.log")
    try:
        server.start()
        yield server
    finally:
        server.stop_all()
