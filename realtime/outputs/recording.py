"""MP4 recording as a session `Publisher` (an extra output beside the live one).

Encoding runs on its own thread fed by a bounded queue so the session clock never waits on
the disk; the file appears at its final path only after a clean close (atomic, see
`realtime.outputs.mp4`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from realtime.outputs.base import PublisherStats, PublishTick
from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.mp4 import Mp4Recorder

logger = logging.getLogger(__name__)


class RecordingOutput:
    def __init__(self, path: Path, width_px: int, height_px: int, *, queue_size_frames: int = 250) -> None:
        self.name = "recording"
        self.path = path
        self._settings = EncoderSettings(width_px=width_px, height_px=height_px)
        self._recorder: Mp4Recorder | None = None
        self._queue: queue.Queue[PublishTick | None] = queue.Queue(maxsize=queue_size_frames)
        self._thread: threading.Thread | None = None
        self._stats = PublisherStats(name=self.name)
        self._lock = threading.Lock()

    async def start(self) -> None:
        self._recorder = await asyncio.to_thread(Mp4Recorder, self.path, self._settings)
        self._stats.connected = True
        self._thread = threading.Thread(target=self._run, name="mp4-recorder", daemon=True)
        self._thread.start()

    async def publish(self, tick: PublishTick) -> None:
        try:
            self._queue.put_nowait(tick)
        except queue.Full:
            with self._lock:
                self._stats.frames_dropped += 1
                self._stats.audio_samples_dropped += tick.speech_samples

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        # A recording keeps what was rendered: it documents the session, it is not live playout.
        del idle_frame

    def _run(self) -> None:
        recorder = self._recorder
        assert recorder is not None
        while (tick := self._queue.get()) is not None:
            try:
                recorder.write(tick.frame_rgb, tick.frame_index, tick.audio_playout, tick.audio_start_sample)
            except Exception as exc:
                logger.warning("recording write failed", extra={"path": str(self.path), "error": str(exc)})
                with self._lock:
                    self._stats.frames_dropped += 1
                    self._stats.audio_samples_dropped += tick.speech_samples
                    self._stats.last_error = str(exc)
                continue
            with self._lock:
                self._stats.frames_published += 1
                self._stats.audio_samples_published += tick.speech_samples
                self._stats.playout_samples_published += len(tick.audio_playout)

    async def close(self) -> None:
        if self._thread is None or self._recorder is None:
            return
        # The queue may be full (the disk is slow): wait off the event loop, which keeps the session clock.
        await asyncio.to_thread(self._queue.put, None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        final = await asyncio.to_thread(self._recorder.close)
        self._stats.connected = False
        logger.info("recording written", extra={"path": str(final), "frames": self._stats.frames_published})

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})
