"""Per-frame audio level and the speech gate that decides when the engine runs at all.

In silence the avatar shows its idle frame (engine bypassed); at speech edges the engine's
mouth is crossfaded in and out. The gate is a pure function of per-frame RMS so the streaming
and offline paths agree exactly:

* a frame is *active* when its RMS is above `threshold_dbfs`;
* it is *speaking* when any of the last `hangover_frames` frames (itself included) is active,
  which bridges the short pauses between words;
* its weight is a triangular dilation of *speaking*: 1 inside speech, ramping linearly over
  `attack_frames` before an onset (the 80 ms lookahead already holds those frames) and over
  `release_frames` after the hangover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realtime.engine.audio.framing import CONTEXT_FRAMES, SAMPLES_PER_FRAME

SILENCE_DBFS = -120.0


@dataclass(frozen=True)
class SpeechGateConfig:
    threshold_dbfs: float = -45.0
    hangover_frames: int = 4  # 160 ms: pauses between words stay "speaking"
    attack_frames: int = CONTEXT_FRAMES  # ramp-in uses only frames the lookahead has already seen
    release_frames: int = 3


def frame_rms_dbfs(samples: np.ndarray) -> np.ndarray:
    """RMS level in dBFS of each whole 640-sample frame of `samples` (a trailing partial frame is ignored)."""
    n = len(samples) // SAMPLES_PER_FRAME
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    frames = samples[: n * SAMPLES_PER_FRAME].astype(np.float32, copy=False).reshape(n, SAMPLES_PER_FRAME)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return np.maximum(20.0 * np.log10(np.maximum(rms, 1e-12)), SILENCE_DBFS).astype(np.float32)


def speaking_flags(rms_dbfs: np.ndarray, config: SpeechGateConfig) -> np.ndarray:
    active = rms_dbfs > config.threshold_dbfs
    speaking = np.zeros_like(active)
    for lag in range(max(1, config.hangover_frames)):
        speaking[lag:] |= active[: len(active) - lag] if lag else active
    return speaking


def speech_weights(rms_dbfs: np.ndarray, config: SpeechGateConfig) -> np.ndarray:
    """Crossfade weight in [0, 1] per frame (0: idle frame shown, engine bypassed; 1: engine's mouth).

    Weight `i` depends on frames up to `i + attack_frames` only, so a stream can finalise it as
    soon as frame `i` is ready.
    """
    speaking = speaking_flags(rms_dbfs, config).astype(np.float32)
    n = len(speaking)
    weights = speaking.copy()
    for distance in range(1, config.attack_frames + 1):  # onsets ahead of frame i
        ramp = 1.0 - distance / (config.attack_frames + 1)
        weights[: n - distance] = np.maximum(weights[: n - distance], speaking[distance:] * ramp)
    for distance in range(1, config.release_frames + 1):  # speech behind frame i
        ramp = 1.0 - distance / (config.release_frames + 1)
        weights[distance:] = np.maximum(weights[distance:], speaking[: n - distance] * ramp)
    return weights
