"""The UNet's avatar-side input: masked + reference VAE latents of 256² face crops (computed once per
avatar)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def encode_crop_latents(
    vae: Any, scaling_factor: float, device: torch.device, dtype: torch.dtype, crops: np.ndarray
) -> np.ndarray:
    """Masked (lower half black) + reference latents `[B, 8, 32, 32]` float16 of 256² RGB uint8 crops, as
    upstream."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    with torch.inference_mode():
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float() / 255.0
        masked = pixels.clone()
        masked[:, :, pixels.shape[2] // 2 :, :] = 0.0  # upstream's half mask keeps rows [0, 128)
        batch = torch.cat([masked, pixels]) * 2.0 - 1.0  # Normalize(mean 0.5, std 0.5)
        # The posterior mean, not a sample: deterministic latents make the cache reproducible.
        latents = vae.encode(batch.to(dtype)).latent_dist.mean * scaling_factor
        count = crops.shape[0]
        both = torch.cat([latents[:count], latents[count:]], dim=1)
        return both.float().cpu().numpy().astype(np.float16)
