"""whisper-tiny hidden states → MuseTalk v1.5 `[50, 384]` frame windows, offline and streaming.

Both paths encode audio exactly as upstream does — 30 s segments from the utterance start,
each padded to 30 s with `WhisperFeatureExtractor`'s log-mel (computed on the encoder's device:
`realtime.engine.musetalk.logmel`), all 5 hidden states of the encoder stacked
— and index them with `framing.gather_index`. The streaming path re-encodes the segment that
is still growing whenever new frames become ready (a finished segment is encoded once), so a
frame's window differs from the offline one only by what the encoder's attention sees of audio
that had not arrived yet.

Windows stay on the engine's device in the model dtype; `positional_encoding` is added by
`add_positional_encoding`, right before the UNet, as upstream does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.accel import BucketGraphs, bucket_for
from realtime.engine.audio.framing import (
    FEATURE_DIM,
    HIDDEN_LAYERS,
    POSITIONS_PER_FRAME,
    SEGMENT_POSITIONS,
    SEGMENT_SAMPLES,
    WINDOW_POSITIONS,
    first_position,
    gather_index,
    offline_frame_count,
    offline_position_count,
    positional_encoding,
)
from realtime.engine.musetalk.logmel import DeviceLogMel

if TYPE_CHECKING:
    import torch

    from realtime.engine.musetalk.weights.loader import MuseTalkModels


class WhisperWindows:
    """Encodes audio segments and gathers per-frame windows on the models' device."""

    def __init__(
        self, models: MuseTalkModels, *, cuda_graph: bool = False, buckets: tuple[int, ...] = (1,)
    ) -> None:
        """`cuda_graph`: replay captured graphs (CUDA only) for encodes of up to `buckets[-1]` segments,
        padded to a bucket: the streaming path encodes one segment per stream, or one batch for many
        streams."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        self._encoder = models.whisper_encoder
        self._device = models.device.torch_device()
        self._log_mel = DeviceLogMel(models.feature_extractor, self._device)
        self._dtype = models.device.torch_dtype()
        self._pe = torch.from_numpy(positional_encoding()).to(self._device, self._dtype)
        self._graph: Any = None  # BucketGraphs, built on first use
        self._window_grid: dict[int, torch.Tensor] = {}  # frame count -> [F, 10] relative positions (device)
        self._use_graph = cuda_graph and self._device.type == "cuda"
        self._buckets = buckets

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        output = self._encoder(features, output_hidden_states=True)
        return torch.stack(output.hidden_states, dim=2)

    def warm_up(self, max_segments: int = 1) -> None:
        """Capture the graphs of the buckets up to `max_segments` now (encodes of silence)."""
        for bucket in self._buckets:
            if bucket <= max_segments:
                self.encode_segments([np.zeros(SEGMENT_SAMPLES // 10, dtype=np.float32)] * bucket)

    def encode_segments(self, segments: list[np.ndarray]) -> torch.Tensor:
        """Hidden states `[len(segments), 1500, 5, 384]` of up-to-30 s segments (batched in one encoder
        call)."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        with torch.inference_mode():
            count = len(segments)
            if self._use_graph and count <= self._buckets[-1]:
                if self._graph is None:
                    self._graph = BucketGraphs(self._encode, self._device, torch.cuda.graph_pool_handle())
                # Padded with empty segments to the bucket: the STFT too sees only bucket shapes (FFT plans
                # are made per batch size, in warm-up rather than on a session's first batch of that size).
                bucket = bucket_for(count, self._buckets)
                padded = [*segments, *[np.zeros(0, dtype=np.float32)] * (bucket - count)]
                features = self._log_mel(padded).to(self._dtype)
                # A copy: the graph's output buffer is overwritten by the next encode, the callers cache
                # these.
                return self._graph.run(features)[:count].clone()
            return self._encode(self._log_mel(segments).to(self._dtype))

    def offline_hidden(self, audio: np.ndarray) -> torch.Tensor:
        """Upstream's whole-clip hidden states `[P, 5, 384]`: 30 s segments concatenated."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        segments = [audio[i : i + SEGMENT_SAMPLES] for i in range(0, max(len(audio), 1), SEGMENT_SAMPLES)]
        hidden = self.encode_segments(segments)
        return torch.cat(list(hidden), dim=0)

    def offline_windows(self, audio: np.ndarray) -> torch.Tensor:
        """MuseTalk v1.5's windows for a whole clip, `[F, 50, 384]`, F = floor(len/16000*25); no positional
        encoding."""
        hidden = self.offline_hidden(audio)
        return self.gather(
            hidden, range(offline_frame_count(len(audio))), offline_position_count(len(audio)), 0
        )

    def gather(
        self, hidden: torch.Tensor, frames: range, valid_positions: int, hidden_offset: int
    ) -> torch.Tensor:
        """Windows `[len(frames), 50, 384]` from `hidden` whose row 0 is whisper position `hidden_offset`.

        The index is built on the device from the range's start (`framing.gather_index` arithmetic): a pull
        uploads nothing, so it never waits for the lane's queued device work.
        """
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if frames.step != 1:
            raise ValueError(f"frames must be a contiguous range, got {frames!r}")
        grid = self._window_grid.get(len(frames))
        if (
            grid is None
        ):  # [F, 10]: position of window row k of the range's frame r, relative to its first frame
            rows = torch.arange(len(frames), device=hidden.device) * POSITIONS_PER_FRAME
            grid = rows[:, None] + torch.arange(WINDOW_POSITIONS, device=hidden.device)[None, :]
            self._window_grid[len(frames)] = grid
        positions = grid + (first_position(frames.start) if len(frames) else 0)
        valid = (positions >= 0) & (positions < valid_positions)
        local = (torch.where(valid, positions, 0) - hidden_offset).clamp_(0, hidden.shape[0] - 1)
        windows = hidden[local] * valid.to(hidden.dtype)[..., None, None]  # [F, 10, 5, 384]
        return windows.reshape(len(frames), WINDOW_POSITIONS * HIDDEN_LAYERS, FEATURE_DIM)

    def add_positional_encoding(self, windows: torch.Tensor) -> torch.Tensor:
        return windows.to(self._device, self._dtype) + self._pe


class WhisperStreamFeaturizer:
    """Per-stream featurizer: caches finished segments, re-encodes the growing one on demand."""

    def __init__(self, windows: WhisperWindows) -> None:
        self._windows = windows
        self._segments: dict[int, tuple[int, Any]] = {}  # index -> (samples encoded, hidden [1500,5,384])

    def reset(self) -> None:
        self._segments.clear()

    def encode_plan(
        self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int
    ) -> list[Any]:
        """The `(featurizer, segment index, segment audio)` encodes that `features(...)` with the same
        arguments would run; encode them together (`WhisperWindows.encode_segments`) and `store` the
        results so many streams' features cost one batched encoder call instead of one call each."""
        if len(frames) == 0:
            return []
        positions, _ = gather_index(frames, valid_positions)
        first_segment = int(positions.min()) // SEGMENT_POSITIONS
        last_segment = min(int(positions.max()), max(valid_positions - 1, 0)) // SEGMENT_POSITIONS
        plan = []
        for k in range(first_segment, last_segment + 1):
            cached = self._segments.get(k)
            start = k * SEGMENT_SAMPLES - audio_base
            if (cached is not None and cached[0] == SEGMENT_SAMPLES) or start < 0:
                continue
            segment_audio = audio[start : start + SEGMENT_SAMPLES]
            if cached is None or cached[0] != len(segment_audio):
                plan.append((self, k, segment_audio))
        return plan

    def store(self, segment: int, samples: int, hidden: Any) -> None:
        """Cache the hidden states `[1500, 5, 384]` of segment `segment` encoded from its first `samples`."""
        self._segments[segment] = (samples, hidden)

    def features(self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int) -> list[Any]:
        """Per-frame windows (positional encoding applied) for `frames` of an utterance.

        `audio` holds the utterance's samples from `audio_base` on (a multiple of 30 s: earlier
        segments are finished and cached, or no longer needed).
        """
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if len(frames) == 0:
            return []
        positions, _ = gather_index(frames, valid_positions)
        first_segment = int(positions.min()) // SEGMENT_POSITIONS
        last_segment = min(int(positions.max()), max(valid_positions - 1, 0)) // SEGMENT_POSITIONS
        stale = [k for k in self._segments if k < first_segment]
        for k in stale:
            del self._segments[k]
        hidden_parts = []
        for k in range(first_segment, last_segment + 1):
            cached = self._segments.get(k)
            if cached is not None and cached[0] == SEGMENT_SAMPLES:
                hidden_parts.append(cached[1])
                continue
            start = k * SEGMENT_SAMPLES - audio_base
            if start < 0:
                raise RuntimeError(f"segment {k} is needed again but its audio was already released")
            segment_audio = audio[start : start + SEGMENT_SAMPLES]
            if cached is None or cached[0] != len(segment_audio):
                cached = (len(segment_audio), self._windows.encode_segments([segment_audio])[0])
                self._segments[k] = cached
            hidden_parts.append(cached[1])
        hidden = torch.cat(hidden_parts, dim=0) if len(hidden_parts) > 1 else hidden_parts[0]
        windows = self._windows.gather(hidden, frames, valid_positions, first_segment * SEGMENT_POSITIONS)
        return list(self._windows.add_positional_encoding(windows))
