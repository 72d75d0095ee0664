"""A session's audio timeline: utterances of 16 kHz (engine) + 48 kHz (playout) samples, sample-indexed.

Video frame k of an utterance owns timeline samples [640·k, 640·(k+1)) and playout samples
[1920·k, 1920·(k+1)): one index space for audio and video, so a frame and the audio that
plays during it can never drift apart. The last frame of an ended utterance is padded
with silence (padding is not counted as received audio).

Accounting, in 16 kHz timeline samples, holds at every instant:
    received == rendered + pending + rejected + flushed
where rendered = played out by the session clock inside speech frames, pending = still
queued here, rejected = refused by validation/limits, flushed = discarded by an interrupt.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import (
    PLAYOUT_SAMPLES_PER_FRAME,
    TIMELINE_SAMPLE_RATE_HZ,
    TIMELINE_SAMPLES_PER_FRAME,
)
from realtime.ingest.resample import ConvertedAudio


class GrowableBuffer:
    """Append-only float32 buffer with amortised O(1) appends and zero-copy slices."""

    def __init__(self, initial_capacity: int = 16_000) -> None:
        self._data = np.zeros(initial_capacity, dtype=np.float32)
        self.size = 0

    def append(self, samples: np.ndarray) -> None:
        needed = self.size + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), dtype=np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : needed] = samples
        self.size = needed

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop); the part past the end is zero padding."""
        stop_in = min(stop, self.size)
        if start >= stop_in:
            return np.zeros(stop - start, dtype=np.float32)
        if stop_in == stop:
            return self._data[start:stop]
        return np.concatenate([self._data[start:stop_in], np.zeros(stop - stop_in, dtype=np.float32)])


@dataclass(frozen=True)
class FrameAudio:
    """The audio of one speech frame: what the engine sees and what the publishers play."""

    utterance_id: int
    frame_index: int  # within the utterance
    timeline: np.ndarray  # 640 samples at 16 kHz (padded on the last frame)
    playout: np.ndarray  # 1920 samples at 48 kHz (padded on the last frame)
    timeline_samples: int  # real (unpadded) timeline samples in this frame
    is_last: bool


class Utterance:
    """One utterance: from its first sample to end_of_utterance (or a stream's close)."""

    def __init__(self, utterance_id: int, source: str) -> None:
        self.utterance_id = utterance_id
        self.source = source
        self.timeline = GrowableBuffer()
        self.playout = GrowableBuffer(48_000)
        self.ended = False
        self.frames_played = 0
        self.samples_played = 0  # timeline samples
        self.first_audio_at_s: float | None = None  # time.monotonic() of its first byte (for TTFF)

    @property
    def frame_count(self) -> int | None:
        """Total frames once ended (the last one padded), else None."""
        if not self.ended:
            return None
        return math.ceil(self.timeline.size / TIMELINE_SAMPLES_PER_FRAME)

    def frames_available(self) -> int:
        """Frames whose audio (timeline and playout) is complete now."""
        if self.ended:
            return self.frame_count or 0
        return min(
            self.timeline.size // TIMELINE_SAMPLES_PER_FRAME,
            self.playout.size // PLAYOUT_SAMPLES_PER_FRAME,
        )

    @property
    def pending_samples(self) -> int:
        return self.timeline.size - self.samples_played

    @property
    def duration_played_s(self) -> float:
        return self.samples_played / TIMELINE_SAMPLE_RATE_HZ

    def frame_audio(self, frame_index: int) -> FrameAudio:
        t0 = frame_index * TIMELINE_SAMPLES_PER_FRAME
        p0 = frame_index * PLAYOUT_SAMPLES_PER_FRAME
        real = max(0, min(TIMELINE_SAMPLES_PER_FRAME, self.timeline.size - t0))
        count = self.frame_count
        return FrameAudio(
            utterance_id=self.utterance_id,
            frame_index=frame_index,
            timeline=self.timeline.slice(t0, t0 + TIMELINE_SAMPLES_PER_FRAME),
            playout=self.playout.slice(p0, p0 + PLAYOUT_SAMPLES_PER_FRAME),
            timeline_samples=real,
            is_last=count is not None and frame_index == count - 1,
        )


