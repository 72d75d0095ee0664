"""RTMP output against the real nginx-rtmp server: read back, A/V alignment, reconnect, clear errors."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import av
import numpy as np
import pytest

from infra.process import ManagedProcess
from infra.rtmp import RtmpServerConfig
from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.errors import RtmpPublishRefused, RtmpUrlError
from realtime.outputs.rtmp_stream import RtmpStreamWriter
from realtime.outputs.rtmp_url import redact_rtmp_url, validate_rtmp_url
from tests.support.avsignals import (
    AUDIO_RATE_HZ,
    FRAME_RATE_FPS,
    HEIGHT_PX,
    SAMPLES_PER_FRAME,
    WIDTH_PX,
    burst_onsets_s,
    flash_times_s,
    tick,
)

SETTINGS = EncoderSettings(width_px=WIDTH_PX, height_px=HEIGHT_PX)


@dataclass
class Reader:
    """Plays an RTMP stream in a thread, collecting (time, brightness) per frame and the audio."""

    url: str
    max_seconds: float
    expected_frames: int = 1_000_000
    frames: list[tuple[float, float]] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    audio_start_s: float | None = None
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            with av.open(self.url, options={"rw_timeout": "8000000"}, timeout=8) as container:
                for frame in container.decode(video=0, audio=0):
                    if isinstance(frame, av.VideoFrame):
                        gray = frame.to_ndarray(format="gray")
                        self.frames.append((float(frame.time or 0.0), float(gray.mean())))
                        if len(self.frames) >= self.expected_frames:
                            return
                    elif isinstance(frame, av.AudioFrame):
                        if self.audio_start_s is None:
                            self.audio_start_s = float(frame.time or 0.0)
                        self.audio.append(frame.to_ndarray().mean(axis=0).astype(np.float32))
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
        except BaseException as exc:
            if not self.stop.is_set():
                self.errors.append(exc)


def _push(publisher: RtmpStreamWriter, frames: int, flash_frames: set[int], first_frame: int = 0) -> None:
    started = time.monotonic()
    for index in range(first_frame, first_frame + frames):
        frame, audio = tick(index, flash_frames)
        publisher.submit(frame, index, audio, index * SAMPLES_PER_FRAME)
        time.sleep(max(0.0, started + (index - first_frame + 1) / FRAME_RATE_FPS - time.monotonic()))


pytestmark = pytest.mark.service


def test_stream_reads_back_at_25_fps_with_av_aligned(rtmp_server: RtmpServerConfig) -> None:
    url = rtmp_server.publish_url("aligned")
    reader = Reader(url, max_seconds=20, expected_frames=125)
    thread = reader.start()
    time.sleep(0.3)
    publisher = RtmpStreamWriter(url, SETTINGS)
    publisher.start()
    flashes = {30, 60, 90}
    _push(publisher, 125, flashes)
    publisher.close()
    thread.join(timeout=15)
    reader.stop.set()
    assert not reader.errors, reader.errors
    assert publisher.stats.frames_sent == 125 and publisher.stats.frames_dropped == 0

    times = [t for t, _ in reader.frames]
    assert len(times) >= 110
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert abs(fps - FRAME_RATE_FPS) <= 0.1 * FRAME_RATE_FPS, fps

    assert reader.audio_start_s is not None
    video_marks = flash_times_s(reader.frames)
    audio_marks = burst_onsets_s(np.concatenate(reader.audio), AUDIO_RATE_HZ, reader.audio_start_s)
    assert len(video_marks) == len(flashes) == len(audio_marks), (video_marks, audio_marks)
    offsets_ms = [1000 * (a - v) for v, a in zip(video_marks, audio_marks, strict=True)]
    # ±1 frame, measured from the decoded stream's own timestamps.
    assert all(abs(offset) <= 1000 / FRAME_RATE_FPS for offset in offsets_ms), offsets_ms


def test_publisher_reconnects_after_nginx_restart(
    rtmp_service: tuple[RtmpServerConfig, ManagedProcess],
) -> None:
    config, nginx = rtmp_service
    url = config.publish_url("restart")
    publisher = RtmpStreamWriter(
        url, SETTINGS, backoff_initial_s=0.1, backoff_max_s=0.5, connect_timeout_s=2.0
    )
    publisher.start()
    _push(publisher, 25, set())
    nginx.stop()
    _push(publisher, 25, set(), first_frame=25)  # server down: these cannot be delivered
    pushed = 50
    deadline_s = time.monotonic() + 5.0
    while not publisher.stats.unreachable:  # a reconnect attempt was refused: the server is gone
        assert time.monotonic() < deadline_s, publisher.stats
        _push(publisher, 5, set(), first_frame=pushed)
        pushed += 5
    assert not publisher.stats.connected
    nginx.start()
    reader = Reader(url, max_seconds=15, expected_frames=25)
    thread = reader.start()
    _push(publisher, 100, set(), first_frame=pushed)
    publisher.close()
    thread.join(timeout=10)
    reader.stop.set()
    assert publisher.stats.reconnects >= 1 and not publisher.stats.unreachable, publisher.stats
    assert publisher.stats.frames_dropped > 0
    assert len(reader.frames) >= 25, "no frames after the server came back"


def test_refused_publish_is_a_clear_error(rtmp_server: RtmpServerConfig) -> None:
    # nginx-rtmp refuses publishing to an application it does not have.
    url = f"rtmp://{rtmp_server.host}:{rtmp_server.rtmp_port}/no-such-app/key"
    publisher = RtmpStreamWriter(url, SETTINGS, connect_timeout_s=3.0)
    with pytest.raises(RtmpPublishRefused) as exc:
        publisher.start()
    assert exc.value.code == "rtmp_publish_refused"
    assert "/key" not in exc.value.message  # the stream key is a credential


def test_unreachable_server_is_a_clear_error() -> None:
    from infra.process import free_port

    url = f"rtmp://127.0.0.1:{free_port()}/live/key"
    with pytest.raises(RtmpPublishRefused):
        RtmpStreamWriter(url, SETTINGS, connect_timeout_s=2.0).start()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://127.0.0.1/live/key",
        "rtmp://",
        "rtmp://127.0.0.1:99999/live/key",
        "rtmp://127.0.0.1/live",
        "rtmp://127.0.0.1/live/key with space",
        "rtmp://127.0.0.1/live/\x00key",
    ],
)
def test_malformed_rtmp_urls_are_rejected(url: str) -> None:
    with pytest.raises(RtmpUrlError) as exc:
        validate_rtmp_url(url)
    assert exc.value.code == "rtmp_url_invalid"


def test_rtmps_url_is_accepted_and_stream_key_redacted() -> None:
    url = "rtmps://live.example.invalid:443/app/secret-key"
    assert validate_rtmp_url(url) == url
    assert "secret-key" not in redact_rtmp_url(url)
