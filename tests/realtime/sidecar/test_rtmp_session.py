"""Acceptance for the RTMP fallback and MP4 recording, at session level, against the real nginx-rtmp.

A sidecar session (preview engine, astronaut avatar) publishes over RTMP while espeak speech
streams in over the WS; a PyAV reader plays the stream back from nginx and checks what a
viewer would: 25 fps, lips that move during speech and match the idle cycle in silence,
audio whose envelope matches the sent speech, and A/V in sync.

A/V offset method (from the decoded stream only): per decoded video frame, the mouth's
*speech signal* is its distance to the nearest idle-cycle frame (codec noise in silence,
large while the mouth is open); per frame interval [t, t + 40 ms) the audio level is the RMS
of the decoded audio placed by its own timestamps. The lag (in frames, refined to sub-frame
by a parabola through the correlation peak) that best correlates the two is the offset:
positive means the video lags the audio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from infra.rtmp import RtmpServerConfig
from realtime.host import (
    AvatarAsset,
    OutputTarget,
    RunLimits,
    SessionEndReason,
)
from realtime.outputs.registry import LIVEKIT, RTMP, LiveKitTarget, RtmpTarget
from realtime.outputs.rtmp import RtmpOutput
from realtime.sidecar.host import SidecarHost
from tests.realtime.sidecar.test_livekit_e2e import assert_adds_up, next_of, stream_realtime
from tests.support.avcheck import align, envelope_correlation, token
from tests.support.sidecar_harness import RunningSidecar, SpeechClip

pytestmark = pytest.mark.service
logger = logging.getLogger(__name__)

FRAME_RATE_FPS = 25
FRAME_S = 1.0 / FRAME_RATE_FPS
IDLE_MAX_DISTANCE = 6.0  # mean |frame - nearest idle frame| in the mouth region (0-255): H.264 noise only
SPEECH_MIN_DISTANCE = 8.0


@dataclass
class StreamReader:
    """Plays an RTMP stream in a thread: per video frame (time, mouth crop), audio as (time, mono samples)."""

    url: str
    mouth_box: tuple[int, int, int, int]
    max_seconds: float
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)
    audio_rate_hz: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float) -> None:
        """After the publisher has gone: nginx does not always close the play side, so a read timeout ends
        it."""
        assert self.thread is not None
        self.stop.set()
        self.thread.join(timeout=timeout_s)

    def _run(self) -> None:
        x1, y1, x2, y2 = self.mouth_box
        deadline = time.monotonic() + self.max_seconds
        try:
            with av.open(self.url, timeout=(8.0, 2.0)) as container:
                for frame in container.decode(video=0, audio=0):
                    if isinstance(frame, av.VideoFrame):
                        rgb = frame.to_ndarray(format="rgb24")
                        self.frames.append((float(frame.time or 0.0), rgb[y1:y2, x1:x2].copy()))
                    elif isinstance(frame, av.AudioFrame):
                        self.audio_rate_hz = frame.sample_rate
                        mono = frame.to_ndarray().reshape(len(frame.layout.channels), -1).mean(axis=0)
                        self.audio.append((float(frame.time or 0.0), mono.astype(np.float32)))
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
        except BaseException as exc:
            if not self.stop.is_set():
                self.errors.append(exc)

    def wait_for_frames(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {len(self.frames)} frames read back"
            time.sleep(0.05)

    def audio_track(self) -> tuple[float, np.ndarray]:
        """The decoded audio as one array placed from the first frame's time (gaps filled with silence)."""
        start_s = self.audio[0][0]
        total = round((self.audio[-1][0] - start_s) * self.audio_rate_hz) + len(self.audio[-1][1])
        track = np.zeros(total, dtype=np.float32)
        for time_s, samples in self.audio:
            at = round((time_s - start_s) * self.audio_rate_hz)
            track[at : at + len(samples)] = samples[: max(0, total - at)]
        return start_s, track


def mouth_box_of(avatar: object) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[0])  # type: ignore[attr-defined]
    height = y2 - y1
    return x1, y1 + height // 2, x2, min(avatar.height_px, y2 + height // 8)  # type: ignore[attr-defined]


