"""Sync benchmark: A/V offset, interrupt silence and playback_finished timing at a real subscriber.

    python -m bench.sync --json bench/results/sync-cpu-<yyyymmdd>.json [--utterances 20] [--interrupts 10]

Deployment (127.0.0.1, free ports, a temp dir, stopped at the end): livekit-server and one sidecar
process (`lipsync sidecar --no-temporal`, preview engine) with one LiveKit session; a real subscriber
(`livekit.rtc`, this process) records every frame and audio chunk with its arrival time.
Utterances are espeak-ng sentences streamed at real-time pace over the sidecar's WebSocket.

- clean: `--utterances` utterances, nothing injected;
- stalled: `--utterances` utterances, each preceded by a SIGSTOP of the whole sidecar process
  (`--stall-ms`) while idle, and every `--stall-in-speech-every`th one (4; 0 = none) stalled
  again in the middle of its speech (that one is not measured: its own audio and video lose the
  stall; the ones after it are);
- interrupts: `--interrupts` utterances sent at once and cut by `{"type":"interrupt"}` after 1 s.

livekit-server runs with `room.sync_streams` (infra/livekit.py), so the subscriber's libwebrtc
lip-syncs the avatar's two tracks as a browser would; `--no-sync-streams` turns it off (each track
its own stream id: the subscriber plays each as it arrives).

Placement (`--placement`): `split` (the default) runs the sidecar on core 0 and this process (the
subscriber) and livekit-server on core 1: in a deployment they are other machines, so the sidecar's load
must not starve them. `float` leaves them where the kernel puts them (on a 2-core host, often next to the
sidecar and the hog). `--cpu-hog` runs a process spinning on the sidecar's core for the whole run (the
stress scenario of issue 18: stalls while the sidecar is starved: a noisy neighbour on the sidecar's
host). `--sidecar-nice` starts the sidecar at that nice value (what a deployment's systemd `Nice=` gives
it), `--hog-nice` the hog: the CPU share between the two depends only on the difference (docs/production.md).

`--rtp-timing` (root: it captures on loopback, bench/rtp_timing.py) splits the subscriber's audio delay per
run: how late the sidecar sent its audio packets vs their RTP timestamps (`send_jitter_ms`), and how long
livekit-server took to forward them (`forward_delay_ms`); the rest is the subscriber's own.

Figures (docs/audio-protocol.md §4.1 method, tests/support/avcheck.py): per utterance the median
A/V offset over its frames (positive = video late) and at its onset; `av_offset_ms_p50/p99` are
percentiles of |median offset| over the clean utterances, `_stalled` over the stalled run;
`interrupt_silence_ms_*`: interrupt sent → play time of the last audible audio chunk (its
arrival, a starved reader's bursts undone: tests/support/avcheck.py);
`playback_finished_error_ms_p99`: |playback_finished arrival − the subscriber's play time of the
utterance's last sample| (clean utterances). `send_*` figures are the sidecar's own (its session
stats): the fraction of frames whose send-side A/V offset was past one frame, playback_finished
vs its own account of when the last speech sample is heard, how long speech still entered WebRTC
after an interrupt. `subscriber_jitter_buffer_ms` is the subscriber's mean audio (and video)
jitter-buffer delay per run: how much a stall made its audio path grow, and whether the video
followed (A/V sync); `_video_minimum` is the least delay its video buffer was held to (WebRTC's
jitterBufferMinimumDelay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soxr
import websockets

from bench import rtp_timing
from bench.machine import cpu_name
from infra import livekit
from infra.demo import avatar_zip_bytes
from infra.process import free_port, pin_threads

logger = logging.getLogger("bench.sync")

SENTENCES = (
    "The rain in Spain stays mainly in the plain, said the professor.",
    "Seven silver swans swam silently southward before sunrise.",
    "Please bring the blue book and the red pen to the meeting room.",
    "A quick test of lips and voice after the stall has passed.",
    "Every morning the baker opens his shop at half past six.",
)


@dataclass(frozen=True)
class Clip:
    pcm: np.ndarray  # int16 mono
    rate_hz: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.rate_hz

    def at_48k(self) -> np.ndarray:
        return np.asarray(
            soxr.resample(self.pcm.astype(np.float32) / 32768.0, self.rate_hz, 48_000), np.float32
        )


def espeak(directory: Path, index: int, text: str) -> Clip:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    path = directory / f"s{index}.wav"
    subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(path), "rb") as wav:
        return Clip(np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").copy(), wav.getframerate())


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


SIDECAR_CORE = 0  # the sidecar (and the hog) run here
PEERS_CORE = 1  # the subscriber and livekit-server (other machines in a deployment) run here with `split`


def on_core_0(argv: list[str]) -> list[str]:
    """`taskset -c 0`: every thread the process starts stays on core 0 (with the hog, for `--cpu-hog`)."""
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset is not installed (apt-get install util-linux)")
    return [taskset, "-c", str(SIDECAR_CORE), *argv]


def start_hog(hog_nice: int) -> subprocess.Popen[bytes]:
    """`--cpu-hog`: a process spinning on the sidecar's core the whole run (the sidecar gets half of it, more
    at a `hog_nice` above its own)."""
    argv = on_core_0([sys.executable, "-c", "while True: pass"])
    if hog_nice:
        argv = ["nice", "-n", str(hog_nice), *argv]
    return subprocess.Popen(argv)


async def start_watched_session(
    sidecar: Sidecar, config: livekit.LiveKitServerConfig, avatar: Path, session_id: str, recorder: Any
) -> None:
    """Start `session_id` on the sidecar (the avatar at `avatar`) publishing into a room of its own as
    `avatar-<session_id>`, connect `recorder` (an `avcheck.RoomRecorder`) to it as the viewer, and return once
    the viewer receives both tracks."""
    from tests.support.avcheck import token  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.sidecar_child import start_livekit_session  # noqa: PLC0415 (the same)

    room, identity = f"room-{session_id}", f"avatar-{session_id}"
    response = await start_livekit_session(
        sidecar.base_url, config, session_id, room=room, avatar_zip=avatar, identity=identity
    )
    response.raise_for_status()
    await recorder.connect(config.ws_url, token(config, "viewer", room))
    await recorder.wait_for(lambda: len(recorder.frames) >= 25 and len(recorder.audio_chunks) >= 50, 30)


class Sidecar:
    def __init__(
        self,
        work_dir: Path,
        livekit_url: str,
        *,
        pinned: bool = False,
        renew_after_stall_ms: float = 0.0,
        idle_audio_reserve_ms: int = 0,
        nice: int = 0,
        video_delay_ms: float | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = work_dir / "sidecar.log"
        # The dev API opens avatars only from the work dir and publishes only to this run's LiveKit server;
        # the
        # sidecar inherits the run's service secret (tests.support.credentials puts it in the environment).
        argv = [
            sys.executable, "-m", "infra.cli", "sidecar", "--no-temporal",
            "--port", str(self.port), "--engine", "preview", "--device", "cpu",
            "--cache-dir", str(work_dir / "cache"), "--slots", "1", "--sidecar-id", "bench-sync",
            "--renew-audio-after-stall-ms", str(renew_after_stall_ms),
            "--idle-audio-reserve-ms", str(idle_audio_reserve_ms),
            *(("--video-delay-ms", str(video_delay_ms)) if video_delay_ms is not None else ()),
            "--dev-api", "--dev-avatar-dir", str(work_dir), "--dev-livekit-url", livekit_url,
        ]  # fmt: skip
        if pinned:
            argv = on_core_0(argv)
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        from tests.support.credentials import service_headers  # noqa: PLC0415 (tests/ is not installed with the package)

        deadline = time.monotonic() + 90
        async with httpx.AsyncClient(timeout=2, trust_env=False, headers=service_headers()) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {self.process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError("sidecar did not start")

    def stall(self, seconds: float) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


async def next_of(ws: Any, kind: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.monotonic())))
        if message["type"] == "error":
            raise RuntimeError(f"sidecar error: {message}")
        if message["type"] == kind:
            return dict(message)


async def stream_realtime(ws: Any, clip: Clip, chunk_ms: int = 20) -> None:
    pcm = clip.pcm.tobytes()
    chunk = clip.rate_hz * chunk_ms // 1000 * 2
    started = time.monotonic()
    for index, start in enumerate(range(0, len(pcm), chunk)):
        await asyncio.sleep(max(0.0, started + index * chunk_ms / 1000 - time.monotonic()))
        await ws.send(pcm[start : start + chunk])


@dataclass
class Spoken:
    clip: Clip
    start_frame_id: int
    sent_at_s: float
    finished_at_s: float
    measured: bool = True


async def speak(ws: Any, clip: Clip, stall: Any = None) -> Spoken:
    sent_at_s = time.monotonic()
    sender = asyncio.create_task(stream_realtime(ws, clip))
    if stall is not None:
        await asyncio.sleep(clip.duration_s / 2)
        await asyncio.to_thread(stall)
    await sender
    await ws.send(json.dumps({"type": "end_of_utterance"}))
    started = await next_of(ws, "playback_started")
    await next_of(ws, "playback_finished")
    return Spoken(clip, int(started["frame_id"]), sent_at_s, time.monotonic(), measured=stall is None)


def measure(recorder: Any, spoken: Spoken) -> dict[str, Any]:
    from tests.support.avcheck import (  # noqa: PLC0415 (tests/ is not installed with the package)
        align,
        av_offset,
        envelope_correlation,
        mean_jitter_delay_ms,
        speech_onset,
    )

    sent48 = spoken.clip.at_48k()
    arrivals = np.array([arrival for arrival, _ in recorder.audio_chunks])
    starts = np.cumsum([0] + [len(chunk) for _, chunk in recorder.audio_chunks])
    first = int(np.searchsorted(arrivals, spoken.sent_at_s - 0.5))
    last = int(np.searchsorted(arrivals, spoken.sent_at_s + spoken.clip.duration_s + 2.0))
    window = recorder.audio()[starts[first] : starts[last]]
    lag, _ = align(window, sent48)
    lag += int(starts[first])
    try:
        offset = av_offset(recorder, lag, spoken.start_frame_id, len(sent48), speech_onset(sent48))
    except KeyError as exc:  # the subscriber lost that frame (its decoder queue overflowed under load)
        return {"error": f"frame {exc} not received"}
    end_heard_s = float(recorder.audio_play_time(np.array([lag + len(sent48) - 1]))[0])
    span = (spoken.sent_at_s, spoken.finished_at_s)
    jitter_ms = mean_jitter_delay_ms(recorder.jitter, "audio", *span)
    video_ms = mean_jitter_delay_ms(recorder.jitter, "video", *span)
    video_minimum_ms = mean_jitter_delay_ms(recorder.jitter, "video", *span, minimum=True)
    return {
        # the subscriber's jitter-buffer delays while it played (video: mean and least)
        "subscriber_audio_jitter_buffer_ms": None if jitter_ms is None else round(jitter_ms, 1),
        "subscriber_video_jitter_buffer_ms": None if video_ms is None else round(video_ms, 1),
        "subscriber_video_minimum_delay_ms": None if video_minimum_ms is None else round(video_minimum_ms, 1),
        "median_ms": round(offset.median_ms, 1),
        "onset_ms": round(offset.onset_ms, 1),
        "envelope_r": round(envelope_correlation(recorder.audio(), sent48, lag), 3),
        "finished_error_ms": round((spoken.finished_at_s - end_heard_s) * 1000.0, 1),
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from tests.support.avcheck import (  # noqa: PLC0415 (tests/ is not installed with the package)
        RoomRecorder,
        mean_jitter_delay_ms,
    )
    from tests.support.credentials import (  # noqa: PLC0415 (tests/ is not installed with the package)
        audio_token,
        service_headers,
    )

    split = args.placement == "split"
    if split:
        pin_threads(os.getpid(), {PEERS_CORE})  # the subscriber: threads started later inherit the core
    config = livekit.LiveKitServerConfig(sync_streams=args.sync_streams).with_free_ports()
    server = livekit.server_process(config, work_dir / "livekit")
    server.start()
    if split and server.pid is not None:
        pin_threads(server.pid, {PEERS_CORE})
    capture_path = work_dir / "rtp.tsv"
    capture = (
        subprocess.Popen(  # noqa: ASYNC220 (started once, before the run)
            [sys.executable, "-m", "bench.rtp_timing", "--out", str(capture_path), "--seconds", "3600"]
        )
        if args.rtp_timing
        else None
    )
    sidecar = Sidecar(
        work_dir,
        config.ws_url,
        pinned=args.cpu_hog or split,
        renew_after_stall_ms=args.renew_audio_after_stall_ms,
        idle_audio_reserve_ms=args.idle_audio_reserve_ms,
        nice=args.sidecar_nice,
        video_delay_ms=args.video_delay_ms,
    )
    hog = start_hog(args.hog_nice) if args.cpu_hog else None
    clips = [espeak(work_dir, index, text) for index, text in enumerate(SENTENCES)]
    avatar = work_dir / "astronaut.zip"
    avatar.write_bytes(avatar_zip_bytes())
    recorder = RoomRecorder(mouth_box=(0, 0, 8, 8), stats_interval_s=0.5)
    try:
        await sidecar.wait_ready()
        session_id = "bench-sync"
        await start_watched_session(sidecar, config, avatar, session_id, recorder)
        if split:
            pin_threads(os.getpid(), {PEERS_CORE})  # the SDK's threads, whichever thread started them
        rate = clips[0].rate_hz
        url = (
            f"ws://127.0.0.1:{sidecar.port}/v1/sessions/{session_id}/audio?sample_rate={rate}"
            f"&token={audio_token(session_id)}"
        )
        clean: list[Spoken] = []
        stalled: list[Spoken] = []
        interrupted_at_s: list[float] = []
        round_trips_ms: list[float] = []
        phases: dict[str, tuple[float, float]] = {}  # run -> (start, end), for the subscriber's jitter buffer
        async with websockets.connect(url) as ws:
            await next_of(ws, "ready")
            started_s = time.monotonic()
            for index in range(args.utterances):
                clean.append(await speak(ws, clips[index % len(clips)]))
                await asyncio.sleep(0.3)
            phases["clean"] = (started_s, time.monotonic())
            started_s = time.monotonic()
            every = args.stall_in_speech_every
            for index in range(args.utterances):
                await asyncio.to_thread(sidecar.stall, args.stall_ms / 1000.0)  # while idle
                await asyncio.sleep(0.3)
                mid = (
                    (lambda: sidecar.stall(args.stall_ms / 1000.0))
                    if every and index % every == every - 1
                    else None
                )
                stalled.append(await speak(ws, clips[index % len(clips)], stall=mid))
                await asyncio.sleep(0.3)
            phases["stalled"] = (started_s, time.monotonic())
            started_s = time.monotonic()
            for index in range(args.interrupts):
                await ws.send(clips[index % len(clips)].pcm.tobytes())
                await ws.send(json.dumps({"type": "end_of_utterance"}))
                await next_of(ws, "playback_started")
                await asyncio.sleep(1.0)
                interrupted_at = time.monotonic()
                await ws.send(json.dumps({"type": "interrupt"}))
                await next_of(ws, "playback_finished")
                # interrupt sent -> its playback_finished back: bounds the sidecar's share of the silence
                round_trips_ms.append(round((time.monotonic() - interrupted_at) * 1000.0, 1))
                await asyncio.sleep(1.0)
                interrupted_at_s.append(interrupted_at)
            phases["interrupts"] = (started_s, time.monotonic())
        async with httpx.AsyncClient(timeout=10, trust_env=False, headers=service_headers()) as client:
            stats = (await client.get(f"{sidecar.base_url}/v1/sessions/{session_id}/stats")).json()
    finally:
        await recorder.close()
        if hog is not None:
            hog.kill()
            hog.wait(timeout=5)
        if capture is not None:
            capture.terminate()
            capture.wait(timeout=10)
        sidecar.stop()
        server.stop()
    clean_rows = [measure(recorder, spoken) for spoken in clean]
    # Interrupt sent -> the subscriber's last audible audio (play time of its loud chunks: avcheck).
    plays_s = recorder.chunk_play_times()
    loud = np.array([np.abs(chunk).max() > 0.01 * 32768 for _, chunk in recorder.audio_chunks])
    silences_ms: list[float] = []
    for at_s in interrupted_at_s:
        heard = plays_s[loud & (plays_s > at_s - 1.0) & (plays_s < at_s + 1.0)]
        silences_ms.append(round((float(heard.max()) - at_s) * 1000.0, 1) if heard.size else 0.0)
    stalled_rows = [measure(recorder, spoken) | {"measured": spoken.measured} for spoken in stalled]
    jitter_ms = (
        {run: mean_jitter_delay_ms(recorder.jitter, "audio", *span) for run, span in phases.items()}
        | {
            f"{run}_video": mean_jitter_delay_ms(recorder.jitter, "video", *span)
            for run, span in phases.items()
        }
        | {
            f"{run}_video_minimum": mean_jitter_delay_ms(recorder.jitter, "video", *span, minimum=True)
            for run, span in phases.items()
        }
    )
    return {
        "clean": clean_rows,
        "stalled": stalled_rows,
        "interrupt_silence_ms": silences_ms,
        "interrupt_round_trip_ms": round_trips_ms,
        # the subscriber's audio jitter-buffer delay in the second before each interrupt
        "interrupt_jitter_ms": [
            mean_jitter_delay_ms(recorder.jitter, "audio", at_s - 1.0, at_s) for at_s in interrupted_at_s
        ],
        "stats": stats,
        "jitter_ms": jitter_ms,
        "rtp_timing": _rtp_timing(capture_path, config.rtc_udp_port, phases) if capture is not None else None,
    }


def _rtp_timing(path: Path, server_port: int, phases: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """bench.rtp_timing's figures per run; the phases are on the monotonic clock, the capture's on
    CLOCK_REALTIME."""
    to_wall_s = time.time() - time.monotonic()
    windows = {name: (start + to_wall_s, end + to_wall_s) for name, (start, end) in phases.items()}
    return rtp_timing.summarise(rtp_timing.read_capture(path), server_port, windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=20, help="per run (clean, stalled)")
    parser.add_argument("--interrupts", type=int, default=10)
    parser.add_argument("--stall-ms", type=float, default=250.0)
    parser.add_argument(
        "--stall-in-speech-every",
        type=int,
        default=4,
        help="stalled-run utterances stalled mid-speech (0 = none)",
    )
    parser.add_argument(
        "--cpu-hog", action="store_true", help="a process spinning on the sidecar's core the whole run"
    )
    parser.add_argument(
        "--placement",
        choices=("split", "float"),
        default="split",
        help="split: sidecar on core 0, subscriber and livekit-server on core 1; float: the kernel decides "
        "(the sidecar still on core 0 with --cpu-hog)",
    )
    parser.add_argument(
        "--sidecar-nice", type=int, default=0, help="the sidecar's nice value (-20..19; below 0 needs root)"
    )
    parser.add_argument("--hog-nice", type=int, default=0, help="the hog's nice value (0..19)")
    parser.add_argument(
        "--rtp-timing",
        action="store_true",
        help="capture RTP headers on loopback (root): the sidecar's send jitter, the server's forward delay",
    )
    parser.add_argument(
        "--renew-audio-after-stall-ms",
        type=float,
        default=0.0,
        help="the sidecar's flag (0 = off, the sidecar's default too)",
    )
    parser.add_argument("--idle-audio-reserve-ms", type=int, default=0, help="the sidecar's flag (0 = off)")
    parser.add_argument(
        "--video-delay-ms", type=float, default=None, help="the sidecar's flag (default: the sidecar's)"
    )
    parser.add_argument(
        "--no-sync-streams",
        dest="sync_streams",
        action="store_false",
        help="livekit-server without room.sync_streams: the subscriber does not lip-sync the two tracks",
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--notes", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "infra.process", "livekit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        raw = asyncio.run(run(args, Path(tmp)))
    clean_ok = [row for row in raw["clean"] if "error" not in row]
    stalled_ok = [row for row in raw["stalled"] if "error" not in row and row["measured"]]
    clean = [abs(row["median_ms"]) for row in clean_ok]
    stalled = [abs(row["median_ms"]) for row in stalled_ok]
    onset_clean = [abs(row["onset_ms"]) for row in clean_ok]
    onset_stalled = [abs(row["onset_ms"]) for row in stalled_ok]
    extra = raw["stats"].get("extra", {})
    document = {
        "benchmark": "sync",
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores",
        "torch": None,
        "settings": {
            "engine": "preview",
            "utterances_per_run": args.utterances,
            "interrupts": args.interrupts,
            "stall": f"SIGSTOP of the sidecar process, {args.stall_ms:.0f} ms, before every stalled-run "
            "utterance "
            f"(idle) and in the middle of every {args.stall_in_speech_every}th one (not measured; 0 = none)",
            "subscriber": "livekit.rtc in the bench process (native SDK: libwebrtc, which lip-syncs the two "
            "tracks when they share a stream id)",
            "sync_streams": args.sync_streams,
            "cpu_hog": args.cpu_hog,
            "placement": args.placement,
            "sidecar_nice": args.sidecar_nice,
            "hog_nice": args.hog_nice,
            "renew_audio_after_stall_ms": args.renew_audio_after_stall_ms,
            "idle_audio_reserve_ms": args.idle_audio_reserve_ms,
            "video_delay_ms": args.video_delay_ms,
            "notes": args.notes,
        },
        "summary": {
            "av_offset_ms_p50": _pct(clean, 50),
            "av_offset_ms_p99": _pct(clean, 99),
            "av_offset_ms_p50_stalled": _pct(stalled, 50),
            "av_offset_ms_p99_stalled": _pct(stalled, 99),
            "av_onset_offset_ms_p99": _pct(onset_clean, 99),
            "av_onset_offset_ms_p99_stalled": _pct(onset_stalled, 99),
            "interrupt_silence_ms_p50": _pct(raw["interrupt_silence_ms"], 50),
            "interrupt_silence_ms_p99": _pct(raw["interrupt_silence_ms"], 99),
            "playback_finished_error_ms_p99": _pct([abs(row["finished_error_ms"]) for row in clean_ok], 99),
            "utterances_measured": len(clean),
            "utterances_measured_stalled": len(stalled),
            # The sidecar's own clock (its session stats): frames whose send-side A/V offset was past one
            # frame, playback_finished vs its own account of when the last speech sample is heard, how long
            # speech still entered WebRTC after an interrupt, and real time its audio source sent nothing.
            "send_av_offset_alarm_fraction": round(
                extra.get("livekit_av_offset_alarms", 0.0)
                / max(1.0, extra.get("livekit_av_offset_frames", 0.0)),
                4,
            ),
            "send_playback_finished_error_ms_max_abs": extra.get("playback_finished_error_ms_max_abs"),
            "send_interrupt_tail_ms_max": extra.get("livekit_audio_interrupt_tail_ms_max"),
            "audio_pulls_missed_ms": extra.get("livekit_audio_pulls_missed_ms", 0.0),
            "audio_silence_clears": extra.get("livekit_audio_silence_clears", 0.0),
            "audio_track_renewals": extra.get("livekit_audio_track_renewals", 0.0),
            "audio_resync_dropped_samples": extra.get("livekit_audio_resync_dropped_samples", 0.0),
            # The subscriber's mean jitter-buffer delay per run (audio; video): what its audio path adds.
            "subscriber_jitter_buffer_ms": {
                key: None if value is None else round(value, 1) for key, value in raw["jitter_ms"].items()
            },
            # Per run, from the packets on loopback (--rtp-timing): the sidecar's audio send jitter and
            # livekit-server's forward delay (bench/rtp_timing.py).
            "rtp_timing": raw["rtp_timing"],
        },
        "sidecar_stats": raw["stats"],  # the session's stats at the end of the run, as the sidecar reported
        "results": [
            *({"run": "clean", **row} for row in raw["clean"]),
            *({"run": "stalled", **row} for row in raw["stalled"]),
            *(
                {
                    "run": "interrupt",
                    "silence_ms": value,
                    "round_trip_ms": round_trip_ms,
                    "subscriber_audio_jitter_buffer_ms": None if jitter_ms is None else round(jitter_ms, 1),
                }
                for value, round_trip_ms, jitter_ms in zip(
                    raw["interrupt_silence_ms"],
                    raw["interrupt_round_trip_ms"],
                    raw["interrupt_jitter_ms"],
                    strict=True,
                )
            ),
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
