"""Several replicas of every tier on one machine, and a rolling restart of each tier with speech flowing.

Real processes, as production runs them: 2 `lipsync api`, 2 `lipsync worker`, 3 `lipsync sidecar`
(CPU preview engine), a Temporal dev server with its database in a file, and the test's
livekit-server. Two sessions are started, one through each API replica; a speaker per session
streams utterance after utterance over the API's audio relay (reconnecting through the other
replica when its connection drops, as a client behind a load balancer would). Then every process
of each tier, one at a time, gets SIGTERM and is started again: workers, sidecars (their sessions
move to another sidecar), APIs. After each restart both sessions must play speech again, and no
session may end before the test stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from lipsync_client import AudioStream, Avatar, LipsyncClient, LipsyncError, LiveKitOutput
from websockets.exceptions import WebSocketException

from infra.demo import avatar_zip_bytes, demo_policies, speech_pcm
from infra.livekit import LiveKitServerConfig
from infra.paths import PROJECT_ROOT
from infra.process import ManagedProcess, free_port, log_tail
from infra.temporal import TemporalDevServerConfig, dev_server_process
from tests.support.asset_server import AssetServer
from tests.support.credentials import SIDECAR_SECRET
from tests.support.temporal_harness import Harness
from workflows.contracts import sidecar_task_queue
from workflows.temporal_client import connect_client

pytestmark = pytest.mark.service

KEY = "replica-key"
SIDECARS = ("a", "b", "c")
PROGRESS_TIMEOUT_S = 90.0  # a moved session: placement, avatar preparation (cached), output, then speech
POLICY = {
    # A rolling restart can move one session once per sidecar restarted.
    "host_failure.max_replacements": 2 * len(SIDECARS),
    "session.stop_grace_s": 2.0,
    **{
        f"activities.{name}.heartbeat_timeout_s": 10.0
        for name in ("prepare_avatar", "warm_up", "open_output", "run_session", "stop_session", "teardown")
    },
}


class ProcessHarness(Harness):
    """The test's control queue and placement id, served by `lipsync worker` processes, not in-process."""

    async def _start_control_worker(self) -> None:
        return None


@dataclass
class Speaker:
    session_id: str
    path: str  # the start response's audio_ws_url path and query, sent to whichever API replica is up
    finished: int = 0
    reconnects: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Tier:
    """Processes of one tier, each restartable under the same name (and port)."""

    make: Callable[[str, int], ManagedProcess]
    running: dict[str, ManagedProcess] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)

    async def start(self, name: str) -> None:
        self.incarnations[name] = self.incarnations.get(name, 0) + 1
        process = self.make(name, self.incarnations[name])
        self.running[name] = process
        await asyncio.to_thread(process.start)

    async def restart(self, name: str) -> None:
        process = self.running.pop(name)
        await asyncio.to_thread(process.stop)  # SIGTERM, then SIGKILL only past 10 s
        # uvicorn (the API) re-raises the SIGTERM it handled once its graceful shutdown is done.
        graceful = process.returncode == 0 or (
            process.returncode == -signal.SIGTERM
            and "Finished server process" in process.log_path.read_text()
        )
        assert graceful, f"{process.name} did not stop gracefully: exit {process.returncode}"
        await self.start(name)

    def stop_all(self) -> None:
        for process in self.running.values():
            process.stop()
        self.running.clear()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.asynccontextmanager
