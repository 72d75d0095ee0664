"""A real `Publisher` that keeps every tick in memory: the output for tests that need no network."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from realtime.outputs.base import FrameKind, PublisherStats, PublishTick


class RecordingPublisher:
    def __init__(self, width_px: int, height_px: int) -> None:
        self.name = "recording"
        self.width_px = width_px
        self.height_px = height_px
        self.ticks: list[PublishTick] = []
        self.interrupted_at: list[int] = []  # frame index of the last tick before each interrupt
        self._stats = PublisherStats(name=self.name)

    async def start(self) -> None:
        self._stats.connected = True

    async def publish(self, tick: PublishTick) -> None:
        assert tick.frame_rgb.shape == (self.height_px, self.width_px, 3)
        assert tick.frame_rgb.dtype == np.uint8
        assert len(tick.audio_playout) == 1920
        self.ticks.append(tick)
        self._stats.frames_published += 1
        self._stats.audio_samples_published += tick.speech_samples
        self._stats.playout_samples_published += len(tick.audio_playout)

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        self.interrupted_at.append(self.ticks[-1].frame_index if self.ticks else -1)

    async def close(self) -> None:
        self._stats.connected = False

    def stats(self) -> PublisherStats:
        return self._stats

    # ---- helpers for assertions --------------------------------------------------------------

    def kinds(self) -> list[FrameKind]:
        return [tick.kind for tick in self.ticks]

    def speech_ticks(self, utterance_id: int | None = None) -> list[PublishTick]:
        return [
            t
            for t in self.ticks
            if t.kind is FrameKind.SPEECH and (utterance_id is None or t.utterance_id == utterance_id)
        ]

    def audio(self) -> np.ndarray:
        return (
            np.concatenate([t.audio_playout for t in self.ticks]) if self.ticks else np.zeros(0, np.float32)
        )
