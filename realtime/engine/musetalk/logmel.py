"""Whisper's log-mel input computed where the encoder runs, from the segments' real samples only.

`WhisperFeatureExtractor` pads every segment to 30 s on the host, uploads the padded batch,
computes the spectrogram on the device and hands it back as a host array — which the encoder
then uploads again. For the render lane's batched encode (one growing segment per speaking
session, most of each segment still silence) that round trip cost more than the encoder. Here
only the samples travel (one upload for the whole batch), the zero padding is made on the
device, and the result stays there.

The arithmetic is the extractor's (its own parameters and mel filters are used): centred
reflect-padded STFT with a periodic Hann window, power spectrum without the last frame,
mel projection, log10 clamped at 1e-10, floored at 8 below each segment's maximum, then
`(x + 4) / 4`. `tests/realtime/engine/test_features.py` checks it against the extractor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.device import host_staging, upload

if TYPE_CHECKING:
    import torch

LOG_FLOOR_BELOW_MAX = 8.0  # log10 units below the segment's loudest bin that are kept


class DeviceLogMel:
    def __init__(self, extractor: Any, device: torch.device) -> None:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        self.n_fft = int(extractor.n_fft)
        self.hop_length = int(extractor.hop_length)
        self.n_samples = int(extractor.n_samples)  # 30 s: every segment is zero-padded to this
        self.dither = float(getattr(extractor, "dither", 0.0) or 0.0)
        self._device = device
        self._window = torch.hann_window(self.n_fft, device=device)
        # [n_freqs, n_mels] in the extractor; stored transposed for `filters @ power`.
        self._filters = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32).T.copy()).to(
            device
        )

    def __call__(self, segments: Sequence[np.ndarray]) -> torch.Tensor:
        """`[len(segments), n_mels, frames]` float32 on the device; each segment holds at most 30 s of 16
        kHz audio."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        lengths = [min(len(segment), self.n_samples) for segment in segments]
        # Gathered straight into the (pinned) upload buffer: at 24 streams that is ~46 MB per batch, copied
        # once.
        flat = host_staging(sum(lengths), torch.float32, self._device)
        np.concatenate(
            [np.asarray(s[:n], dtype=np.float32) for s, n in zip(segments, lengths, strict=True)],
            out=flat.numpy(),
        )
        samples = upload(flat, self._device)  # one upload: the real samples only
        audio = torch.zeros((len(segments), self.n_samples), dtype=torch.float32, device=self._device)
        offset = 0
        for row, length in enumerate(lengths):
            if length:
                audio[row, :length] = samples[offset : offset + length]
            offset += length
        if self.dither:
            audio += self.dither * torch.randn_like(audio)
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self._filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - LOG_FLOOR_BELOW_MAX)
        return (log_spec + 4.0) / 4.0
