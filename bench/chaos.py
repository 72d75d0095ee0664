"""Chaos benchmark: N live sessions on a real local deployment while components are killed or paused.

    python -m bench.chaos --sessions 8 --faults 30 --json bench/results/chaos-cpu-<yyyymmdd>.json
        [--sidecars 3] [--slots 4] [--seed N]

Deployment (bench.api's: the embedded stack — Temporal dev server on its database file,
livekit-server, nginx-rtmp — one `lipsync worker`, `--sidecars` × `lipsync sidecar` with the
preview engine, one `lipsync api`, all separate processes on free ports). Sessions are created
through the API with LiveKit first and RTMP as the policy's fallback (switch back on, the policy's
default). Every session speaks all along: a client per session streams espeak-ng speech through
the API's audio WebSocket in real time (an utterance, a pause, the next), reconnecting with a fresh
`audio_ws_url` whenever its socket closes (API or sidecar killed); the utterances that played out
are counted per session.

Faults, one at a time, in an order drawn from `--seed` (recorded in the JSON):
- `temporal`: the Temporal server stopped for 8-20 s and started again on the same database;
- `worker`: the control worker SIGKILLed and restarted;
- `api`: the API process SIGKILLed and restarted;
- `sidecar_kill`: a sidecar SIGKILLed (its sessions are re-placed: `replace_s`), then restarted;
- `sidecar_pause`: a sidecar SIGSTOPped for 2-6 s (under the heartbeat timeout) and SIGCONTed;
- `livekit`: livekit-server SIGKILLed (sessions fail over to RTMP: `failover_s`, from the kill until the
  workflow's status shows the session on RTMP), restarted on the same ports (sessions switch back to
  LiveKit: `switch_back_s`, from the restart). Each session's sidecar records the failover's steps
  (realtime.sidecar.failover) and reports them with its stats: `failover_steps` sets them against the
  kill, on the host's wall clock: `detect_s` (kill -> the sidecar saw LiveKit down), `switch_s` (kill ->
  the session publishes to RTMP: the media-side failover), `standby_connect_s` (the RTMP standby's
  connect, of which `rtmp_connect_wait_s` waiting for a thread) and `status_s` (`failover_s`);
- `rtmp`: nginx-rtmp SIGKILLed while the sessions are on LiveKit with RTMP as their admitted fallback,
  restarted 2-5 s later (the sessions must not notice).

After each fault every session must be live again with fresh stats within `--recover-s`;
a session that ended or never recovered counts in `sessions_lost_unexpectedly`. At the end every
session is stopped and the leaks are counted: slots still held in placement, sessions still on a
sidecar, and processes of the run still alive after the deployment stopped.

A run that loses a session (or fails) keeps its work directory (`--keep-on-failure`, on by default):
every process's log under `logs/` (sidecars, worker, api, stack services), each session's Temporal
history under `histories/` and the lost sessions in `lost.json`; the path is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import websockets

from bench.api import Deployment
from bench.machine import cpu_name
from infra import stack
from infra.demo import avatar_zip_bytes, demo_policies, serve_directory
from workflows.client import session_status, session_workflow_id, stop_session
from workflows.contracts import PLACEMENT_WORKFLOW_ID
from workflows.placement import PlacementWorkflow
from workflows.temporal_client import connect_client

logger = logging.getLogger("bench.chaos")

FAULT_KINDS = ("temporal", "worker", "api", "sidecar_kill", "sidecar_pause", "livekit", "rtmp")
POLL_S = 0.25
SPEECH_TEXT = "The quick brown fox jumps over the lazy dog, while the avatar keeps talking through the chaos."
SPEECH_RATE_HZ = 16_000
CHUNK_S = 0.1  # the client sends 100 ms of PCM per message, paced in real time
PAUSE_S = 1.0  # silence between two utterances
LOAD_SAMPLE_S = 15.0  # the machine's 1-min load average is sampled this often during the run


def speech_pcm(directory: Path) -> bytes:
    """espeak-ng speech as 16 kHz s16le mono (the audio WebSocket's default format)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng): the sessions need speech")
    wav = directory / "speech.wav"
    subprocess.run([espeak, "-w", str(wav), SPEECH_TEXT], check=True, capture_output=True, timeout=60)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SPEECH_RATE_HZ)
    chunks: list[bytes] = []
    with av.open(str(wav)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(bytes(out.to_ndarray().tobytes()) for out in resampler.resample(frame))
        chunks.extend(bytes(out.to_ndarray().tobytes()) for out in resampler.resample(None))
    return b"".join(chunks)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


async def speak_until_closed(
    ws: websockets.ClientConnection, speech: bytes, on_playback_finished: Callable[[], None]
) -> None:
    """Wait for the session's `ready`, then send `speech` as utterances paced in real time (CHUNK_S per
    message, PAUSE_S between) until the socket closes; `on_playback_finished` runs for each
    `playback_finished` the sidecar sends back."""
    while json.loads(await ws.recv()).get("type") != "ready":
        pass

    async def listen() -> None:
        async for message in ws:
            if isinstance(message, str) and json.loads(message).get("type") == "playback_finished":
                on_playback_finished()

    chunk_bytes = int(SPEECH_RATE_HZ * CHUNK_S) * 2
    listener = asyncio.create_task(listen())
    try:
        while not listener.done():
            for offset in range(0, len(speech), chunk_bytes):
                await ws.send(speech[offset : offset + chunk_bytes])
                await asyncio.sleep(CHUNK_S)
            await ws.send(json.dumps({"type": "end_of_utterance"}))
            await asyncio.sleep(PAUSE_S)
    finally:
        listener.cancel()


class ChaosDeployment(Deployment):
    """bench.api's deployment with long session limits (the sessions idle through the run) and restartable
    services."""

    def __init__(self, work_dir: Path, sidecars: int, slots: int) -> None:
        super().__init__(work_dir, sidecars, slots, "preview", 60.0)
        # stack services this run killed and started again: name -> pid
        self.restarted_stack: dict[str, int] = {}
        self.extra_processes: list[Any] = []

    def env(self) -> dict[str, str]:
        """bench.api's environment (keys, sidecar secret and URLs) with the chaos run's policies."""
        base = super().env()
        policies = demo_policies(
            self.work_dir,
            {"session.idle_timeout_s": 3600.0, "session.max_duration_s": 7200.0},
        )
        return {**base, "LIPSYNC_POLICIES": str(policies)}

    def process(self, name: str) -> Any:
        return next(process for process in self.processes if process.name == name)

    def stack_pid(self, name: str) -> int:
        state = stack.StackState.load(self.stack_dir)
        assert state is not None
        return self.restarted_stack.get(name) or state.pids[name]

    def restart_stack_service(self, name: str) -> None:
        process = stack.service_process(name, self.ports, self.stack_dir)
        process.start()
        assert process.pid is not None
        self.restarted_stack[name] = process.pid
        self.extra_processes.append(process)


class Chaos:
    def __init__(
        self, deployment: ChaosDeployment, sessions: int, rng: random.Random, recover_s: float
    ) -> None:
        self.deployment = deployment
        self.session_count = sessions
        self.rng = rng
        self.recover_s = recover_s
        self.sessions: list[str] = []
        self.lost: list[dict[str, Any]] = []
        self.failover_s: list[float] = []
        self.failover_switch_s: list[float] = []  # kill -> the sidecar switched (its own record)
        self.failover_detect_s: list[float] = []  # kill -> the sidecar saw the output down
        self.replace_s: list[float] = []
        self.switch_back_s: list[float] = []
        self.faults: list[dict[str, Any]] = []
        self.avatar_url = ""
        self.rtmp_url = ""
        self.speech = b""
        self.speakers: dict[str, asyncio.Task[None]] = {}
        self.utterances: dict[str, int] = {}  # session -> utterances that played out (playback_finished)
        self.audio_reconnects: dict[str, int] = {}
        self.load_1min: list[float] = []

    # --- sessions -----------------------------------------------------------------------

    async def client(self) -> Any:
        while True:
            try:
                return await connect_client(f"127.0.0.1:{self.deployment.ports.temporal}")
            except Exception:
                await asyncio.sleep(1.0)

    async def status(self, session_id: str) -> Any:
        while True:
            try:
                return await session_status(self.temporal, session_id)
            except Exception:
                await asyncio.sleep(POLL_S)

    async def start_sessions(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.deployment.api_url, headers={"X-API-Key": self.deployment.api_key}, timeout=60
        ) as http:
            created = []
            for index in range(self.session_count):
                room = f"chaos-{index}-{os.urandom(3).hex()}"
                body = {
                    "avatar": {"frames_zip_url": self.avatar_url},
                    "output": {"livekit": {"room": room}, "rtmp": {"url": f"{self.rtmp_url}/{room}"}},
                }
                response = await http.post("/v1/sessions", json=body)
                response.raise_for_status()
                created.append(response.json()["session_id"])
        self.sessions = created
        for session_id in created:
            self.speakers[session_id] = asyncio.create_task(self.speak(session_id))
        await self.wait_all(lambda s: s.phase.value == "live" and s.output == "livekit", since=None)

    async def speak(self, session_id: str) -> None:
        """Stream speech into the session until it is stopped, through the API's relay; reconnect on any
        close."""
        connects = 0
        while True:
            try:
                async with httpx.AsyncClient(
                    base_url=self.deployment.api_url,
                    headers={"X-API-Key": self.deployment.api_key},
                    timeout=10,
                ) as http:
                    response = await http.get(f"/v1/sessions/{session_id}")
                    response.raise_for_status()
                    session = response.json()
                if session["phase"] in ("completed", "failed", "cancelled"):
                    return
                async with websockets.connect(session["audio_ws_url"], open_timeout=30) as ws:
                    connects += 1
                    self.audio_reconnects[session_id] = connects - 1

                    def finished() -> None:
                        self.utterances[session_id] = self.utterances.get(session_id, 0) + 1

                    await speak_until_closed(ws, self.speech, finished)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API, the sidecar or the session went away: the client comes back
                logger.debug("speech client of %s reconnects: %r", session_id, exc)
            await asyncio.sleep(1.0)

    async def stop_speakers(self) -> None:
        for task in self.speakers.values():
            task.cancel()
        await asyncio.gather(*self.speakers.values(), return_exceptions=True)
        self.speakers.clear()

    async def stop_sessions(self) -> list[str]:
        await self.stop_speakers()
        for session_id in self.sessions:
            await stop_session(self.temporal, session_id, "bench.chaos")
        ends = []
        for session_id in self.sessions:
            status = await self.status(session_id)
            deadline = time.monotonic() + 60
            while (
                status.phase.value not in ("completed", "failed", "cancelled") and time.monotonic() < deadline
            ):
                await asyncio.sleep(POLL_S)
                status = await self.status(session_id)
            ends.append(f"{status.phase.value}:{status.end_reason.value if status.end_reason else '-'}")
        return ends

    async def wait_all(self, predicate: Any, since: datetime | None) -> list[str]:
        """Wait until every session satisfies predicate (and reported after `since`); returns the ones that
        did not."""
        deadline = time.monotonic() + self.recover_s
        pending = list(self.sessions)
        while pending and time.monotonic() < deadline:
            still = []
            for session_id in pending:
                status = await self.status(session_id)
                if status.phase.value in ("completed", "failed", "cancelled"):
                    self.lost.append({"session": session_id, "phase": status.phase.value,
                                      "error": status.error.code if status.error else None})  # fmt: skip
                    continue
                fresh = since is None or (
                    bool(status.stats_reported_at)
                    and datetime.fromisoformat(status.stats_reported_at) > since
                )
                if not (predicate(status) and fresh):
                    still.append(session_id)
            pending = still
            if pending:
                await asyncio.sleep(1.0)
        for session_id in pending:
            self.lost.append({"session": session_id, "phase": "unrecovered"})
        self.sessions = [s for s in self.sessions if not any(entry["session"] == s for entry in self.lost)]
        return pending

    # --- faults -------------------------------------------------------------------------

    async def inject(self, kind: str) -> dict[str, Any]:
        deployment = self.deployment
        record: dict[str, Any] = {"kind": kind, "at": datetime.now(UTC).isoformat()}
        if kind == "temporal":
            outage_s = self.rng.uniform(8.0, 20.0)
            os.killpg(deployment.stack_pid("temporal"), signal.SIGTERM)
            await asyncio.sleep(outage_s)
            await asyncio.to_thread(deployment.restart_stack_service, "temporal")
            record["outage_s"] = round(outage_s, 1)
        elif kind in ("worker", "api"):
            process = deployment.process(kind)
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.start)
        elif kind == "sidecar_kill":
            victim = self.rng.choice(sorted(deployment.sidecar_ports))
            process = deployment.process(victim)
            on_victim = [s for s in self.sessions if (await self.status(s)).sidecar == victim]
            killed = time.monotonic()
            os.killpg(process.pid, signal.SIGKILL)
            record.update(sidecar=victim, sessions=len(on_victim))
            pending = set(on_victim)
            deadline = killed + self.recover_s
            while pending and time.monotonic() < deadline:
                for session_id in list(pending):
                    status = await self.status(session_id)
                    if status.phase.value == "live" and status.sidecar and status.sidecar != victim:
                        self.replace_s.append(time.monotonic() - killed)
                        pending.discard(session_id)
                await asyncio.sleep(POLL_S)
            await asyncio.to_thread(process.start)  # a new incarnation under the same id
        elif kind == "sidecar_pause":
            victim = self.rng.choice(sorted(deployment.sidecar_ports))
            pause_s = self.rng.uniform(2.0, 6.0)
            pid = deployment.process(victim).pid
            os.killpg(pid, signal.SIGSTOP)
            await asyncio.sleep(pause_s)
            os.killpg(pid, signal.SIGCONT)
            record.update(sidecar=victim, pause_s=round(pause_s, 1))
        elif kind == "livekit":
            killed = time.monotonic()
            killed_unix_s = time.time()
            os.killpg(deployment.stack_pid("livekit"), signal.SIGKILL)
            record["failover_s"] = await self.wait_for_output("rtmp", killed, self.failover_s)
            record["failover_steps"] = await self.failover_steps(killed_unix_s)
            restarted = time.monotonic()
            await asyncio.to_thread(deployment.restart_stack_service, "livekit")
            record["switch_back_s"] = await self.wait_for_output("livekit", restarted, self.switch_back_s)
        elif kind == "rtmp":
            down_s = self.rng.uniform(2.0, 5.0)
            os.killpg(deployment.stack_pid("nginx-rtmp"), signal.SIGKILL)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(deployment.restart_stack_service, "nginx-rtmp")
            record["down_s"] = round(down_s, 1)
            record["left_livekit"] = [s for s in self.sessions if (await self.status(s)).output != "livekit"]
        return record

    async def failover_steps(self, killed_unix_s: float) -> list[dict[str, Any]]:
        """Each session's failover steps as its sidecar recorded them, against the kill (same host, wall
        clock)."""
        steps = []
        for session_id in self.sessions:
            status = await self.status(session_id)
            extra = status.stats.get("extra") or {}
            switched = extra.get("failover_switched_at_unix_s")
            if switched is None or switched < killed_unix_s:
                steps.append({"session": session_id, "sidecar": status.sidecar, "switched": False})
                continue
            entry = {
                "session": session_id,
                "sidecar": status.sidecar,
                "detect_s": round(extra["failover_detected_at_unix_s"] - killed_unix_s, 3),
                "switch_s": round(switched - killed_unix_s, 3),
                "down_to_switch_s": extra.get("failover_down_to_switch_s"),
                "standby_connect_s": extra.get("failover_standby_connect_s"),
                "rtmp_connect_wait_s": extra.get("rtmp_connect_wait_s"),
                "rtmp_connect_s": extra.get("rtmp_connect_s"),
            }
            steps.append(entry)
            self.failover_switch_s.append(entry["switch_s"])
            self.failover_detect_s.append(entry["detect_s"])
        return steps

    async def wait_for_output(self, output: str, since: float, times_s: list[float]) -> list[float]:
        """Poll until every session is live on `output`; each one's time since `since` goes to `times_s`."""
        pending = set(self.sessions)
        measured: list[float] = []
        while pending and time.monotonic() < since + self.recover_s:
            polled = list(pending)
            statuses = await asyncio.gather(*(self.status(session_id) for session_id in polled))  # one round
            for session_id, status in zip(polled, statuses, strict=True):
                if status.output == output and status.phase.value == "live":
                    measured.append(round(time.monotonic() - since, 2))
                    pending.discard(session_id)
            await asyncio.sleep(POLL_S)
        times_s.extend(measured)
        return measured

    async def keep_evidence(self, work_dir: Path) -> None:
        """A loss's evidence beside the process logs: every session's Temporal history and the lost ones."""
        histories = work_dir / "histories"
        histories.mkdir(exist_ok=True)
        for session_id in [*self.sessions, *(entry["session"] for entry in self.lost)]:
            try:
                text = await asyncio.wait_for(_history_json(self.temporal, session_id), 30)
            except Exception as exc:  # Temporal may be the fault: the logs are kept all the same
                logger.warning("history of %s not fetched: %r", session_id, exc)
                continue
            (histories / f"{session_id}.json").write_text(text)
        (work_dir / "lost.json").write_text(json.dumps({"lost": self.lost, "faults": self.faults}, indent=2))

    async def sample_load(self) -> None:
        while True:
            self.load_1min.append(round(os.getloadavg()[0], 2))
            await asyncio.sleep(LOAD_SAMPLE_S)

    async def run(self, faults: int, kinds: tuple[str, ...]) -> None:
        sampler = asyncio.create_task(self.sample_load())
        try:
            await self.run_faults(faults, kinds)
        finally:
            sampler.cancel()

    async def run_faults(self, faults: int, kinds: tuple[str, ...]) -> None:
        self.temporal = await self.client()
        await self.start_sessions()
        order: list[str] = []
        while len(order) < faults:
            round_kinds = list(kinds)
            self.rng.shuffle(round_kinds)
            order.extend(round_kinds)
        for kind in order[:faults]:
            began = time.monotonic()
            record = await self.inject(kind)
            injected_end = datetime.now(UTC)
            unrecovered = await self.wait_all(lambda s: s.phase.value == "live", since=injected_end)
            record["recovered_s"] = round(time.monotonic() - began, 1)
            record["unrecovered"] = unrecovered
            logger.info("fault %d/%d %s: %s", len(self.faults) + 1, faults, kind, record)
            self.faults.append(record)
            if len(self.sessions) < self.session_count:
                break  # a session was lost: the run has failed its invariant; stop and report it


