"""The audio/video clock contract and MuseTalk v1.5's audio-window index arithmetic.

Audio is 16 kHz mono float32; video is 25 fps, so one video frame is 640 samples. whisper-tiny
emits one hidden state every 20 ms (50 Hz, 320 samples), two per video frame. For frame `i`
MuseTalk v1.5 takes the 10 positions `2i-4 … 2i+5` (±2 frames of context; positions outside the
audio are zero vectors), 5 hidden states each, flattened position-major to `[50, 384]`
(upstream `AudioProcessor.get_whisper_chunk`: `rearrange('b c h w -> b (c h) w')`).

So frame `i` needs audio up to sample `(i + 3) * 640`: an 80 ms lookahead past its own end.
Upstream encodes audio in 30 s segments, each padded to 30 s by the feature extractor, and
concatenates their hidden states; `offline_windows` reproduces that indexing exactly.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE_HZ = 16_000
VIDEO_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ // VIDEO_FPS  # 640
WHISPER_RATE_HZ = 50
SAMPLES_PER_POSITION = SAMPLE_RATE_HZ // WHISPER_RATE_HZ  # 320
POSITIONS_PER_FRAME = WHISPER_RATE_HZ // VIDEO_FPS  # 2
CONTEXT_FRAMES = 2  # MuseTalk's audio_padding_length_left / _right
WINDOW_POSITIONS = POSITIONS_PER_FRAME * (2 * CONTEXT_FRAMES + 1)  # 10
HIDDEN_LAYERS = 5
FEATURE_DIM = 384
WINDOW_ROWS = WINDOW_POSITIONS * HIDDEN_LAYERS  # 50
SEGMENT_SECONDS = 30
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE_HZ
SEGMENT_POSITIONS = SEGMENT_SECONDS * WHISPER_RATE_HZ  # 1500
LOOKAHEAD_SAMPLES = CONTEXT_FRAMES * SAMPLES_PER_FRAME  # 1280 = 80 ms


def offline_frame_count(n_samples: int) -> int:
    """Upstream's `num_frames = floor(len / sr * fps)` (float arithmetic kept as upstream has it)."""
    return math.floor((n_samples / SAMPLE_RATE_HZ) * VIDEO_FPS)


def offline_position_count(n_samples: int) -> int:
    """Upstream's `actual_length = floor(len / sr * 50)`: hidden states past this are dropped."""
    return math.floor((n_samples / SAMPLE_RATE_HZ) * WHISPER_RATE_HZ)


def first_position(frame_index: int) -> int:
    """Whisper position of row 0 of frame `frame_index`'s window (may be negative: zero context)."""
    # Upstream pads 2 frames x 2 positions of zeros on the left, then slices at floor(i * 2).
    return math.floor(frame_index * (WHISPER_RATE_HZ / VIDEO_FPS)) - CONTEXT_FRAMES * POSITIONS_PER_FRAME


def samples_needed(frame_index: int) -> int:
    """Samples of audio (from the utterance start) frame `frame_index` needs before it is ready."""
    return (frame_index + 1 + CONTEXT_FRAMES) * SAMPLES_PER_FRAME


def ready_frame_count(n_samples: int) -> int:
    """How many frames have their right context within `n_samples` samples."""
    return max(0, n_samples // SAMPLES_PER_FRAME - CONTEXT_FRAMES)


def gather_windows(hidden: np.ndarray, frame_indices: range | list[int], valid_positions: int) -> np.ndarray:
    """Windows `[len(frames), 50, 384]` from hidden states `[P, 5, 384]` (positions from the utterance start).

    Positions < 0 or >= `valid_positions` read as zero vectors, as upstream's zero padding does.
    """
    frames = list(frame_indices)
    out = np.zeros((len(frames), WINDOW_POSITIONS, hidden.shape[1], hidden.shape[2]), dtype=hidden.dtype)
    limit = min(valid_positions, hidden.shape[0])
    for row, frame in enumerate(frames):
        start = first_position(frame)
        lo, hi = max(start, 0), min(start + WINDOW_POSITIONS, limit)
        if hi > lo:
            out[row, lo - start : hi - start] = hidden[lo:hi]
    return out.reshape(len(frames), WINDOW_POSITIONS * hidden.shape[1], hidden.shape[2])


def gather_index(frame_indices: range | list[int], valid_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Index form of `gather_windows` for tensors: (positions `[F,10]` clipped to >= 0, valid mask
    `[F,10]`)."""
    frames = np.asarray(list(frame_indices), dtype=np.int64)
    starts = (
        np.floor(frames * (WHISPER_RATE_HZ / VIDEO_FPS)).astype(np.int64)
        - CONTEXT_FRAMES * POSITIONS_PER_FRAME
    )
    positions = starts[:, None] + np.arange(WINDOW_POSITIONS)[None, :]
    valid = (positions >= 0) & (positions < valid_positions)
    return np.where(valid, positions, 0), valid


def offline_windows(hidden: np.ndarray, n_samples: int) -> np.ndarray:
    """MuseTalk v1.5's whole-clip windows: `hidden` `[P, 5, 384]` (segments concatenated) -> `[F, 50,
    384]`."""
    return gather_windows(hidden, range(offline_frame_count(n_samples)), offline_position_count(n_samples))


def positional_encoding(seq_len: int = WINDOW_ROWS, d_model: int = FEATURE_DIM) -> np.ndarray:
    """MuseTalk's `PositionalEncoding(d_model=384)` table for the first `seq_len` rows, float32 `[seq_len,
    d_model]`.

    Upstream adds it to every `[50, 384]` window right before the UNet (`pe(whisper_batch)` in
    `scripts/inference.py` / `realtime_inference.py`): sin on even, cos on odd channels.
    """
    position = np.arange(seq_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / d_model))
    table = np.zeros((seq_len, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)
    return table
