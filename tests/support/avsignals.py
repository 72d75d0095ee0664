"""Synthetic A/V with markers at known clock positions, and their detection in decoded media."""

from __future__ import annotations

import numpy as np

FRAME_RATE_FPS = 25
AUDIO_RATE_HZ = 48_000
SAMPLES_PER_FRAME = AUDIO_RATE_HZ // FRAME_RATE_FPS
WIDTH_PX, HEIGHT_PX = 256, 192


def tick(frame_index: int, flash_frames: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Frame `frame_index` and its 40 ms of audio: a white frame + a 1 kHz burst on marker frames."""
    value = 250 if frame_index in flash_frames else 20 + (frame_index % 10)
    frame = np.full((HEIGHT_PX, WIDTH_PX, 3), value, dtype=np.uint8)
    if frame_index in flash_frames:
        t = (frame_index * SAMPLES_PER_FRAME + np.arange(SAMPLES_PER_FRAME)) / AUDIO_RATE_HZ
        audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    else:
        audio = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
    return frame, audio


def flash_times_s(frames: list[tuple[float, float]]) -> list[float]:
    """(time_s, mean brightness) per decoded frame -> times where a flash starts."""
    times = []
    previous = 0.0
    for time_s, brightness in frames:
        if brightness > 128 >= previous:
            times.append(time_s)
        previous = brightness
    return times


def burst_onsets_s(samples: np.ndarray, sample_rate_hz: int, start_s: float) -> list[float]:
    """Times where the audio envelope (10 ms windows) rises above a threshold."""
    window = sample_rate_hz // 100
    n = len(samples) // window
    envelope = np.abs(samples[: n * window]).reshape(n, window).max(axis=1)
    loud = envelope > 0.1
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    # Sub-window precision: the first sample above threshold inside the onset window.
    result: list[float] = []
    for index in onsets:
        block = np.abs(samples[index * window : (index + 1) * window])
        first = int(np.argmax(block > 0.1))
        result.append(start_s + (index * window + first) / sample_rate_hz)
    return result
