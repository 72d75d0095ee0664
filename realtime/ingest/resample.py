"""Streaming conversion of client audio to the 16 kHz timeline and the 48 kHz playout, with soxr.

Both outputs come from the client's own samples (the playout is not an upsampled copy of
the 16 kHz timeline, which would cut everything above 8 kHz). soxr's streaming output is
time-aligned with its input and only holds back a few milliseconds of filter delay until
`flush()`; after a flush each output holds round(n · rate_out / rate_in) samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from realtime.ingest.decoder import decode_pcm
from realtime.ingest.formats import PLAYOUT_SAMPLE_RATE_HZ, TIMELINE_SAMPLE_RATE_HZ, PcmFormat

_EMPTY = np.zeros(0, dtype=np.float32)


class StreamResampler:
    """Mono float32 streaming resampler; a pass-through when the rates are equal."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        self._stream: soxr.ResampleStream | None = None
        if in_rate_hz != out_rate_hz:
            self._stream = soxr.ResampleStream(in_rate_hz, out_rate_hz, 1, dtype="float32")
        self.holding = False  # input was pushed since the last flush

    def push(self, samples: np.ndarray) -> np.ndarray:
        if samples.size == 0:
            return _EMPTY
        if self._stream is None:
            return samples
        self.holding = True
        return np.asarray(self._stream.resample_chunk(samples), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """Emit the held-back tail and get ready for a new, unrelated signal."""
        if self._stream is None or not self.holding:
            return _EMPTY
        tail = np.asarray(self._stream.resample_chunk(_EMPTY, last=True), dtype=np.float32)
        self._stream.clear()
        self.holding = False
        return tail

    def reset(self) -> None:
        """Drop whatever is held (interrupt)."""
        if self._stream is not None:
            self._stream.clear()
        self.holding = False


@dataclass(frozen=True)
class ConvertedAudio:
    timeline: np.ndarray  # 16 kHz mono float32
    playout: np.ndarray  # 48 kHz mono float32
    clipped_samples: int = 0

    @classmethod
    def empty(cls) -> ConvertedAudio:
        return cls(_EMPTY, _EMPTY)


class AudioConverter:
    """Decode + resample one client stream (one format at a time)."""

    def __init__(self, pcm_format: PcmFormat) -> None:
        self.pcm_format = pcm_format
        self._to_timeline = StreamResampler(pcm_format.sample_rate_hz, TIMELINE_SAMPLE_RATE_HZ)
        self._to_playout = StreamResampler(pcm_format.sample_rate_hz, PLAYOUT_SAMPLE_RATE_HZ)
        self.source_samples_accepted = 0  # per channel, at the client's rate
        # Since the last flush/reset: to know how much audio a reset throws away (for accounting).
        self._source_since_flush = 0
        self._timeline_since_flush = 0

    @property
    def holding(self) -> bool:
        """Samples are inside the resamplers (a format change now would cut them)."""
        return self._to_timeline.holding or self._to_playout.holding

    def decode(self, payload: bytes) -> tuple[np.ndarray, int]:
        """Validate + decode one message (raises IngestError; the resamplers are untouched)."""
        return decode_pcm(payload, self.pcm_format)

    def push(self, payload: bytes) -> ConvertedAudio:
        """Decode and convert; raises IngestError for a bad message (nothing of it is kept)."""
        mono, clipped = self.decode(payload)
        return self.convert(mono, clipped)

    def convert(self, mono: np.ndarray, clipped: int = 0) -> ConvertedAudio:
        """Resample decoded mono float32 samples at the client's rate."""
        self.source_samples_accepted += len(mono)
        self._source_since_flush += len(mono)
        timeline = self._to_timeline.push(mono)
        self._timeline_since_flush += len(timeline)
        return ConvertedAudio(timeline, self._to_playout.push(mono), clipped)

    def held_timeline_samples(self) -> int:
        """Timeline samples still inside the resampler (emitted by the next flush)."""
        expected = self.pcm_format.to_timeline_samples(self._source_since_flush)
        return max(0, expected - self._timeline_since_flush)

    def flush(self) -> ConvertedAudio:
        out = ConvertedAudio(self._to_timeline.flush(), self._to_playout.flush())
        self._source_since_flush = 0
        self._timeline_since_flush = 0
        return out

    def reset(self) -> int:
        """Drop what the resamplers hold; returns how many timeline samples that was."""
        held = self.held_timeline_samples()
        self._to_timeline.reset()
        self._to_playout.reset()
        self._source_since_flush = 0
        self._timeline_since_flush = 0
        return held
