"""One binary message -> mono float32 samples at the client's rate, or a typed error. Nothing is guessed."""

from __future__ import annotations

import numpy as np

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import PcmEncoding, PcmFormat

# Floats in (1, CLIP_LIMIT] are clipped (TTS overshoot); beyond it the scale is wrong (int16-valued floats).
FLOAT_CLIP_LIMIT = 4.0


def decode_pcm(payload: bytes, pcm_format: PcmFormat) -> tuple[np.ndarray, int]:
    """Decode `payload` into mono float32 in [-1, 1]; returns (samples, samples_clipped).

    Multi-channel audio is averaged to mono. Raises IngestError (not fatal) for a byte
    count that is not a whole number of sample frames, NaN/inf, or floats far out of range;
    the error carries the message's sample count as rejected (16 kHz timeline samples).
    """
    frame_bytes = pcm_format.bytes_per_frame
    whole_frames = len(payload) // frame_bytes
    rejected = pcm_format.to_timeline_samples(whole_frames)
    if len(payload) % frame_bytes:
        raise IngestError(
            IngestErrorCode.MISALIGNED_PCM,
            f"binary message of {len(payload)} bytes is not a whole number of {pcm_format.encoding} "
            f"{pcm_format.channels}-channel sample frames ({frame_bytes} bytes each); the message was "
            "rejected. Send whole samples in every message (do not split a sample across messages).",
            rejected_samples=rejected,
        )
    if pcm_format.encoding is PcmEncoding.S16LE:
        interleaved = np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
        clipped = 0
    else:
        interleaved = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        finite = np.isfinite(interleaved)
        if not finite.all():
            bad = int((~finite).sum())
            rejected_what = f"the message ({whole_frames} sample frames) was rejected"
            raise IngestError(
                IngestErrorCode.NON_FINITE_SAMPLES,
                f"f32le message holds {bad} NaN/inf value(s); {rejected_what}",
                rejected_samples=rejected,
            )
        peak = float(np.abs(interleaved).max()) if interleaved.size else 0.0
        if peak > FLOAT_CLIP_LIMIT:
            raise IngestError(
                IngestErrorCode.SAMPLES_OUT_OF_RANGE,
                f"f32le values must lie in [-1, 1]; this message peaks at {peak:.6g} (int16-scaled "
                "floats? divide by 32768, or declare encoding s16le); the message was rejected",
                rejected_samples=rejected,
            )
        out_of_range = np.abs(interleaved) > 1.0
        clipped = int(out_of_range.sum())
        if clipped:
            interleaved = np.clip(interleaved, -1.0, 1.0)
    if pcm_format.channels == 1:
        return interleaved, clipped
    mono = interleaved.reshape(-1, pcm_format.channels).mean(axis=1, dtype=np.float32)
    return mono, clipped
