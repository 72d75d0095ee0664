"""One H.264/AAC muxer over a PyAV container (an RTMP URL or a file)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSettings:
    width_px: int
    height_px: int
    frame_rate_fps: int = 25
    gop_s: float = 2.0
    video_bitrate_bps: int = 1_500_000
    x264_preset: str = "veryfast"
    audio_sample_rate_hz: int = 48_000
    audio_bitrate_bps: int = 96_000

    @property
    def gop_frames(self) -> int:
        return round(self.gop_s * self.frame_rate_fps)

    def __post_init__(self) -> None:
        # H.264 with 4:2:0 chroma needs even dimensions; WebRTC/players need >= 16 px.
        if self.width_px < 16 or self.height_px < 16 or self.width_px % 2 or self.height_px % 2:
            raise ValueError(f"video size {self.width_px}x{self.height_px} must be even and at least 16x16")


class AvMuxer:
    """Encodes RGB frames and mono float audio into one container.

    Not thread-safe: one owner thread calls write_* and close().
    """

    # AAC frames are 1024 samples; audio is buffered until a whole frame exists.
    AAC_FRAME_SAMPLES = 1024

    def __init__(
        self,
        target: str,
        container_format: str,
        settings: EncoderSettings,
        options: dict[str, str],
        io_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        # io_timeout_s bounds connect and every write: a dead RTMP server fails a write instead of hanging it.
        self._container: Any = av.open(
            target, mode="w", format=container_format, container_options=options, timeout=io_timeout_s
        )
        try:
            video: Any = self._container.add_stream("libx264", rate=settings.frame_rate_fps)
            video.width = settings.width_px
            video.height = settings.height_px
            video.pix_fmt = "yuv420p"
            video.bit_rate = settings.video_bitrate_bps
            video.time_base = Fraction(1, settings.frame_rate_fps)
            video.options = {
                "preset": settings.x264_preset,
                "tune": "zerolatency",
                "g": str(settings.gop_frames),
                "keyint_min": str(settings.gop_frames),
                "bf": "0",
                "sc_threshold": "0",
            }
            audio: Any = self._container.add_stream("aac", rate=settings.audio_sample_rate_hz, layout="mono")
            audio.bit_rate = settings.audio_bitrate_bps
            audio.time_base = Fraction(1, settings.audio_sample_rate_hz)
        except Exception:
            self._container.close()
            raise
        self._video = video
        self._audio = audio
        self._pending_audio = np.zeros(0, dtype=np.float32)
        self._audio_pts_samples: int | None = None
        self.video_frames_written = 0
        self.audio_samples_written = 0

    def write_video(self, frame_rgb: np.ndarray, frame_index: int) -> None:
        """`frame_index` is the session clock's frame number (pts in 1/fps units)."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        frame.pts = frame_index
        frame.time_base = Fraction(1, self.settings.frame_rate_fps)
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self.video_frames_written += 1

    def write_audio(self, samples: np.ndarray, start_sample: int) -> None:
        """Mono float32 samples at the audio rate; `start_sample` is the session clock's sample index."""
        if self._audio_pts_samples is None:
            self._audio_pts_samples = start_sample
        expected = self._audio_pts_samples + len(self._pending_audio)
        if start_sample != expected:
            # A gap (e.g. after an RTMP reconnect) restarts the AAC frame grid at the new position.
            self._flush_audio(pad=True)
            self._audio_pts_samples = start_sample
        self._pending_audio = np.concatenate([self._pending_audio, samples.astype(np.float32, copy=False)])
        self._flush_audio(pad=False)

    def _flush_audio(self, pad: bool) -> None:
        n = self.AAC_FRAME_SAMPLES
        while len(self._pending_audio) >= n or (pad and len(self._pending_audio) > 0):
            chunk = self._pending_audio[:n]
            if len(chunk) < n:
                chunk = np.pad(chunk, (0, n - len(chunk)))
            self._pending_audio = self._pending_audio[n:]
            frame = av.AudioFrame.from_ndarray(
                np.clip(chunk, -1.0, 1.0)[None, :], format="fltp", layout="mono"
            )
            frame.sample_rate = self.settings.audio_sample_rate_hz
            assert self._audio_pts_samples is not None
            frame.pts = self._audio_pts_samples
            frame.time_base = Fraction(1, self.settings.audio_sample_rate_hz)
            self._audio_pts_samples += n
            for packet in self._audio.encode(frame):
                self._container.mux(packet)
            self.audio_samples_written += n

    def close(self) -> None:
        try:
            self._flush_audio(pad=True)
            for stream in (self._video, self._audio):
                for packet in stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()

    def abort(self) -> None:
        """Close without flushing (the connection is already broken)."""
        try:
            self._container.close()
        except Exception as exc:  # the transport is gone; nothing left to save
            logger.debug("closing a broken container failed", extra={"error": str(exc)})