def idle_distance(mouth: np.ndarray, idle_mouths: list[np.ndarray]) -> float:
    """Distance to the nearest idle-cycle frame: near zero in silence, wherever the cycle is."""
    crop = mouth.astype(np.float32)
    return min(float(np.abs(crop - idle).mean()) for idle in idle_mouths)


def subframe_lag(signal_video: np.ndarray, signal_audio: np.ndarray, max_lag: int = 6) -> float:
    """Lag in frames (video behind audio is positive) maximising the correlation, refined by a parabola."""
    v = (signal_video - signal_video.mean()) / (signal_video.std() or 1.0)
    a = (signal_audio - signal_audio.mean()) / (signal_audio.std() or 1.0)
    lags = list(range(-max_lag, max_lag + 1))
    scores = []
    for lag in lags:
        if lag >= 0:
            scores.append(float(np.mean(v[lag:] * a[: len(a) - lag])))
        else:
            scores.append(float(np.mean(v[:lag] * a[-lag:])))
    best = int(np.argmax(scores))
    if 0 < best < len(lags) - 1:
        left, mid, right = scores[best - 1], scores[best], scores[best + 1]
        denominator = left - 2 * mid + right
        refine = 0.5 * (left - right) / denominator if denominator else 0.0
        return lags[best] + refine
    return float(lags[best])


async def prepare(host: SidecarHost, session_id: str, avatar_zip_path: Path) -> object:
    await host.prepare_avatar(session_id, AvatarAsset(avatar_zip_path, "frames_zip", ""), lambda _p: None)
    return host.sessions[session_id].avatar


def decode_mp4(path: Path) -> tuple[int, float, int]:
    """(video frames, video duration s, audio samples) of an MP4 file."""
    with av.open(str(path)) as container:
        assert container.streams.video and container.streams.audio
        video_frames = audio_samples = 0
        last_time_s = 0.0
        for frame in container.decode(video=0, audio=0):
            if isinstance(frame, av.VideoFrame):
                video_frames += 1
                last_time_s = float(frame.time or 0.0)
            elif isinstance(frame, av.AudioFrame):
                audio_samples += frame.samples
    return video_frames, last_time_s + FRAME_S, audio_samples


