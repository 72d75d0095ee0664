"""Real sidecar PROCESSES for orchestration tests: `lipsync sidecar`, exactly as production runs it.

Each one is `python -m infra.cli sidecar ...`: the production sidecar (`realtime.sidecar.process`
with `SidecarHost`, the CPU preview engine, its HTTP/WS server, LiveKit and RTMP publishing) and
its Temporal worker (`activities.sidecar_worker`) on its own task queue, connected to the test's
Temporal server and registered with the test's own PlacementWorkflow. SIGKILL is a real dead
host (no goodbye, no completion: its queue simply stops being polled); SIGTERM a real graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from infra.paths import PROJECT_ROOT
from infra.process import free_port, log_tail, spawn
from tests.support.credentials import service_headers
from tests.support.temporal_harness import Harness
from workflows.contracts import sidecar_task_queue

REGISTRATION_TIMEOUT_S = 90.0  # process start + engine warm-up + first registration, on two busy cores


class SidecarProcesses:
    """Sidecar processes this test started (and only those), stopped at the end whatever happens."""

    def __init__(
        self,
        temporal_target: str,
        harness: Harness,
        log_dir: Path,
        *,
        livekit_credentials: tuple[str, str] = ("", ""),
        lease_s: float = 3.0,
        registration_interval_s: float = 0.5,
    ) -> None:
        self.temporal_target = temporal_target
        self.harness = harness
        self.log_dir = log_dir
        self.livekit_credentials = livekit_credentials
        self.lease_s = lease_s
        self.registration_interval_s = registration_interval_s
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.ports: dict[str, int] = {}  # each sidecar's HTTP/WS port
        self._log_files: list[IO[bytes]] = []

    async def spawn(
        self, name: str, *, slots: int = 1, lease_s: float | None = None, recordings_dir: Path | None = None
    ) -> str:
        """Start `lipsync sidecar` and wait until placement lists it. Returns its sidecar id."""
        sidecar_id = self.harness.sidecar_id(name)
        log_path = self.log_dir / f"sidecar-{name}.log"
        log = log_path.open("wb")
        self._log_files.append(log)
        self.ports[name] = port = free_port()
        argv = [
            sys.executable, "-m", "infra.cli", "sidecar",
            "--port", str(port),
            "--engine", "preview", "--device", "cpu",
            "--cache-dir", str(self.harness.cache_dir),  # shared disk: a prepared avatar is reused
            "--slots", str(slots),
            "--sidecar-id", sidecar_id,
            "--task-queue", sidecar_task_queue(sidecar_id),
            "--temporal-address", self.temporal_target,
            "--asset-dir", str(self.harness.asset_dir),
            "--control-task-queue", self.harness.control_queue,
            "--placement-id", self.harness.placement_id,
            "--placement-shards", str(self.harness.shards),
            "--pool", self.harness.pools[0],
            "--lease-s", str(lease_s or self.lease_s),
            "--registration-interval-s", str(self.registration_interval_s),
        ]  # fmt: skip
        if recordings_dir is not None:
            argv += ["--recordings-dir", str(recordings_dir)]
        api_key, api_secret = self.livekit_credentials
        env = {**os.environ, "LIVEKIT_API_KEY": api_key, "LIVEKIT_API_SECRET": api_secret}
        # Tethered: it dies with this test process however that ends (a CI `timeout` included).
        process = await asyncio.to_thread(spawn, argv, log=log, cwd=PROJECT_ROOT, env=env)
        self.running[name] = process
        self.logs[name] = log_path
        deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
        while sidecar_id not in await self.harness.slots_held():
            if process.poll() is not None:
                raise AssertionError(
                    f"sidecar {name} exited with {process.returncode}:\n{log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"sidecar {name} did not register in {REGISTRATION_TIMEOUT_S} s:\n{log_tail(log_path)}"
                )
            await asyncio.sleep(0.2)
        return sidecar_id

    async def healthz(self, name: str) -> dict[str, Any]:
        """The sidecar's own view (`GET /healthz`): engine, capacity and the sessions it hosts."""
        async with httpx.AsyncClient(timeout=5, trust_env=False, headers=service_headers()) as client:
            response = await client.get(f"http://127.0.0.1:{self.ports[name]}/healthz")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def kill(self, name: str) -> None:
        """SIGKILL: the host dies without a word."""
        process = self.running.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL

    async def terminate(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM: a graceful stop. Returns the exit status."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(process.wait, timeout_s)

    def stop_all(self) -> None:
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.running.clear()
        for log in self._log_files:
            with contextlib.suppress(OSError):
                log.close()