@dataclass
class Accounting:
    """Sample accounting in 16 kHz timeline samples (see the module docstring)."""

    received: int = 0
    rendered: int = 0
    rejected: int = 0
    flushed: int = 0
    clipped: int = 0  # accepted but clipped to [-1, 1] (f32le overshoot)


class SessionTimeline:
    """All of a session's queued audio; one writer at a time appends to the open utterance."""

    def __init__(self, buffer_limit_samples: int) -> None:
        self.buffer_limit_samples = buffer_limit_samples
        self.utterances: deque[Utterance] = deque()
        self.accounting = Accounting()
        self._next_utterance_id = 1
        # Bumped by every interrupt: ingest sources reset their resamplers when it changes.
        self.generation = 0

    @property
    def pending_samples(self) -> int:
        return sum(u.pending_samples for u in self.utterances)

    @property
    def open_utterance(self) -> Utterance | None:
        if self.utterances and not self.utterances[-1].ended:
            return self.utterances[-1]
        return None

    def check_capacity(self, incoming_samples: int) -> None:
        """Raise BUFFER_FULL (rejecting the incoming samples) if they would exceed the limit."""
        pending = self.pending_samples
        if pending + incoming_samples > self.buffer_limit_samples:
            limit_ms = self.buffer_limit_samples * 1000 // TIMELINE_SAMPLE_RATE_HZ
            raise IngestError(
                IngestErrorCode.BUFFER_FULL,
                f"audio buffer full: {pending * 1000 // TIMELINE_SAMPLE_RATE_HZ} ms are queued and this "
                f"message adds {incoming_samples * 1000 // TIMELINE_SAMPLE_RATE_HZ} ms, over the "
                f"{limit_ms} ms limit; the message was rejected. "
                "Send audio at most this far ahead of playback.",
                rejected_samples=incoming_samples,
            )

    def append(self, audio: ConvertedAudio, source: str) -> Utterance:
        """Add accepted audio to the open utterance (opening one if needed)."""
        utterance = self.open_utterance
        if utterance is None:
            utterance = Utterance(self._next_utterance_id, source)
            self._next_utterance_id += 1
            self.utterances.append(utterance)
        utterance.timeline.append(audio.timeline)
        utterance.playout.append(audio.playout)
        self.accounting.received += len(audio.timeline)
        self.accounting.clipped += audio.clipped_samples
        return utterance

    def reject(self, samples: int) -> None:
        self.accounting.received += samples
        self.accounting.rejected += samples

    def end_utterance(self) -> Utterance | None:
        """Close the open utterance; returns it, or None when there was none."""
        utterance = self.open_utterance
        if utterance is not None:
            utterance.ended = True
            if utterance.timeline.size == 0:
                self.utterances.remove(utterance)
                return None
        return utterance

    def mark_played(self, utterance: Utterance, frame: FrameAudio) -> None:
        utterance.frames_played = frame.frame_index + 1
        utterance.samples_played += frame.timeline_samples
        self.accounting.rendered += frame.timeline_samples
        if utterance.ended and utterance.frames_played >= (utterance.frame_count or 0):
            self.utterances.remove(utterance)

    def flush(self) -> list[Utterance]:
        """Interrupt: drop every queued sample (accounted as flushed); returns the dropped utterances."""
        dropped = list(self.utterances)
        self.accounting.flushed += sum(u.pending_samples for u in dropped)
        self.utterances.clear()
        self.generation += 1
        return dropped

    def discard_held(self, samples: int) -> None:
        """Samples an interrupt caught inside an input's resampler: received, and flushed at once."""
        self.accounting.received += samples
        self.accounting.flushed += samples

    def discard_unplayed(self, utterance: Utterance) -> int:
        """Drop one utterance's unplayed audio (flushed); used when a session ends mid-utterance."""
        flushed = utterance.pending_samples
        self.accounting.flushed += flushed
        if utterance in self.utterances:
            self.utterances.remove(utterance)
        return flushed