async def test_rtmp_session_streams_speech_in_sync_and_records_it(
    sidecar: RunningSidecar,
    rtmp_server: RtmpServerConfig,
    avatar_zip_path: Path,
    speech: SpeechClip,
    tmp_path: Path,
) -> None:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    session_id = "rtmp-speech"
    avatar = await prepare(host, session_id, avatar_zip_path)
    box = mouth_box_of(avatar)
    idle_mouths = [
        avatar.idle_frame(i)[box[1] : box[3], box[0] : box[2]].astype(np.float32)  # type: ignore[attr-defined]
        for i in range(48)
    ]
    url = rtmp_server.publish_url(session_id)
    record_path = tmp_path / "session.mp4"
    opened = await host.open_output(
        session_id, OutputTarget(RTMP.name, RtmpTarget(url), record_path=record_path)
    )
    assert opened.kind is RTMP.name and session_id not in opened.detail  # the stream key is redacted
    reader = StreamReader(url, box, max_seconds=60)
    reader.start()
    try:
        await asyncio.to_thread(reader.wait_for_frames, 25, 20)
        await asyncio.sleep(1.0)
        async with websockets.connect(sidecar.audio_url(session_id, sample_rate=speech.rate_hz)) as ws:
            await next_of(ws, "ready")
            await stream_realtime(ws, speech)
            await ws.send(json.dumps({"type": "end_of_utterance"}))
            await next_of(ws, "playback_started")
            finished = await next_of(ws, "playback_finished")
        await asyncio.sleep(1.5)  # trailing silence, and the encoder's queue drains
        runtime = host.runtime(session_id)
        assert runtime is not None
        stats = runtime.stats()
        recording = host.sessions[session_id].publishers[1].stats()
    finally:
        await host.teardown(session_id)
        await asyncio.to_thread(reader.join, 15)
    assert not reader.errors, reader.errors

    # Rate, from the decoded timestamps (and the stream kept pace with the wall clock).
    times = np.array([t for t, _ in reader.frames])
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert abs(fps - FRAME_RATE_FPS) <= 0.1 * FRAME_RATE_FPS, fps
    assert np.all(np.diff(times) > 0)

    # Lips: move during speech, sit on the idle cycle in silence.
    distances = np.array([idle_distance(mouth, idle_mouths) for _, mouth in reader.frames])
    audio_start_s, track = reader.audio_track()
    rate = reader.audio_rate_hz
    assert rate == 48_000
    per_frame = int(rate * FRAME_S)
    level = np.zeros(len(times))
    for i, t in enumerate(times):
        at = round((t - audio_start_s) * rate)
        if at >= 0 and at + per_frame <= len(track):
            level[i] = float(np.sqrt(np.mean(np.square(track[at : at + per_frame], dtype=np.float64))))
    loud = level > 0.3 * level.max()
    silent = level < 1e-4
    assert loud.sum() > 20 and silent.sum() > 40, (loud.sum(), silent.sum())
    assert np.median(distances[loud]) > SPEECH_MIN_DISTANCE, np.median(distances[loud])
    assert np.percentile(distances[silent], 95) < IDLE_MAX_DISTANCE, np.percentile(distances[silent], 95)

    # Audio: the decoded envelope matches the sent speech.
    sent48 = speech.at_48k()
    lag, _ = align(track, sent48)
    correlation = envelope_correlation(track, sent48, lag)
    assert correlation >= 0.9, correlation

    # A/V offset from the decoded stream: within one frame.
    offset_frames = subframe_lag(distances, level)
    logger.info(
        "rtmp session measured: fps %.2f, envelope r %.3f, A/V offset %.1f ms",
        fps,
        correlation,
        offset_frames * 1000 * FRAME_S,
    )
    assert abs(offset_frames) <= 1.0, f"A/V offset {offset_frames * 40:.1f} ms"

    # Accounting on the RTMP output, and the recording beside it.
    assert finished["interrupted"] is False
    assert stats.output.startswith("rtmp")
    assert stats.audio_samples_received == stats.audio_samples_rendered == speech.timeline_samples()
    assert stats.audio_samples_published == speech.timeline_samples()
    assert stats.dropped_frames == 0
    assert_adds_up(stats)
    assert record_path.exists() and not record_path.with_suffix(".partial.mp4").exists()
    frames, duration_s, audio_samples = decode_mp4(record_path)
    assert recording.frames_dropped == 0
    assert abs(frames - recording.frames_published) <= 1, (frames, recording.frames_published)
    assert audio_samples >= 48_000 * (duration_s - 0.1)
    assert recording.audio_samples_published == speech.timeline_samples()


async def test_a_five_second_session_records_125_frames_with_audio(
    sidecar: RunningSidecar, rtmp_server: RtmpServerConfig, avatar_zip_path: Path, tmp_path: Path
) -> None:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    session_id = "rtmp-record-5s"
    await prepare(host, session_id, avatar_zip_path)
    record_path = tmp_path / "five.mp4"
    url = rtmp_server.publish_url(session_id)
    await host.open_output(session_id, OutputTarget(RTMP.name, RtmpTarget(url), record_path=record_path))
    started_tick = host.sessions[session_id].runtime.tick  # type: ignore[union-attr]
    # Stop on the session's own clock: exactly 125 ticks after the output opened.
    # The runtime has no per-tick event to wait on; polling every 10 ms is well within a frame.
    while host.sessions[session_id].runtime.tick < started_tick + 125:  # type: ignore[union-attr]  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await host.teardown(session_id)
    frames, duration_s, audio_samples = decode_mp4(record_path)
    assert abs(frames - 125) <= 3, frames
    assert abs(duration_s - 5.0) <= 0.12, duration_s
    assert abs(audio_samples - 5 * 48_000) <= 3 * 1920 + 1024, audio_samples


