"""The MuseTalk v1.5 engine: batched UNet (t=0) → VAE decode → paste into the frame.

Per frame the UNet sees `[8, 32, 32]` latents (VAE latents of the 256² crop with its lower half
blacked out, concatenated with the latents of the whole crop) and the frame's `[50, 384]`
whisper window plus positional encoding as cross-attention context; its `[4, 32, 32]` output,
divided by the VAE scaling factor, decodes to the new 256² face. One `render` call may mix
requests of many sessions and avatars; everything stays on the engine's device until the
blended crop regions are copied out (see `composite`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.api import EngineConfig, EngineInfo, RenderRequest, StageProfile, maybe_stage
from realtime.engine.audio.framing import SAMPLES_PER_FRAME
from realtime.engine.audio.levels import frame_rms_dbfs, speech_weights
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.audio.whisper import WhisperStreamFeaturizer, WhisperWindows
from realtime.engine.avatar.prepare import prepare_avatar
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.composite import Compositor, PasteJob
from realtime.engine.errors import RenderRequestInvalid
from realtime.host import PrepareProgress

if TYPE_CHECKING:
    import torch

    from realtime.engine.weights.loader import MuseTalkModels

logger = logging.getLogger(__name__)

ENGINE_NAME = "musetalk"
ENGINE_VERSION = "musetalk-v15-engine-1"


class MuseTalkEngine:
    def __init__(self, models: MuseTalkModels, config: EngineConfig, model_dir: Path | None = None) -> None:
        import torch

        self._models = models
        self._config = config
        self._device = models.device.torch_device()
        self._dtype = models.device.torch_dtype()
        self._windows = WhisperWindows(models)
        self._compositor = Compositor(self._device)
        self._latents: dict[str, torch.Tensor] = {}  # avatar key -> [N, 8, 32, 32] on device
        self._timestep = torch.zeros(1, device=self._device, dtype=torch.long)
        self._info = EngineInfo(
            name=ENGINE_NAME,
            version=ENGINE_VERSION,
            device=models.device.device,
            dtype=models.device.dtype_name,
            model_dir=model_dir,
            detail=f"MuseTalk v1.5 weights from {model_dir}" if model_dir else "MuseTalk v1.5 with random weights",
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def models(self) -> MuseTalkModels:
        return self._models

    # --- avatars -----------------------------------------------------------------------------

    def encode_latents(self, crops: np.ndarray) -> np.ndarray:
        """Masked (lower half black) + reference latents `[B, 8, 32, 32]` of 256² RGB crops, as upstream."""
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(crops)).to(self._device).permute(0, 3, 1, 2).float() / 255.0
            masked = pixels.clone()
            masked[:, :, pixels.shape[2] // 2 :, :] = 0.0  # upstream's half mask keeps rows [0, 128)
            batch = torch.cat([masked, pixels]) * 2.0 - 1.0  # Normalize(mean 0.5, std 0.5)
            # The posterior mean, not a sample: deterministic latents make the cache reproducible.
            latents = self._models.vae.encode(batch.to(self._dtype)).latent_dist.mean * self._models.vae_scaling_factor
            count = crops.shape[0]
            both = torch.cat([latents[:count], latents[count:]], dim=1)
            return both.float().cpu().numpy().astype(np.float16)

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar:
        return prepare_avatar(
            source,
            engine=ENGINE_NAME,
            engine_version=ENGINE_VERSION,
            model_fingerprint=self._models.vae_fingerprint,
            cache_root=self._config.cache_dir,
            encode_latents=self.encode_latents,
            on_progress=on_progress,
            settings=self._config.prepare,
        )

    def forget_avatar(self, avatar: Avatar) -> None:
        """Release the device copies of an avatar no session uses any more."""
        self._latents.pop(avatar.key, None)
        self._compositor.forget(avatar.key)

    def _avatar_latents(self, avatar: Avatar) -> torch.Tensor:
        import torch

        latents = self._latents.get(avatar.key)
        if latents is None:
            if avatar.latents is None:
                raise RenderRequestInvalid(
                    f"avatar {avatar.key} was prepared by the {avatar.engine} engine: no latents"
                )
            latents = torch.from_numpy(np.asarray(avatar.latents)).to(self._device, self._dtype)
            self._latents[avatar.key] = latents
        return latents

    # --- audio -------------------------------------------------------------------------------

    def open_stream(self) -> AudioFeatureStream:
        return AudioFeatureStream(WhisperStreamFeaturizer(self._windows), self._config.gate)

    def offline_windows(self, audio: np.ndarray) -> torch.Tensor:
        """MuseTalk's whole-clip `[F, 50, 384]` windows (before positional encoding), F = floor(len/640)."""
        return self._windows.offline_windows(np.asarray(audio, dtype=np.float32))

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]:
        """Whole-clip features indexed exactly as upstream, with the same speech gate as streams."""
        audio = np.asarray(audio, dtype=np.float32)
        windows = self._windows.add_positional_encoding(self.offline_windows(audio))
        rms = frame_rms_dbfs(audio)
        weights = speech_weights(rms, self._config.gate)
        return [
            FeatureFrame(
                index=i,
                utterance=0,
                utterance_frame=i,
                features=windows[i],
                rms_dbfs=float(rms[i]),
                speech_weight=float(weights[i]),
                padded=(i + 1) * SAMPLES_PER_FRAME > len(audio),
            )
            for i in range(windows.shape[0])
        ]

    # --- rendering ---------------------------------------------------------------------------

    def render(self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None) -> list[np.ndarray]:
        """Composited RGB uint8 frames, one per request, in order (bypassed ones are read-only idle frames)."""
        outputs: list[np.ndarray | None] = [None] * len(requests)
        active: list[tuple[int, int]] = []  # (request index, avatar frame)
        for index, request in enumerate(requests):
            frame = request.avatar.frame_at(request.frame_index)
            if request.speech_weight <= 0.0 or not request.avatar.has_face[frame]:
                outputs[index] = request.avatar.frames[frame]
            else:
                active.append((index, frame))
        chunk = max(1, self._config.max_batch_size)
        for start in range(0, len(active), chunk):
            part = active[start : start + chunk]
            frames = self._render_active([requests[i] for i, _ in part], [f for _, f in part], profile)
            for (index, _), image in zip(part, frames, strict=True):
                outputs[index] = image
        if profile is not None:
            profile.frames += len(requests)
        return [image for image in outputs if image is not None]

    def _render_active(
        self, requests: list[RenderRequest], frames: list[int], profile: StageProfile | None
    ) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            latents = torch.stack([self._avatar_latents(r.avatar)[f] for r, f in zip(requests, frames, strict=True)])
            features = self._stack_features(requests)
            with maybe_stage(profile, "unet"):
                predicted = self._models.unet(latents, self._timestep, encoder_hidden_states=features).sample
            with maybe_stage(profile, "vae_decode"):
                decoded = self._models.vae.decode(predicted / self._models.vae_scaling_factor).sample
                faces = (decoded / 2 + 0.5).clamp(0, 1)
            with maybe_stage(profile, "blend"):
                jobs = [
                    PasteJob(r.avatar, f, row, min(1.0, float(r.speech_weight)))
                    for row, (r, f) in enumerate(zip(requests, frames, strict=True))
                ]
                return self._compositor.paste(faces, jobs)

    def _stack_features(self, requests: list[RenderRequest]) -> torch.Tensor:
        import torch

        rows = []
        for request in requests:
            feature: Any = request.features
            if not isinstance(feature, torch.Tensor) or tuple(feature.shape) != (50, 384):
                raise RenderRequestInvalid(
                    "musetalk render requests need [50, 384] whisper windows from this engine's stream, got "
                    f"{type(feature).__name__} {getattr(feature, 'shape', '')}"
                )
            rows.append(feature)
        return torch.stack(rows).to(self._device, self._dtype)

    def unet_inputs(self, requests: Sequence[RenderRequest]) -> tuple[np.ndarray, np.ndarray]:
        """(UNet input latents [B,8,32,32], UNet output latents [B,4,32,32]) for diagnostics (`--dump`)."""
        import torch

        active = [r for r in requests if r.speech_weight > 0 and r.avatar.has_face[r.avatar.frame_at(r.frame_index)]]
        if not active:
            return np.zeros((0, 8, 32, 32), np.float32), np.zeros((0, 4, 32, 32), np.float32)
        with torch.inference_mode():
            latents = torch.stack([self._avatar_latents(r.avatar)[r.avatar.frame_at(r.frame_index)] for r in active])
            predicted = self._models.unet(latents, self._timestep, encoder_hidden_states=self._stack_features(active))
            return latents.float().cpu().numpy(), predicted.sample.float().cpu().numpy()

    def synchronize(self) -> None:
        import torch

        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run UNet + VAE once per batch size on dummy inputs; returns the ms it took."""
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            for size in batch_sizes:
                latents = torch.zeros((size, 8, 32, 32), device=self._device, dtype=self._dtype)
                features = torch.zeros((size, 50, 384), device=self._device, dtype=self._dtype)
                predicted = self._models.unet(latents, self._timestep, encoder_hidden_states=features).sample
                self._models.vae.decode(predicted / self._models.vae_scaling_factor)
        self.synchronize()
        return (time.perf_counter() - started) * 1000
