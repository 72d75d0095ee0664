"""`lipsync demo`: one real session end to end on the embedded local stack, recorded to an MP4.

1. the embedded stack (Temporal + UI, livekit-server, nginx-rtmp) — reused when it is up;
2. `lipsync worker`, `lipsync sidecar` (with its Temporal worker) and `lipsync api` as child
   processes, with logs under the work dir;
3. an avatar made from a real face (skimage's astronaut), zipped at run time and served by a
   loopback HTTP server that the demo's policy allow-lists (the SSRF guard refuses loopback
   otherwise);
4. a session started through the API (LiveKit output, recording on), real speech
   (espeak-ng, resampled to s16le 16 kHz mono) streamed over the API's audio WebSocket,
   then `stop`;
5. the sidecar's recording copied to the output path and checked: it decodes, has video
   frames and audible audio, and the mouth region moves more while speech plays than in
   the idle frames before it.

Everything the demo started is stopped at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wave
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import yaml
from PIL import Image

from api.policy_file import apply_overrides, load_policies, policies_path
from infra import stack
from infra.paths import PROJECT_ROOT, state_dir
from infra.process import ManagedProcess, free_port, http_ok, wait_until
from realtime.errors import LipsyncError

logger = logging.getLogger(__name__)

DEMO_SENTENCE = (
    "Hello! I am a lip sync avatar. My face is rendered live while this sentence is spoken, "
    "and every frame you see follows the sound you hear."
)
DEMO_API_KEY_PREFIX = "demo-"
SPEECH_RATE_HZ = 16_000
CHUNK_MS = 100
AVATAR_FRAMES = 8
AVATAR_SIDE_PX = 256
READY_TIMEOUT_S = 180.0  # first run: the sidecar may load MuseTalk weights
SESSION_LIVE_TIMEOUT_S = 120.0
SESSION_END_TIMEOUT_S = 60.0

Say = Callable[[str], None]


class DemoError(LipsyncError, RuntimeError):
    """The demo could not produce its video."""

    code = "demo_failed"


@dataclass(frozen=True)
class DemoOptions:
    out_path: Path = Path("out/demo.mp4")
    work_dir: Path = Path("build/demo")
    stack_dir: Path | None = None  # None: `lipsync stack`'s state dir (the stack is reused when it is up)
    stack_ports: stack.StackPorts | None = None  # None: the default ports
    api_port: int = 8000
    sidecar_port: int = 8790
    model_dir: Path = Path("models")
    engine: str = "auto"  # auto: MuseTalk when ./models holds valid weights, else the preview engine
    text: str = DEMO_SENTENCE
    trace_exporter: str = "none"
    hold_s: float = 0.0  # keep the session live this long after the speech (time to open the viewer URL)


@dataclass
class RecordingCheck:
    video_frames: int
    width_px: int
    height_px: int
    duration_s: float
    audio_rms_dbfs: float
    mouth_change_speech: float  # p99 |frame - idle reference| while speech plays (0-255)
    mouth_change_idle: float  # the same for idle frames: codec noise and the idle cycle

    @property
    def lips_move(self) -> bool:
        return self.mouth_change_speech > max(2.0 * self.mouth_change_idle, 12.0)


@dataclass
class DemoResult:
    session_id: str
    engine: str
    engine_detail: str
    out_path: Path
    recording: RecordingCheck
    temporal_ui_url: str
    viewer_url: str
    trace_id: str | None
    phases: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# --- media ---------------------------------------------------------------------------------


def astronaut_head(side_px: int = AVATAR_SIDE_PX) -> np.ndarray:
    from skimage.data import astronaut  # noqa: PLC0415 (heavy: scikit-image)

    head = np.ascontiguousarray(astronaut()[0:384, 60:444])  # head and shoulders, 384x384 RGB
    return np.asarray(Image.fromarray(head).resize((side_px, side_px), Image.Resampling.LANCZOS))


def avatar_zip_bytes(frames: int = AVATAR_FRAMES, side_px: int = AVATAR_SIDE_PX) -> bytes:
    """frame_1.png … frame_N.png of the astronaut, breathing very slightly (a 1 % brightness cycle)."""
    head = astronaut_head(side_px).astype(np.float32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(frames):
            gain = 1.0 + 0.01 * np.sin(2 * np.pi * index / frames)
            frame = np.clip(head * gain, 0, 255).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(frame).save(png, format="PNG")
            archive.writestr(f"avatar/frame_{index + 1}.png", png.getvalue())
    return buffer.getvalue()


def speech_pcm(text: str, rate_hz: int = SPEECH_RATE_HZ) -> bytes:
    """`text` spoken by espeak-ng, as s16le mono at `rate_hz` (what the audio WebSocket takes by default)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise DemoError("espeak-ng is not installed (make setup installs it: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "speech.wav"
        subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise DemoError("espeak-ng wrote an unexpected WAV format")
            source_rate = wav.getframerate()
            samples = (
                np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
            )
    resampled = np.asarray(soxr.resample(samples, source_rate, rate_hz), dtype=np.float32)
    return np.asarray(np.clip(resampled * 32768.0, -32768, 32767), dtype="<i2").tobytes()


def check_recording(path: Path, speech_start_s: float | None = None) -> RecordingCheck:
    """Decode the MP4: frame count, audio level, and how much the picture moves with and without speech.

    Speech frames are found from the recording's own audio (10 ms envelope above 10 % of its
    peak); idle frames are those before `speech_start_s`/the first speech. The avatar is a still
    face, so outside the mouth only codec noise changes: p99 of |frame - idle reference| is a
    location-free measure of mouth movement.
    """
    import av  # noqa: PLC0415 (heavy: PyAV)

    frames: list[np.ndarray] = []
    frame_times_s: list[float] = []
    audio: list[np.ndarray] = []
    audio_rate = 48_000
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DemoError(f"{path} has no video stream")
        if not container.streams.audio:
            raise DemoError(f"{path} has no audio stream")
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="gray"))
            frame_times_s.append(float(frame.time or 0.0))
        container.seek(0)
        for audio_frame in container.decode(audio=0):
            audio_rate = audio_frame.sample_rate
            data = audio_frame.to_ndarray()
            audio.append(data.mean(axis=0) if data.ndim == 2 else data)
    if not frames:
        raise DemoError(f"{path} has no decodable video frames")
    samples = np.concatenate(audio).astype(np.float64) if audio else np.zeros(1)
    if samples.dtype.kind == "i" or np.abs(samples).max() > 1.5:
        samples = samples / 32768.0
    rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
    window = max(1, audio_rate // 100)
    count = len(samples) // window
    envelope = (
        np.sqrt(np.mean(samples[: count * window].reshape(count, window) ** 2, axis=1)) if count else None
    )
    speech_times: np.ndarray = np.zeros(0)
    if envelope is not None and envelope.max() > 0:
        speech_times = np.nonzero(envelope > 0.1 * envelope.max())[0] * 0.01
    first_speech_s = (
        speech_start_s
        if speech_start_s is not None
        else (float(speech_times[0]) if speech_times.size else float("inf"))
    )
    times = np.asarray(frame_times_s)
    idle_index = [i for i, t in enumerate(times) if t < first_speech_s - 0.2]
    speech_index = [
        i for i, t in enumerate(times) if speech_times.size and np.min(np.abs(speech_times - t)) < 0.02
    ]
    if len(idle_index) < 5 or len(speech_index) < 5:
        raise DemoError(
            f"{path}: not enough idle ({len(idle_index)}) or speech ({len(speech_index)}) frames to judge "
            "the lips"
        )
    reference = np.median(np.stack([frames[i] for i in idle_index]), axis=0)

    def change(i: int) -> float:
        return float(np.percentile(np.abs(frames[i].astype(np.float32) - reference), 99.5))

    return RecordingCheck(
        video_frames=len(frames),
        width_px=int(frames[0].shape[1]),
        height_px=int(frames[0].shape[0]),
        duration_s=float(times[-1] - times[0]) if len(times) > 1 else 0.0,
        audio_rms_dbfs=20 * float(np.log10(max(rms, 1e-9))),
        mouth_change_speech=float(np.median([change(i) for i in speech_index])),
        mouth_change_idle=float(np.median([change(i) for i in idle_index])),
    )


# --- the loopback asset server ----------------------------------------------------------------


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (a free port) in a thread; yields the base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            del format, args

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="demo-assets", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def demo_policies(work_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """infra/policies.yaml with the loopback asset server allow-listed (plus `overrides`, dotted keys)."""

    document = yaml.safe_load(policies_path().read_text())
    allow = list(document["assets"]["fetch"].get("allow_networks") or [])
    rtmp_allow = list(document["outputs"].get("rtmp_allow_networks") or [])
    document = apply_overrides(
        document,
        {
            "assets.fetch.allow_networks": [*allow, "127.0.0.1/32"],
            "outputs.rtmp_allow_networks": [*rtmp_allow, "127.0.0.1/32"],  # the embedded nginx-rtmp
            **(overrides or {}),
        },
    )
    path = work_dir / "policies.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    load_policies(path)  # validate what we wrote
    return path


# --- the run ---------------------------------------------------------------------------------


def _lipsync() -> list[str]:
    return [sys.executable, "-m", "infra.cli"]


class Demo:
    def __init__(self, options: DemoOptions, say: Say) -> None:
        self.options = options
        self.say = say
        self.work_dir = options.work_dir.resolve()
        self.api_key = DEMO_API_KEY_PREFIX + secrets.token_hex(8)
        self.sidecar_secret = secrets.token_hex(32)  # shared by the demo's API and sidecar, for this run only
        self.processes: list[ManagedProcess] = []
        self.started_stack_dir: Path | None = None
        self.ports = options.stack_ports or stack.StackPorts()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.options.api_port}"

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.options.sidecar_port}"

    def run(self) -> DemoResult:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._stack_up()
            return asyncio.run(self._session())
        finally:
            self._stop_everything()

    # --- services ------------------------------------------------------------------------

    def _stack_up(self) -> None:
        directory = self.options.stack_dir or state_dir()
        rows = stack.status(directory)
        if all(row.running and row.healthy for row in rows):
            state = stack.StackState.load(directory)
            if state is not None:
                self.ports = state.ports
            self.say("embedded stack: already up, reusing it (left running at the end)")
            return
        if any(row.running for row in rows):
            raise DemoError("the embedded stack is partly up: run `lipsync stack down` first")
        self.say("embedded stack: starting Temporal + UI, livekit-server, nginx-rtmp ...")
        stack.up(self.ports, directory)
        self.started_stack_dir = directory

    def _env(self) -> dict[str, str]:
        return {
            **stack.service_env(self.ports),
            "LIPSYNC_API_KEYS": self.api_key,
            # The demo's one caller is also its operator: its key shows /health's engine details.
            "LIPSYNC_ADMIN_KEYS": self.api_key,
            "LIPSYNC_SIDECAR_URLS": f"demo-sidecar={self.sidecar_url}",
            "LIPSYNC_SIDECAR_SECRET": self.sidecar_secret,
            "LIPSYNC_POLICIES": str(demo_policies(self.work_dir)),
            "LIPSYNC_PUBLIC_BASE_URL": self.api_url,
            "LIPSYNC_TEMPORAL_UI_URL": f"http://127.0.0.1:{self.ports.temporal_ui}",
            "LIPSYNC_MODEL_DIR": str(self.options.model_dir.resolve()),
            "LIPSYNC_TRACE_EXPORTER": self.options.trace_exporter,
            "PYTHONUNBUFFERED": "1",
        }

    def _start(self, name: str, argv: list[str], health: Callable[[], bool], timeout_s: float = 60.0) -> None:
        process = ManagedProcess(
            name=name,
            argv=argv,
            log_path=self.work_dir / "logs" / f"{name}.log",
            health=health,
            cwd=PROJECT_ROOT,
            env=self._env(),
            startup_timeout_s=timeout_s,
        )
        self.processes.append(process)
        process.start()
        self.say(f"{name}: running (pid {process.pid}, log {process.log_path})")

    def _start_services(self) -> None:
        temporal = f"127.0.0.1:{self.ports.temporal}"
        assets = self.work_dir / "worker-assets"
        started_at = time.monotonic()
        # The worker has no HTTP port; /readyz below proves it polls. Alive for 2 s = it started.
        self._start(
            "worker",
            [*_lipsync(), "worker", "--temporal-address", temporal, "--asset-dir", str(assets)],
            lambda: time.monotonic() - started_at > 2.0,
        )
        self._start(
            "sidecar",
            [
                *_lipsync(),
                "sidecar",
                "--port",
                str(self.options.sidecar_port),
                "--engine",
                self.options.engine,
                "--model-dir",
                str(self.options.model_dir.resolve()),
                "--sidecar-id",
                "demo-sidecar",
                "--temporal-address",
                temporal,
                "--asset-dir",
                str(self.work_dir / "sidecar-assets"),
                "--recordings-dir",
                str(self.work_dir / "recordings"),
                "--cache-dir",
                str(self.work_dir / "avatar-cache"),
                "--slots",
                "2",
            ],
            lambda: http_ok(f"{self.sidecar_url}/healthz"),
            timeout_s=READY_TIMEOUT_S,
        )
        self._start(
            "api",
            [*_lipsync(), "api", "--port", str(self.options.api_port)],
            lambda: http_ok(f"{self.api_url}/healthz"),
        )
        if not wait_until(lambda: http_ok(f"{self.api_url}/readyz", timeout_s=6.0), READY_TIMEOUT_S, 0.5):
            raise DemoError(
                f"the API never became ready: see {self.api_url}/readyz and {self.work_dir / 'logs'}"
            )
        self.say(f"api: ready at {self.api_url} (OpenAPI {self.api_url}/docs)")

    def _stop_everything(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
        self.processes.clear()
        if self.started_stack_dir is not None:
            stopped = stack.down(self.started_stack_dir)
            self.say(f"stopped: {', '.join(['api', 'sidecar', 'worker', *stopped])}")
        else:
            self.say("stopped: api, sidecar, worker (the stack you started stays up)")

    # --- the session ---------------------------------------------------------------------

    async def _session(self) -> DemoResult:
        from lipsync_client import Avatar, LipsyncClient, LipsyncError, LiveKitOutput  # noqa: PLC0415 (heavy: the separately packaged client)

        self._start_services()
        assets_dir = self.work_dir / "assets"
        assets_dir.mkdir(parents=True, exist_ok=True)
        (assets_dir / "astronaut.zip").write_bytes(avatar_zip_bytes())
        pcm = speech_pcm(self.options.text)
        self.say(
            f"speech: {len(pcm) / 2 / SPEECH_RATE_HZ:.1f} s from espeak-ng, s16le mono {SPEECH_RATE_HZ} Hz"
        )
        try:
            async with LipsyncClient(self.api_url, self.api_key) as client:
                engine, detail = self._engine(await client.health())
                self.say(f"engine: {engine} — {detail}")
                with serve_directory(assets_dir) as assets_url:
                    session_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
                    created = await client.create_session(
                        session_id=session_id,
                        avatar=Avatar(frames_zip_url=f"{assets_url}/astronaut.zip"),
                        livekit=LiveKitOutput(room=f"demo-{session_id}"),
                        record=True,
                        metadata={"source": "lipsync demo"},
                    )
                    assert created.livekit is not None
                    self.say(f"session {session_id}: started (trace id {created.trace_id})")
                    self.say(f"  Temporal UI: {created.temporal_ui_url}")
                    viewer_url = (await client.viewer_token(created.livekit.room)).viewer_url
                    self.say(f"  viewer:      {viewer_url}")
                    phases = await self._wait_live(client, session_id)
                await self._stream(client, created, pcm)
                if self.options.hold_s > 0:
                    self.say(
                        f"  holding the session live for {self.options.hold_s:.0f} s (open the viewer URL)"
                    )
                    await asyncio.sleep(self.options.hold_s)
                await client.stop_session(session_id, "demo finished")
                final = await client.wait_for_phase(
                    session_id, {"completed", "failed", "cancelled"}, timeout_s=SESSION_END_TIMEOUT_S
                )
                self.say(f"  phase: {final.phase} (end reason {final.end_reason})")
        except LipsyncError as exc:
            raise DemoError(f"{exc.code}: {exc.message}") from exc
        if final.phase != "completed":
            raise DemoError(f"session ended {final.phase}: {final.error}")
        recording = self.work_dir / "recordings" / f"{session_id}.mp4"
        if not recording.exists():
            raise DemoError(f"the sidecar wrote no recording at {recording}")
        out = self.options.out_path
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recording, out)
        check = check_recording(out)
        return DemoResult(
            session_id=session_id,
            engine=engine,
            engine_detail=detail,
            out_path=out,
            recording=check,
            temporal_ui_url=created.temporal_ui_url,
            viewer_url=viewer_url,
            trace_id=created.trace_id,
            phases=[*phases, "completed"],
            stats=final.stats,
        )

    def _engine(self, health: dict[str, Any]) -> tuple[str, str]:
        engine = (health.get("engines") or {}).get("demo-sidecar") or {}
        if not isinstance(engine, dict) or "name" not in engine:
            return "unknown", str(engine)
        name = str(engine["name"])
        # The sidecar's detail is the engine registry's sentence: which engine, why, and where it runs.
        return name, str(
            engine.get("detail")
            or f"CPU preview engine: no valid MuseTalk weights in {self.options.model_dir} (`lipsync models "
            "check`)"
        )

    async def _wait_live(self, client: Any, session_id: str) -> list[str]:
        phases: list[str] = []
        deadline = time.monotonic() + SESSION_LIVE_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await client.get_session(session_id)
            if not phases or phases[-1] != status.phase:
                phases.append(status.phase)
                self.say(f"  phase: {status.phase}")
            if status.phase == "live":
                self.say(
                    f"  live on {status.sidecar} via {status.output} ({status.raw.get('output_detail')})"
                )
                return phases
            if status.is_terminal:
                raise DemoError(f"session ended {status.phase} before going live: {status.error}")
            await asyncio.sleep(0.25)
        raise DemoError(f"session {session_id} was not live after {SESSION_LIVE_TIMEOUT_S:.0f} s")

    async def _stream(self, client: Any, created: Any, pcm: bytes) -> None:
        async with client.audio_stream(created) as audio:
            await audio.wait_ready()
            await asyncio.sleep(1.0)  # a second of idle frames before the speech, as a viewer would see
            # Paced like a TTS stream at real time (the sidecar buffers up to a minute ahead anyway).
            await audio.stream_pcm(pcm, chunk_ms=CHUNK_MS)
            self.say(f"  streamed {len(pcm)} bytes of PCM; waiting for playback_finished")
            finished = await audio.next_event("playback_finished", timeout_s=60.0)
            self.say(f"  playback finished at {finished.get('playback_position')} s")
            await asyncio.sleep(1.0)  # idle frames after the speech


def run_demo(options: DemoOptions, say: Say | None = None) -> DemoResult:
    return Demo(options, say or logger.info).run()


def free_ports_options(base: DemoOptions) -> DemoOptions:
    """The same demo on free ports and a private stack dir (tests, or a machine where 8000 is taken)."""
    return replace(
        base,
        stack_dir=base.work_dir / "stack",
        stack_ports=stack.StackPorts.free(),
        api_port=free_port(),
        sidecar_port=free_port(),
    )