async def _history_json(temporal: Any, session_id: str) -> str:
    history = await temporal.get_workflow_handle(session_workflow_id(session_id)).fetch_history()
    return str(history.to_json())


async def leaks(deployment: ChaosDeployment, temporal: Any) -> dict[str, Any]:

    snapshot = await temporal.get_workflow_handle_for(PlacementWorkflow.run, PLACEMENT_WORKFLOW_ID).query(
        PlacementWorkflow.snapshot
    )
    slots = sum(len(record.sessions) for record in snapshot.sidecars)
    hosted = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for port in deployment.sidecar_ports.values():
            hosted += len((await http.get(f"http://127.0.0.1:{port}/healthz")).json().get("sessions") or {})
    return {"slots_held": slots, "sidecar_sessions": hosted}


def leaked_processes(work_dir: Path) -> int:
    """Processes still running whose command line names this run's directory (after the deployment
    stopped)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(work_dir) in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                count += 1
        except OSError:
            continue
    return count


def settle_work_dir(
    work_dir: Path, *, keep_on_failure: bool, lost: list[dict[str, Any]], completed: bool
) -> bool:
    """Remove the run's work directory, unless it holds a failure's evidence to keep (a lost session, or a
    run that did not complete) and `keep_on_failure`; True when kept."""
    keep = keep_on_failure and (bool(lost) or not completed)
    if keep:
        logger.warning("a session was lost or the run failed: its evidence is kept in %s", work_dir)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--sidecars", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--recover-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--keep-on-failure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the work directory (logs, histories, lost.json) when a session is lost or the run fails",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds to draw from (all: {FAULT_KINDS})",
    )
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown fault kinds {unknown}; choose from {FAULT_KINDS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "infra.process", "temporalio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    logger.info("seed %d", seed)

    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    deployment = ChaosDeployment(work_dir, args.sidecars, args.slots)
    assets = work_dir / "assets"
    assets.mkdir()
    (assets / "astronaut.zip").write_bytes(avatar_zip_bytes())
    chaos = Chaos(deployment, args.sessions, random.Random(seed), args.recover_s)
    leak: dict[str, Any] = {}
    ends: list[str] = []
    completed = False
    try:
        deployment.start()
        with serve_directory(assets) as assets_url:
            chaos.avatar_url = f"{assets_url}/astronaut.zip"
            chaos.rtmp_url = f"rtmp://127.0.0.1:{deployment.ports.rtmp}/live"
            chaos.speech = speech_pcm(work_dir)

            async def body() -> None:
                nonlocal ends, leak
                try:
                    await chaos.run(args.faults, kinds)
                finally:
                    if chaos.lost and args.keep_on_failure:
                        await chaos.keep_evidence(work_dir)
                ends = await chaos.stop_sessions()
                await asyncio.sleep(3.0)  # teardown and release land
                leak = await leaks(deployment, chaos.temporal)

            asyncio.run(body())
        completed = True
    finally:
        for process in deployment.extra_processes:
            process.stop()
        deployment.stop()
        processes_left = leaked_processes(work_dir)
        keep = settle_work_dir(
            work_dir, keep_on_failure=args.keep_on_failure, lost=chaos.lost, completed=completed
        )
    leak_detail: dict[str, Any] = dict(leak)
    leak_detail["processes"] = processes_left
    summary = {
        "faults_injected": len(chaos.faults),
        "sessions_lost_unexpectedly": len(chaos.lost),
        "leaks": leak.get("slots_held", 0) + leak.get("sidecar_sessions", 0) + processes_left,
        "failover_s_p50": _pct(chaos.failover_s, 50),
        "failover_s_max": round(max(chaos.failover_s), 2) if chaos.failover_s else None,
        "failover_switch_s_p50": _pct(chaos.failover_switch_s, 50),
        "failover_switch_s_max": round(max(chaos.failover_switch_s), 2) if chaos.failover_switch_s else None,
        "failover_detect_s_max": round(max(chaos.failover_detect_s), 2) if chaos.failover_detect_s else None,
        "replace_s_p50": _pct(chaos.replace_s, 50),
        "replace_s_max": round(max(chaos.replace_s), 2) if chaos.replace_s else None,
        "switch_back_s_p50": _pct(chaos.switch_back_s, 50),
        "switch_back_s_max": round(max(chaos.switch_back_s), 2) if chaos.switch_back_s else None,
        "utterances_played": sum(chaos.utterances.values()),
        "sessions_that_spoke": sum(1 for count in chaos.utterances.values() if count),
        "audio_reconnects": sum(chaos.audio_reconnects.values()),
        "rtmp_faults_disturbing_livekit": sum(
            1 for f in chaos.faults if f["kind"] == "rtmp" and f.get("left_livekit")
        ),
        "temporal_outage_s_max_survived": max(
            (f["outage_s"] for f in chaos.faults if f["kind"] == "temporal" and not f["unrecovered"]),
            default=None,
        ),
        "wall_s": round(time.monotonic() - started, 1),
    }
    document = {
        "benchmark": "chaos",
        "device": cpu_name(),
        "torch": None,
        "settings": {
            "engine": "preview",
            "sessions": args.sessions,
            "sidecars": args.sidecars,
            "slots_per_sidecar": args.slots,
            "seed": seed,
            "outputs": "livekit first, rtmp fallback (local livekit-server --dev, nginx-rtmp)",
            "speech": (
                f"every session, espeak-ng {SPEECH_TEXT!r} in a loop, {PAUSE_S:g} s pauses, via the API relay"
            ),
            "fault_kinds": list(kinds),
            "load_average_1min": {
                "sampled_every_s": LOAD_SAMPLE_S,
                "min": min(chaos.load_1min, default=None),
                "median": _pct(chaos.load_1min, 50),
                "max": max(chaos.load_1min, default=None),
            },
            "notes": args.notes,
        },
        "summary": summary,
        "results": [
            {
                "faults": chaos.faults,
                "lost": chaos.lost,
                "leak_detail": leak_detail,
                "final_ends": ends,
                "failover_s": [round(v, 2) for v in chaos.failover_s],
                "replace_s": [round(v, 2) for v in chaos.replace_s],
                "switch_back_s": [round(v, 2) for v in chaos.switch_back_s],
                "kept_work_dir": str(work_dir) if keep else None,
                "utterances": chaos.utterances,
                "audio_reconnects": chaos.audio_reconnects,
            }
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if keep:
        print(f"bench.chaos: a session was lost or the run failed; logs, histories, lost.json: {work_dir}")
    healthy = summary["sessions_lost_unexpectedly"] == 0 and summary["leaks"] == 0
    return 0 if healthy and summary["rtmp_faults_disturbing_livekit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
