"""What a client may send: PCM encodings, sample rates, channel counts, and the rates we convert to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from realtime.ingest.errors import IngestError, IngestErrorCode

# The engine's timeline: whisper features are computed on 16 kHz mono audio.
TIMELINE_SAMPLE_RATE_HZ = 16_000
# What publishers send (WebRTC Opus and AAC both run at 48 kHz).
PLAYOUT_SAMPLE_RATE_HZ = 48_000
FRAME_RATE_FPS = 25
TIMELINE_SAMPLES_PER_FRAME = TIMELINE_SAMPLE_RATE_HZ // FRAME_RATE_FPS  # 640
PLAYOUT_SAMPLES_PER_FRAME = PLAYOUT_SAMPLE_RATE_HZ // FRAME_RATE_FPS  # 1920

# One binary message at most (s16le 16 kHz mono: 32 s); larger messages are refused, not split.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# No audio this long ends an open utterance (an implicit end_of_utterance).
DEFAULT_UTTERANCE_GAP_MS = 500

MIN_SAMPLE_RATE_HZ = 8_000
MAX_SAMPLE_RATE_HZ = 192_000
MAX_CHANNELS = 8


class PcmEncoding(StrEnum):
    S16LE = "s16le"
    F32LE = "f32le"


# Spellings other tools use for the same thing (ffmpeg's pcm_*, numpy dtype names).
_ENCODING_ALIASES = {
    "s16le": PcmEncoding.S16LE,
    "pcm_s16le": PcmEncoding.S16LE,
    "int16": PcmEncoding.S16LE,
    "f32le": PcmEncoding.F32LE,
    "pcm_f32le": PcmEncoding.F32LE,
    "float32": PcmEncoding.F32LE,
}
_BYTES_PER_SAMPLE = {PcmEncoding.S16LE: 2, PcmEncoding.F32LE: 4}

# Config keys and their accepted spellings (the first is the documented one).
_KEY_SAMPLE_RATE = ("sample_rate", "sample_rate_hz")
_KEY_ENCODING = ("encoding",)
_KEY_CHANNELS = ("channels", "num_channels")
_ALLOWED_KEYS = {*_KEY_SAMPLE_RATE, *_KEY_ENCODING, *_KEY_CHANNELS}


@dataclass(frozen=True)
class PcmFormat:
    """The format of the client's binary messages. Default: s16le, mono, 16 000 Hz."""

    sample_rate_hz: int = TIMELINE_SAMPLE_RATE_HZ
    encoding: PcmEncoding = PcmEncoding.S16LE
    channels: int = 1

    @property
    def bytes_per_sample(self) -> int:
        return _BYTES_PER_SAMPLE[self.encoding]

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (one sample of every channel)."""
        return self.bytes_per_sample * self.channels

    def to_timeline_samples(self, source_samples: int) -> int:
        """How many 16 kHz timeline samples `source_samples` (per channel) amount to."""
        return round(source_samples * TIMELINE_SAMPLE_RATE_HZ / self.sample_rate_hz)

    def as_dict(self) -> dict[str, object]:
        return {"sample_rate": self.sample_rate_hz, "encoding": str(self.encoding), "channels": self.channels}

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, base: PcmFormat | None = None) -> PcmFormat:
        """Build a format from config keys (a JSON config message or WS query parameters).

        Missing keys keep `base`'s value (default: s16le mono 16 kHz). Strings are accepted
        for numbers because query parameters are strings. Raises a fatal IngestError.
        """
        base = base or cls()
        unknown = sorted(set(values) - _ALLOWED_KEYS)
        if unknown:
            listed = ", ".join(unknown)
            raise _bad_config(f"unknown config key(s) {listed}; allowed: sample_rate, encoding, channels")
        sample_rate_hz = base.sample_rate_hz
        if (raw := _first(values, _KEY_SAMPLE_RATE)) is not None:
            sample_rate_hz = _positive_int(raw, "sample_rate")
            if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
                allowed = f"{MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz"
                raise _bad_config(f"sample_rate {sample_rate_hz} Hz is outside {allowed}")
        channels = base.channels
        if (raw := _first(values, _KEY_CHANNELS)) is not None:
            channels = _positive_int(raw, "channels")
            if channels > MAX_CHANNELS:
                raise _bad_config(f"channels {channels} is more than {MAX_CHANNELS}")
        encoding = base.encoding
        if (raw := _first(values, _KEY_ENCODING)) is not None:
            if not isinstance(raw, str) or raw.strip().lower() not in _ENCODING_ALIASES:
                raise IngestError(
                    IngestErrorCode.UNKNOWN_ENCODING,
                    f"unknown encoding {raw!r}; supported: s16le (signed 16-bit little-endian) "
                    "and f32le (32-bit float little-endian, values in [-1, 1])",
                    fatal=True,
                )
            encoding = _ENCODING_ALIASES[raw.strip().lower()]
        return cls(sample_rate_hz=sample_rate_hz, encoding=encoding, channels=channels)


def _first(values: Mapping[str, object], keys: tuple[str, ...]) -> object | None:
    present = [key for key in keys if key in values]
    if len(present) > 1:
        raise _bad_config(f"config gives both {present[0]} and {present[1]}; use {keys[0]}")
    return values[present[0]] if present else None


def _positive_int(raw: object, name: str) -> int:
    if isinstance(raw, bool):
        raise _bad_config(f"{name} must be a positive integer, not {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        # ASCII only: str.isdigit() is also true for "²" and other digits int() refuses (a ValueError here
        # would escape as a crash instead of a bad_config error the client can act on).
        value = int(raw.strip())
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    else:
        raise _bad_config(f"{name} must be a positive integer, not {raw!r}")
    if value <= 0:
        raise _bad_config(f"{name} must be a positive integer, not {value}")
    return value


def _bad_config(message: str) -> IngestError:
    return IngestError(IngestErrorCode.BAD_CONFIG, message, fatal=True)
