"""RTMP(S) output: pushes the session's frames and audio with PyAV, reconnecting with backoff.

Encoding and network I/O run on a dedicated thread fed by a bounded queue, so a slow or
dead RTMP server never stalls the session clock. While the server is unreachable, ticks
are counted as dropped (a live stream cannot be caught up); on reconnect a new encoder
starts with a keyframe and timestamps restart at zero for that connection, keeping audio
and video on the session clock relative to each other.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from realtime.outputs.encoder import AvMuxer, EncoderSettings
from realtime.outputs.errors import RtmpPublishRefused
from realtime.outputs.rtmp_url import redact_rtmp_url, validate_rtmp_url

logger = logging.getLogger(__name__)


@dataclass
class RtmpStats:
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0  # ticks that could not be sent (server down, or queue full)
    speech_samples_sent: int = 0  # speech the sent ticks carried (16 kHz timeline units)
    speech_samples_dropped: int = 0  # speech the dropped ticks carried (16 kHz timeline units)
    playout_samples_sent: int = 0  # all audio sent (48 kHz samples)
    speech_samples_flushed: int = 0  # speech an interrupt silenced before it was sent (16 kHz units)
    last_error: str = ""
    # A reconnect attempt failed since the connection was lost: the server is gone, not just slow.
    unreachable: bool = False


@dataclass(frozen=True)
class _Tick:
    frame_rgb: np.ndarray
    frame_index: int
    audio_48k: np.ndarray
    audio_start_sample: int
    speech_samples: int


class RtmpStreamWriter:
    def __init__(
        self,
        url: str,
        settings: EncoderSettings,
        *,
        connect_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 4.0,
        queue_size_frames: int = 50,
    ) -> None:
        self.url = validate_rtmp_url(url)
        self.settings = settings
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = RtmpStats()
        # Drops are counted from the caller's thread (queue full) and the media thread (server down).
        self._drop_lock = threading.Lock()
        self._queue: queue.Queue[_Tick | None] = queue.Queue(maxsize=queue_size_frames)
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def _open(self) -> AvMuxer:
        return AvMuxer(
            self.url,
            "flv",
            self.settings,
            options={"flvflags": "no_duration_filesize"},
            io_timeout_s=self.connect_timeout_s,
        )

    def _open_probed(self) -> AvMuxer:
        """Open and write one black, silent frame at pts 0.

        PyAV connects lazily and the server answers the publish request only when the stream
        header goes out, so a refused publish shows up on this first write, not on open.
        """
        muxer = self._open()
        try:
            black = np.zeros((self.settings.height_px, self.settings.width_px, 3), dtype=np.uint8)
            muxer.write_video(black, 0)
            muxer.write_audio(np.zeros(self._samples_per_frame, dtype=np.float32), 0)
        except Exception:
            muxer.abort()
            raise
        return muxer

    @property
    def _samples_per_frame(self) -> int:
        return self.settings.audio_sample_rate_hz // self.settings.frame_rate_fps

    def start(self) -> None:
        """Connect now, so a refused publish or unreachable server is reported to the caller."""
        try:
            muxer = self._open_probed()
        except Exception as exc:
            raise RtmpPublishRefused(
                f"could not publish to {redact_rtmp_url(self.url)}: {exc} "
                "(is the server up, and does it allow publishing from this host?)"
            ) from exc
        self._mark_connected()
        self._thread = threading.Thread(
            target=self._run, args=(muxer,), name="rtmp-stream-writer", daemon=True
        )
        self._thread.start()

    def _mark_connected(self) -> None:
        self.stats.connected = True
        self.stats.unreachable = False
        self.stats.connects += 1
        logger.info(
            "rtmp connected", extra={"url": redact_rtmp_url(self.url), "connects": self.stats.connects}
        )

    def _count_drop(self, speech_samples: int) -> None:
        with self._drop_lock:
            self.stats.frames_dropped += 1
            self.stats.speech_samples_dropped += speech_samples

    def submit(
        self,
        frame_rgb: np.ndarray,
        frame_index: int,
        audio_48k: np.ndarray,
        audio_start_sample: int,
        speech_samples: int = 0,
    ) -> None:
        """One tick of the session clock: a frame and the audio that plays during it. Never blocks."""
        try:
            self._queue.put_nowait(
                _Tick(frame_rgb, frame_index, audio_48k, audio_start_sample, speech_samples)
            )
        except queue.Full:
            self._count_drop(speech_samples)

    def replace_pending(self, idle_frame: Callable[[int], np.ndarray]) -> int:
        """Interrupt: queued, unsent ticks show `idle_frame(frame_index)` with silence. Returns how many."""
        with self._queue.mutex:
            pending = list(self._queue.queue)
            self._queue.queue.clear()
            for tick in pending:
                if tick is None:
                    self._queue.queue.append(None)
                    continue
                self.stats.speech_samples_flushed += tick.speech_samples
                self._queue.queue.append(
                    _Tick(
                        idle_frame(tick.frame_index),
                        tick.frame_index,
                        np.zeros_like(tick.audio_48k),
                        tick.audio_start_sample,
                        0,
                    )
                )
        return sum(1 for tick in pending if tick is not None)

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed.set()
        if self._thread is not None:
            # The sentinel may wait if the queue is full; the closed flag stops the loop regardless.
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
            self._thread.join(timeout=timeout_s)

    def _run(self, muxer: AvMuxer | None) -> None:
        backoff_s = self.backoff_initial_s
        next_attempt = 0.0
        base_frame: int | None = None  # timestamps restart at zero on every connection
        base_sample: int | None = None
        while True:
            try:
                tick = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed.is_set():
                    break
                continue
            if tick is None:
                break
            if muxer is None:
                now = time.monotonic()
                if now < next_attempt:
                    self._count_drop(tick.speech_samples)
                    continue
                try:
                    muxer = self._open_probed()
                except Exception as exc:
                    self._count_drop(tick.speech_samples)
                    self.stats.last_error = str(exc)
                    self.stats.unreachable = True
                    next_attempt = now + backoff_s
                    backoff_s = min(backoff_s * 2, self.backoff_max_s)
                    continue
                self._mark_connected()
                self.stats.reconnects += 1
                backoff_s = self.backoff_initial_s
                base_frame = None
                base_sample = None
            if base_frame is None or base_sample is None:
                # The probe frame holds pts 0 of this connection; the session's ticks follow it.
                base_frame = tick.frame_index - 1
                base_sample = tick.audio_start_sample - self._samples_per_frame
            try:
                muxer.write_video(tick.frame_rgb, tick.frame_index - base_frame)
                muxer.write_audio(tick.audio_48k, tick.audio_start_sample - base_sample)
                self.stats.frames_sent += 1
                self.stats.speech_samples_sent += tick.speech_samples
                self.stats.playout_samples_sent += len(tick.audio_48k)
            except Exception as exc:
                logger.warning(
                    "rtmp connection lost", extra={"url": redact_rtmp_url(self.url), "error": str(exc)}
                )
                self.stats.connected = False
                self.stats.last_error = str(exc)
                self._count_drop(tick.speech_samples)
                muxer.abort()
                muxer = None
                next_attempt = time.monotonic() + backoff_s
        if muxer is not None:
            try:
                muxer.close()
            except Exception as exc:
                logger.warning("rtmp close failed", extra={"error": str(exc)})
        self.stats.connected = False