async def test_a_live_session_switches_from_livekit_to_rtmp_without_restarting(
    sidecar: RunningSidecar,
    livekit_server: LiveKitServerConfig,
    rtmp_server: RtmpServerConfig,
    avatar_zip_path: Path,
    speech: SpeechClip,
) -> None:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    session_id, room = "switch-to-rtmp", "room-switch"
    avatar = await prepare(host, session_id, avatar_zip_path)
    identity = f"lipsync-avatar-{session_id}"
    livekit = LiveKitTarget(livekit_server.ws_url, room, identity, token(livekit_server, identity, room))
    await host.open_output(session_id, OutputTarget(LIVEKIT.name, livekit))
    runtime = host.runtime(session_id)
    assert runtime is not None
    url = rtmp_server.publish_url(session_id)
    reader = StreamReader(url, mouth_box_of(avatar), max_seconds=40)
    try:
        async with websockets.connect(sidecar.audio_url(session_id, sample_rate=speech.rate_hz)) as ws:
            await next_of(ws, "ready")
            streaming = asyncio.create_task(stream_realtime(ws, speech))
            await next_of(ws, "playback_started")
            await asyncio.sleep(1.0)
            before = runtime.stats()
            tick_before = runtime.tick
            assert before.fallbacks == 0 and before.output == "livekit"
            # A malformed target fails the switch and leaves the session where it was.
            with pytest.raises(Exception, match="rtmp"):
                await host.switch_output(session_id, OutputTarget(RTMP.name, RtmpTarget("http://nope")))
            opened = await host.switch_output(session_id, OutputTarget(RTMP.name, RtmpTarget(url)))
            reader.start()
            await streaming
            await ws.send(json.dumps({"type": "end_of_utterance"}))
            finished = await next_of(ws, "playback_finished")
        await asyncio.to_thread(reader.wait_for_frames, 25, 20)
        await asyncio.sleep(0.5)
        after = runtime.stats()
        assert (
            host.runtime(session_id) is runtime and runtime.tick > tick_before + 25
        )  # same clock, kept going
    finally:
        await host.teardown(session_id)
        await asyncio.to_thread(reader.join, 15)
    assert not reader.errors, reader.errors
    assert opened.kind is RTMP.name
    assert after.output == "rtmp" and after.fallbacks == 1
    assert after.extra["rtmp_switches"] == 1.0
    assert finished["interrupted"] is False
    # Every sample was rendered once and published once, across both outputs.
    assert after.audio_samples_received == after.audio_samples_rendered == speech.timeline_samples()
    # Published, or counted as dropped: starting the RTMP output can hold the event loop long enough that the
    # LiveKit output drops the late head of a tick to stay in sync (published + dropped == rendered, exactly).
    dropped = int(after.extra["rtmp_audio_samples_dropped"])
    assert after.audio_samples_published + dropped == speech.timeline_samples()
    assert dropped <= 0.05 * speech.timeline_samples(), after.extra
    assert_adds_up(after)


async def test_after_an_output_failure_the_switched_session_runs_on(
    sidecar: RunningSidecar, rtmp_server: RtmpServerConfig, avatar_zip_path: Path
) -> None:
    """The workflow's live fallback: run_session ends `output_failed`, switch_output, run_session again."""
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    session_id = "rtmp-output-failed"
    await prepare(host, session_id, avatar_zip_path)
    first = OutputTarget(RTMP.name, RtmpTarget(rtmp_server.publish_url(f"{session_id}-a")))
    await host.open_output(session_id, first)
    original_config = host.config
    host.config = dataclasses.replace(original_config, output_down_timeout_s=0.3)
    limits = RunLimits(idle_timeout_s=60.0, max_duration_s=60.0, stats_interval_s=0.2)
    try:
        live = host.sessions[session_id].live_output
        assert live is not None and isinstance(live.current, RtmpOutput)
        live.current._publisher.stats.connected = (
            False  # what the media thread reports when the server is gone
        )
        ended = await asyncio.wait_for(host.run_session(session_id, limits, lambda _s: None), timeout=10)
        assert ended.reason is SessionEndReason.OUTPUT_FAILED
        second = OutputTarget(RTMP.name, RtmpTarget(rtmp_server.publish_url(f"{session_id}-b")))
        await host.switch_output(session_id, second)
        running = asyncio.create_task(host.run_session(session_id, limits, lambda _s: None))
        await asyncio.sleep(1.0)
        assert not running.done(), "the switched session ended at once"
        await host.stop_session(session_id, SessionEndReason.STOPPED)
        ended = await asyncio.wait_for(running, timeout=5)
        assert ended.reason is SessionEndReason.STOPPED and ended.stats.fallbacks == 1
    finally:
        host.config = original_config
        await host.teardown(session_id)
