"""A session's streaming audio → per-frame features: push any chunk size, pull ready frames.

Timeline: every sample pushed gets a position on the stream's sample timeline; frame `n` of the
stream covers samples `[n*640, (n+1)*640)` of it. Within an utterance, frame `i` becomes ready
once the utterance holds `(i + 3) * 640` samples (its 80 ms right context), or at
`end_of_utterance()`, which pads the utterance with silence to a whole frame (the padding is
returned so the caller pads its published audio the same way) and makes every remaining frame
ready, with zero whisper context past the end — as MuseTalk does at a clip's end.

`reset()` (interrupt) drops what has not been pulled yet and returns how many samples it
dropped; the timeline continues from the last pulled frame. Not thread-safe: one owner.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from realtime.engine.audio.framing import (
    CONTEXT_FRAMES,
    SAMPLES_PER_FRAME,
    SAMPLES_PER_POSITION,
    SEGMENT_POSITIONS,
    SEGMENT_SAMPLES,
    first_position,
    ready_frame_count,
)
from realtime.engine.audio.levels import SpeechGateConfig, frame_rms_dbfs, speech_weights
from realtime.engine.errors import AudioInvalid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureFrame:
    """One video frame's worth of audio features, ready to render."""

    index: int  # frame number on the stream's timeline (covers samples [index*640, (index+1)*640))
    utterance: int  # utterance counter of this stream (increments after end_of_utterance / reset)
    utterance_frame: int  # frame number within its utterance
    # engine-specific: musetalk torch.Tensor [50, 384] (PE applied, engine device); preview ndarray
    features: Any
    rms_dbfs: float  # level of this frame's own 640 samples
    # 0: show the idle frame (engine bypassed); 1: the engine's mouth; between: crossfade
    speech_weight: float
    padded: bool  # holds end-of-utterance silence padding

    @property
    def start_sample(self) -> int:
        return self.index * SAMPLES_PER_FRAME


class FrameFeaturizer(Protocol):
    """What an engine contributes to a stream: features for ready frames of the current utterance."""

    def features(
        self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int
    ) -> list[Any]: ...

    def encode_plan(
        self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int
    ) -> list[Any]:
        """The encodes `features(...)` with the same arguments would run, for a caller to batch across
        streams (`Engine.prefetch_features`); empty when this featurizer has nothing to batch."""
        ...

    def reset(self) -> None: ...


