"""Reading audio files and converting PCM to the engine's 16 kHz mono float32 (PyAV + soxr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from realtime.engine.audio.framing import SAMPLE_RATE_HZ
from realtime.engine.errors import AudioInvalid


def to_engine_rate(samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """Mono float32 at 16 kHz from mono float samples at `sample_rate_hz` (soxr, high quality)."""
    if sample_rate_hz <= 0:
        raise AudioInvalid(f"sample rate must be positive, got {sample_rate_hz}")
    mono = np.asarray(samples, dtype=np.float32)
    if mono.ndim != 1:
        raise AudioInvalid(f"expected mono samples, got shape {mono.shape}")
    if sample_rate_hz == SAMPLE_RATE_HZ:
        return mono
    import soxr  # noqa: PLC0415 (heavy native library: loaded on first use)

    return np.asarray(soxr.resample(mono, sample_rate_hz, SAMPLE_RATE_HZ, quality="HQ"), dtype=np.float32)


def from_engine_rate(samples: np.ndarray, target_rate_hz: int) -> np.ndarray:
    """16 kHz mono float32 resampled to `target_rate_hz` (e.g. 48 kHz for AAC/WebRTC)."""
    mono = np.asarray(samples, dtype=np.float32)
    if target_rate_hz == SAMPLE_RATE_HZ:
        return mono
    import soxr  # noqa: PLC0415 (heavy native library: loaded on first use)

    return np.asarray(soxr.resample(mono, SAMPLE_RATE_HZ, target_rate_hz, quality="HQ"), dtype=np.float32)


def load_audio_file(path: Path) -> np.ndarray:
    """Decode any audio file PyAV can read to 16 kHz mono float32 (channels averaged)."""
    import av  # noqa: PLC0415 (heavy native library: loaded on first use)

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioInvalid(f"cannot open audio {path}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise AudioInvalid(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or 0
        chunks = []
        try:
            for frame in container.decode(stream):
                data = frame.to_ndarray().astype(np.float32)
                if frame.format.name in ("s16", "s16p"):
                    data /= 32768.0
                elif frame.format.name in ("s32", "s32p"):
                    data /= 2147483648.0
                elif frame.format.name in ("u8", "u8p"):
                    data = (data - 128.0) / 128.0
                if frame.format.is_planar:
                    mono = data.mean(axis=0)
                else:  # interleaved: one row of channels * samples
                    mono = data.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                chunks.append(mono)
        except av.error.FFmpegError as exc:
            raise AudioInvalid(f"cannot decode audio {path}: {exc}") from exc
    if not chunks:
        raise AudioInvalid(f"{path} holds no audio samples")
    return to_engine_rate(np.concatenate(chunks), rate)