async def cluster(
    livekit: LiveKitServerConfig, work: Path
) -> AsyncIterator[tuple[ProcessHarness, dict[str, Tier], list[int], str]]:
    logs = work / "logs"
    temporal = TemporalDevServerConfig(db_file=work / "temporal.db").with_free_ports()
    temporal_process = dev_server_process(temporal, logs / "temporal.log")
    await asyncio.to_thread(temporal_process.start)
    assets = AssetServer().start()
    client = await connect_client(temporal.target)
    harness = ProcessHarness(client, work, livekit_credentials=(livekit.api_key, livekit.api_secret))
    policies = demo_policies(work, POLICY)
    sidecar_ports = {name: free_port() for name in SIDECARS}
    api_ports = [free_port(), free_port()]
    python = [sys.executable, "-m", "infra.cli"]
    base_env = {"TEMPORAL_ADDRESS": temporal.target, "LIVEKIT_API_KEY": livekit.api_key}
    base_env["LIVEKIT_API_SECRET"] = livekit.api_secret
    base_env["LIPSYNC_SIDECAR_SECRET"] = SIDECAR_SECRET  # shared by the APIs and the sidecars

    def worker(name: str, n: int) -> ManagedProcess:
        log = logs / f"worker-{name}-{n}.log"
        argv = [
            *python,
            "worker",
            "--temporal-address",
            temporal.target,
            "--task-queue",
            harness.control_queue,
            "--placement-id",
            harness.placement_id,
            "--asset-dir",
            str(harness.asset_dir),
        ]
        return ManagedProcess(
            f"worker-{name}",
            argv,
            log,
            lambda: log.exists() and "control worker running" in log.read_text(),
            cwd=PROJECT_ROOT,
            env=base_env,
        )

    def sidecar(name: str, n: int) -> ManagedProcess:
        sidecar_id = harness.sidecar_id(name)
        argv = [
            *python,
            "sidecar",
            "--port",
            str(sidecar_ports[name]),
            "--engine",
            "preview",
            "--device",
            "cpu",
            "--cache-dir",
            str(harness.cache_dir),
            "--slots",
            "2",
            "--sidecar-id",
            sidecar_id,
            "--task-queue",
            sidecar_task_queue(sidecar_id),
            "--temporal-address",
            temporal.target,
            "--asset-dir",
            str(harness.asset_dir),
            "--control-task-queue",
            harness.control_queue,
            "--placement-id",
            harness.placement_id,
            "--lease-s",
            "3",
            "--registration-interval-s",
            "0.5",
        ]
        health_url = f"http://127.0.0.1:{sidecar_ports[name]}/healthz"
        return ManagedProcess(
            f"sidecar-{name}",
            argv,
            logs / f"sidecar-{name}-{n}.log",
            lambda: _http_ok(health_url),
            cwd=PROJECT_ROOT,
            env=base_env,
            startup_timeout_s=120.0,
        )

    sidecar_urls = ",".join(f"{harness.sidecar_id(n)}=http://127.0.0.1:{p}" for n, p in sidecar_ports.items())

    def api(name: str, n: int) -> ManagedProcess:
        port = api_ports[int(name)]
        env = {
            **base_env,
            "LIPSYNC_API_KEYS": KEY,
            "LIVEKIT_URL": livekit.ws_url,
            "LIPSYNC_SIDECAR_URLS": sidecar_urls,
            "LIPSYNC_CONTROL_TASK_QUEUE": harness.control_queue,
            "LIPSYNC_PLACEMENT_WORKFLOW_ID": harness.placement_id,
            "LIPSYNC_POLICIES": str(policies),
            "LIPSYNC_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        }
        return ManagedProcess(
            f"api-{name}",
            [*python, "api", "--port", str(port)],
            logs / f"api-{name}-{n}.log",
            lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"),
            cwd=PROJECT_ROOT,
            env=env,
        )

    tiers = {"worker": Tier(worker), "sidecar": Tier(sidecar), "api": Tier(api)}
    try:
        async with harness:
            await asyncio.gather(*(tiers["worker"].start(name) for name in ("0", "1")))
            for name in SIDECARS:
                await tiers["sidecar"].start(name)
            await wait_registered(harness, {harness.sidecar_id(name) for name in SIDECARS})
            await asyncio.gather(*(tiers["api"].start(name) for name in ("0", "1")))
            avatar_url = assets.serve("/astronaut.zip", avatar_zip_bytes(side_px=128), "application/zip")
            yield harness, tiers, api_ports, avatar_url
    except BaseException:
        for path in sorted(logs.glob("*.log")):
            sys.stderr.write(f"--- {path.name}\n{log_tail(path, 25)}\n")
        raise
    finally:
        for tier in ("api", "sidecar", "worker"):
            await asyncio.to_thread(tiers[tier].stop_all)
        assets.stop()
        await asyncio.to_thread(temporal_process.stop)


async def wait_registered(harness: Harness, sidecar_ids: set[str], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        registered = {record.sidecar_id for record in (await harness.snapshot_or_empty()).sidecars}
        if sidecar_ids <= registered:
            return
        assert time.monotonic() < deadline, f"not registered: {sidecar_ids - registered}"
        await asyncio.sleep(0.2)


async def speak(speaker: Speaker, api_ports: list[int], pcm: bytes, stop: asyncio.Event) -> None:
    """Utterance after utterance; on a dropped connection, reconnect through the next API replica."""
    index = 0
    while not stop.is_set():
        url = f"ws://127.0.0.1:{api_ports[index % len(api_ports)]}{speaker.path}"
        try:
            async with AudioStream(url, api_key=KEY) as audio:
                await audio.wait_ready(PROGRESS_TIMEOUT_S)
                while not stop.is_set():
                    await audio.stream_pcm(pcm)
                    finished = await audio.next_event("playback_finished", timeout_s=30)
                    if not finished["interrupted"]:
                        speaker.finished += 1
        except (LipsyncError, OSError, WebSocketException) as exc:
            speaker.reconnects += 1
            speaker.failures.append(f"{type(exc).__name__}: {exc}")
            index += 1
            await asyncio.sleep(0.3)


async def watch(
    session_ids: list[str], api_ports: list[int], stop: asyncio.Event, phases: dict[str, list[str]]
) -> None:
    """Every session's phase changes, read from whichever API replica answers."""
    async with httpx.AsyncClient(timeout=3.0, trust_env=False, headers={"X-API-Key": KEY}) as http:
        while not stop.is_set():
            for session_id in session_ids:
                for port in api_ports:
                    try:
                        response = await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session_id}")
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:
                        phase = response.json()["phase"]
                        if not phases[session_id] or phases[session_id][-1] != phase:
                            phases[session_id].append(phase)
                        break
            await asyncio.sleep(0.3)


async def speech_flows(speakers: list[Speaker], what: str) -> None:
    """Every session finishes at least one more whole utterance than it had: speech flows after `what`."""
    before = [s.finished for s in speakers]
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while any(s.finished <= b for s, b in zip(speakers, before, strict=True)):
        assert time.monotonic() < deadline, (
            what,
            [(s.session_id, s.finished, s.failures[-3:]) for s in speakers],
        )
        await asyncio.sleep(0.2)


async def test_rolling_restart_of_every_tier_drops_no_live_session(
    livekit_server: LiveKitServerConfig, tmp_path: Path
) -> None:
    pcm = speech_pcm("Rolling restarts keep me talking.")
    async with cluster(livekit_server, tmp_path) as (harness, tiers, api_ports, avatar_url):
        speakers: list[Speaker] = []
        for index, port in enumerate(api_ports):  # one session through each API replica
            async with LipsyncClient(f"http://127.0.0.1:{port}", KEY) as client:
                created = await client.create_session(
                    avatar=Avatar(frames_zip_url=avatar_url),
                    livekit=LiveKitOutput(room=f"replica-room-{index}"),
                )
            harness.workflow_ids.append(f"session-{created.session_id}")
            parts = urlsplit(created.audio_ws_url)
            speakers.append(
                Speaker(created.session_id, parts.path + (f"?{parts.query}" if parts.query else ""))
            )
        stop = asyncio.Event()
        phases: dict[str, list[str]] = {s.session_id: [] for s in speakers}
        tasks = [asyncio.create_task(speak(s, api_ports, pcm, stop)) for s in speakers]
        tasks.append(asyncio.create_task(watch([s.session_id for s in speakers], api_ports, stop, phases)))
        try:
            await speech_flows(speakers, "start")
            for name in ("0", "1"):
                await tiers["worker"].restart(name)
                await speech_flows(speakers, f"worker {name} restarted")
            for name in SIDECARS:
                await tiers["sidecar"].restart(name)
                await wait_registered(harness, {harness.sidecar_id(name)})
                await speech_flows(speakers, f"sidecar {name} restarted")
            for name in ("0", "1"):
                await tiers["api"].restart(name)
                await speech_flows(speakers, f"api {name} restarted")
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=40)
            for task in tasks:
                task.cancel()
        async with LipsyncClient(f"http://127.0.0.1:{api_ports[0]}", KEY) as client:
            finals = []
            for speaker in speakers:
                status = await client.get_session(speaker.session_id)
                assert status.phase == "live", (speaker.session_id, phases[speaker.session_id], status.raw)
                await client.stop_session(speaker.session_id, "rolling restart test done")
                finals.append(await client.wait_for_phase(speaker.session_id, {"completed"}, timeout_s=30))

    for speaker, final in zip(speakers, finals, strict=True):
        seen = phases[speaker.session_id]
        assert not {"failed", "cancelled"} & set(seen), (speaker.session_id, seen)
        assert final.end_reason == "stopped", final.raw
        sys.stdout.write(
            f"{speaker.session_id}: {speaker.finished} utterances, {speaker.reconnects} reconnects, "
            f"{final.raw.get('replacements')} re-placements, phases {seen}\n"
        )