class AudioFeatureStream:
    def __init__(self, featurizer: FrameFeaturizer, gate: SpeechGateConfig | None = None) -> None:
        self._featurizer = featurizer
        self._gate = gate or SpeechGateConfig()
        self._frame_base = 0  # stream frame index of the current utterance's frame 0
        self._utterance = 0
        self._audio = np.zeros(0, dtype=np.float32)  # current utterance from sample _audio_base on
        self._audio_base = 0
        self._utterance_samples = 0
        self._rms = np.zeros(0, dtype=np.float32)  # per whole frame of the current utterance
        self._next_frame = 0  # next utterance frame to emit
        self._final_frames: int | None = None  # set by end_of_utterance: the utterance's frame count
        self._padding_samples = 0
        self._carry: list[FeatureFrame] = []  # frames of an ended utterance not pulled before the next push

    # --- input -------------------------------------------------------------------------------

    def push(self, samples: np.ndarray) -> None:
        """Append mono float32 16 kHz samples in [-1, 1] (any length, including 0)."""
        array = np.asarray(samples)
        if array.ndim != 1:
            raise AudioInvalid(f"audio chunks must be 1-D mono sample arrays, got shape {array.shape}")
        if array.dtype != np.float32:
            raise AudioInvalid(f"audio chunks must be float32 (16 kHz mono), got {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise AudioInvalid("audio chunk contains NaN or infinite samples")
        if len(array) == 0:
            return
        if self._final_frames is not None:
            self._carry.extend(self._take(self._final_frames))
            self._start_utterance()
        self._append(array)

    def end_of_utterance(self) -> int:
        """Pad the utterance to a whole frame with silence and make every frame ready; returns padding
        samples."""
        if self._final_frames is not None or self._utterance_samples == 0:
            return 0
        remainder = self._utterance_samples % SAMPLES_PER_FRAME
        padding = (SAMPLES_PER_FRAME - remainder) % SAMPLES_PER_FRAME
        if padding:
            self._append(np.zeros(padding, dtype=np.float32))
        self._padding_samples = padding
        self._final_frames = self._utterance_samples // SAMPLES_PER_FRAME
        return padding

    def reset(self) -> int:
        """Interrupt: drop unpulled audio and frames; returns the samples dropped."""
        dropped = self._utterance_samples - self._next_frame * SAMPLES_PER_FRAME
        if self._carry:
            dropped += len(self._carry) * SAMPLES_PER_FRAME
            # The carried frames were never delivered: the timeline resumes where delivery stopped.
            self._frame_base = self._carry[0].index
            self._next_frame = 0
            self._carry = []
        self._frame_base += self._next_frame
        self._utterance += 1
        self._clear_utterance()
        return max(0, dropped)

    # --- output ------------------------------------------------------------------------------

    @property
    def ready_frames(self) -> int:
        return len(self._carry) + self._ready_count() - self._next_frame

    @property
    def pending_samples(self) -> int:
        """Samples pushed but not yet covered by a pulled frame."""
        return (
            len(self._carry) * SAMPLES_PER_FRAME
            + self._utterance_samples
            - self._next_frame * SAMPLES_PER_FRAME
        )

    @property
    def next_frame_index(self) -> int:
        return self._carry[0].index if self._carry else self._frame_base + self._next_frame

    def pull(self, max_frames: int | None = None) -> list[FeatureFrame]:
        """The frames that are ready (at most `max_frames`), in order; computes their features now."""
        budget = sys.maxsize if max_frames is None else max(0, max_frames)
        out = self._carry[:budget]
        self._carry = self._carry[budget:]
        if len(out) < budget:  # the carried frames are all out: continue with the current utterance
            out.extend(self._take(self._next_frame + (budget - len(out))))
        return out

    def encode_plan(self, max_frames: int | None = None) -> list[Any]:
        """The feature encodes `pull(max_frames)` would run now, as `(featurizer, segment, audio)` (empty
        when the featurizer does not batch): a caller may run them for many streams at once and `store` the
        results."""
        budget = sys.maxsize if max_frames is None else max(0, max_frames)
        remaining = budget - len(self._carry)
        if remaining <= 0:
            return []
        end = min(self._next_frame + remaining, self._ready_count())
        if end <= self._next_frame:
            return []
        return self._featurizer.encode_plan(
            self._audio,
            self._audio_base,
            range(self._next_frame, end),
            self._utterance_samples // SAMPLES_PER_POSITION,
        )

    def _take(self, end: int) -> list[FeatureFrame]:
        """Compute and consume the current utterance's ready frames up to (excluding) `end`."""
        end = min(end, self._ready_count())
        if end <= self._next_frame:
            return []
        frames = range(self._next_frame, end)
        valid_positions = self._utterance_samples // SAMPLES_PER_POSITION
        features = self._featurizer.features(self._audio, self._audio_base, frames, valid_positions)
        weights = speech_weights(self._rms, self._gate)
        padded_from = (self._utterance_samples - self._padding_samples) // SAMPLES_PER_FRAME
        out = []
        for offset, frame in enumerate(frames):
            out.append(
                FeatureFrame(
                    index=self._frame_base + frame,
                    utterance=self._utterance,
                    utterance_frame=frame,
                    features=features[offset],
                    rms_dbfs=float(self._rms[frame]),
                    speech_weight=float(weights[frame]),
                    padded=self._final_frames is not None and frame >= padded_from,
                )
            )
        self._next_frame = end
        self._release_audio()
        return out

    # --- internals ---------------------------------------------------------------------------

    def _ready_count(self) -> int:
        if self._final_frames is not None:
            return self._final_frames
        return ready_frame_count(self._utterance_samples)

    def _append(self, array: np.ndarray) -> None:
        if len(array) == 0:
            return
        self._audio = np.concatenate([self._audio, array])
        self._utterance_samples += len(array)
        whole_frames = self._utterance_samples // SAMPLES_PER_FRAME
        if whole_frames > len(self._rms):
            start = len(self._rms) * SAMPLES_PER_FRAME - self._audio_base
            self._rms = np.concatenate(
                [
                    self._rms,
                    frame_rms_dbfs(self._audio[start : whole_frames * SAMPLES_PER_FRAME - self._audio_base]),
                ]
            )

    def _release_audio(self) -> None:
        """Forget audio of 30 s segments no frame still needs (their hidden states are cached or stale)."""
        first_needed = max(0, first_position(self._next_frame)) // SEGMENT_POSITIONS * SEGMENT_SAMPLES
        if first_needed > self._audio_base:
            self._audio = self._audio[first_needed - self._audio_base :]
            self._audio_base = first_needed

    def _start_utterance(self) -> None:
        self._frame_base += self._next_frame
        self._utterance += 1
        self._clear_utterance()

    def _clear_utterance(self) -> None:
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_base = 0
        self._utterance_samples = 0
        self._rms = np.zeros(0, dtype=np.float32)
        self._next_frame = 0
        self._final_frames = None
        self._padding_samples = 0
        self._featurizer.reset()


def lookahead_frames() -> int:
    """Frames of audio past a frame's end the stream waits for before that frame is ready."""
    return CONTEXT_FRAMES
