"""PyAV pushes H.264/AAC to the real nginx-rtmp server and a reader decodes frames back."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from infra.rtmp import RtmpServerConfig

pytestmark = pytest.mark.service

FRAME_RATE_FPS = 25
SAMPLE_RATE_HZ = 48_000
WIDTH_PX, HEIGHT_PX = 320, 240


def _push(url: str, seconds: float) -> None:
    """Paced at real time, like a live publisher."""
    with av.open(url, mode="w", format="flv") as container:
        video = container.add_stream("libx264", rate=FRAME_RATE_FPS)
        video.width, video.height, video.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
        video.options = {
            "tune": "zerolatency",
            "preset": "ultrafast",
            "g": str(FRAME_RATE_FPS * 2),
            "bf": "0",
        }
        audio = container.add_stream("aac", rate=SAMPLE_RATE_HZ, layout="mono")
        samples_per_frame = 1024
        audio_samples_sent = 0
        started = time.monotonic()
        for index in range(int(seconds * FRAME_RATE_FPS)):
            rgb = np.full((HEIGHT_PX, WIDTH_PX, 3), (index * 9) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, FRAME_RATE_FPS)
            for packet in video.encode(frame):
                container.mux(packet)
            while audio_samples_sent < (index + 1) * SAMPLE_RATE_HZ // FRAME_RATE_FPS:
                t = (audio_samples_sent + np.arange(samples_per_frame)) / SAMPLE_RATE_HZ
                tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
                aframe = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                aframe.sample_rate = SAMPLE_RATE_HZ
                aframe.pts = audio_samples_sent
                aframe.time_base = Fraction(1, SAMPLE_RATE_HZ)
                for packet in audio.encode(aframe):
                    container.mux(packet)
                audio_samples_sent += samples_per_frame
            time.sleep(max(0.0, started + (index + 1) / FRAME_RATE_FPS - time.monotonic()))
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)


def test_pyav_push_and_read_back(rtmp_server: RtmpServerConfig) -> None:
    url = rtmp_server.publish_url("smoke")
    video_frames: list[av.VideoFrame] = []
    audio_frames = 0
    errors: list[BaseException] = []
    reader_ready = threading.Event()
    deadline = time.monotonic() + 30

    def read() -> None:
        nonlocal audio_frames
        try:
            # The player waits for the publisher (idle_streams on); rw_timeout bounds a dead server.
            reader_ready.set()
            with av.open(url, options={"rw_timeout": "10000000"}, timeout=10) as container:
                for frame in container.decode(video=0, audio=0):
                    if isinstance(frame, av.VideoFrame):
                        video_frames.append(frame)
                    else:
                        audio_frames += 1
                    if len(video_frames) >= 25 or time.monotonic() > deadline:
                        return
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader_ready.wait(5)
    time.sleep(0.3)
    pusher = threading.Thread(target=_push, args=(url, 2.0), daemon=True)
    pusher.start()
    pusher.join(timeout=30)
    reader.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not pusher.is_alive() and not reader.is_alive()
    assert not errors, errors
    assert len(video_frames) >= 20, f"decoded only {len(video_frames)} video frames"
    assert all((f.width, f.height) == (WIDTH_PX, HEIGHT_PX) for f in video_frames)
    assert audio_frames > 0
