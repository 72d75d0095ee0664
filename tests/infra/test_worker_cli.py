"""`lipsync worker` and `lipsync sidecar`'s Temporal side as real processes and command lines.

(`lipsync sidecar` serving sessions is exercised by the host-failure, fallback and happy-path tests.)
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.sidecar_worker import SidecarTemporalOptions
from infra.cli import build_parser
from infra.cli.sidecar import temporal_options_from_args
from infra.paths import PROJECT_ROOT
from infra.process import free_port, log_tail, spawn, stop_process_group
from infra.temporal import TemporalDevServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.temporal_harness import fast_policy, replay_all
from workflows.client import start_session
from workflows.contracts import (
    AvatarKind,
    AvatarSource,
    ErrorCode,
    SessionRequest,
)


def test_worker_subcommand_is_registered() -> None:
    args = build_parser().parse_args(["worker", "--temporal-address", "127.0.0.1:1", "--task-queue", "q"])
    assert args.command == "worker" and args.task_queue == "q" and callable(args.handler)


@pytest.mark.service
async def test_worker_process_runs_sessions(
    temporal_dev_server: TemporalDevServerConfig, temporal_client: Client, tmp_path: Path
) -> None:
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    log = (tmp_path / "worker.log").open("wb")
    # Tethered (infra.process.spawn): it dies with this test process however that ends.
    process = await asyncio.to_thread(
        spawn,
        [
            sys.executable,
            "-m",
            "infra.cli",
            "worker",
            "--temporal-address",
            temporal_dev_server.target,
            "--task-queue",
            queue,
            "--placement-id",
            f"placement-{queue}",
            "--asset-dir",
            str(tmp_path / "assets"),
        ],
        log=log,
        cwd=PROJECT_ROOT,
    )
    try:
        # The SSRF guard refuses this URL: the worker process ran the workflow and the fetch activity.
        request = SessionRequest(
            session_id=f"cli-{uuid.uuid4().hex[:8]}",
            room="cli-room",
            avatar=AvatarSource(url="http://10.0.0.1/a.zip", kind=AvatarKind.FRAMES_ZIP),
            output=output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x")),
        )
        handle = await start_session(temporal_client, request, fast_policy(), task_queue=queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(handle.result(), timeout=60)
        assert isinstance(failure.value.cause, ApplicationError)
        assert failure.value.cause.type == ErrorCode.URL_FORBIDDEN_ADDRESS.value
        assert await replay_all(temporal_client, [handle.id]) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = await asyncio.to_thread(process.wait, 30)
        finally:
            if process.poll() is None:
                stop_process_group(process.pid)
            log.close()
    assert returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


def test_sidecar_subcommand_takes_its_temporal_options(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "sidecar",
            "--temporal-address",
            "127.0.0.1:1",
            "--placement-id",
            "p",
            "--control-task-queue",
            "q",
            "--lease-s",
            "9",
            "--registration-interval-s",
            "3",
            "--asset-dir",
            str(tmp_path),
        ]
    )
    assert temporal_options_from_args(args, Path("/default")) == SidecarTemporalOptions(
        address="127.0.0.1:1",
        namespace="default",
        asset_dir=tmp_path,
        control_task_queue="q",
        placement_workflow_id="p",
        lease_s=9.0,
        registration_interval_s=3.0,
    )
    assert temporal_options_from_args(parser.parse_args(["sidecar", "--no-temporal"]), Path("/d")) is None
    lapsing = parser.parse_args(["sidecar", "--lease-s", "5", "--registration-interval-s", "5"])
    with pytest.raises(ValueError, match="--registration-interval-s"):
        temporal_options_from_args(lapsing, Path("/d"))


async def test_sidecar_without_reachable_temporal_exits_with_an_error(tmp_path: Path) -> None:
    """A sidecar that cannot join Temporal is useless to placement: it stops (status 1) instead of idling."""
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        process = await asyncio.to_thread(
            spawn,
            [
                sys.executable,
                "-m",
                "infra.cli",
                "sidecar",
                "--temporal-address",
                f"127.0.0.1:{free_port()}",
                "--engine",
                "preview",
                "--device",
                "cpu",
                "--no-warm-up",
                "--port",
                str(free_port()),
                "--asset-dir",
                str(tmp_path / "assets"),
            ],
            log=log,
            cwd=PROJECT_ROOT,
        )
        try:
            returncode = await asyncio.to_thread(process.wait, 60)
        finally:
            if process.poll() is None:
                stop_process_group(process.pid)
    assert returncode == 1, log_tail(log_path)
    assert "sidecar service failed" in log_path.read_text()


def test_worker_without_reachable_temporal_says_so(tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = spawn(
            [
                sys.executable,
                "-m",
                "infra.cli",
                "worker",
                "--temporal-address",
                f"127.0.0.1:{free_port()}",
                "--asset-dir",
                str(tmp_path / "assets"),
            ],
            log=log,
            cwd=PROJECT_ROOT,
        )
        try:
            returncode = process.wait(60)
        finally:
            if process.poll() is None:
                stop_process_group(process.pid)
    output = log_path.read_text()
    assert returncode == 1, output[-2000:]
    assert "error: cannot reach Temporal at 127.0.0.1:" in output and "Traceback" not in output
