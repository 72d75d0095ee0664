"""Random-weight MuseTalk checkpoints: tiny ones for tests, full-size ones for benchmarks.

`write_checkpoint(dir, "tiny")` writes the upstream layout and file formats (torch pickles of
state dicts, diffusers/transformers JSON configs), so tests load it through the exact code
that loads real weights. The tiny UNet and VAE keep every contract the engine relies on
(8→4 channels, cross-attention 384, 8x VAE downsampling so 256 px ↔ 32×32 latents); the
whisper encoder is whisper-tiny's real architecture (5 hidden states × 384) with random weights.

`random_models(...)` builds the same models in memory (no files) on a device, for benchmarks
of the full-size architecture.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from realtime.engine.device import DeviceChoice
from realtime.engine.musetalk.weights.layout import ModelLayout
from realtime.engine.musetalk.weights.loader import MuseTalkModels

if TYPE_CHECKING:
    import torch

Size = Literal["tiny", "full"]

# musetalkV15/musetalk.json as published upstream (after the April 2025 fix).
UNET_V15_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **UNET_V15_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# stabilityai/sd-vae-ft-mse config.json.
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Four blocks keep the 8x downsampling (256 px -> 32x32 latents) at a fraction of the cost.
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}

# openai/whisper-tiny config (the fields that shape the model).
WHISPER_TINY_CONFIG: dict[str, Any] = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
    "activation_function": "gelu",
    "scale_embedding": False,
}

WHISPER_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 80,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
}


def configs(size: Size) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UNet config, VAE config) for `size`; whisper is whisper-tiny in both."""
    if size == "tiny":
        return copy.deepcopy(TINY_UNET_CONFIG), copy.deepcopy(TINY_VAE_CONFIG)
    return copy.deepcopy(UNET_V15_CONFIG), copy.deepcopy(SD_VAE_CONFIG)


def _seeded(seed: int) -> None:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    torch.manual_seed(seed)


def _content_sensitive_whisper(encoder: torch.nn.Module) -> None:
    """Re-initialise linear/conv layers with torch's defaults.

    transformers initialises whisper with N(0, 0.02): with such small weights the hidden states
    are dominated by the positional embedding and barely depend on the audio. torch's default
    (Kaiming-uniform) init makes random features audio-dependent, which keeps tests that compare
    features meaningful.
    """
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    for module in encoder.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv1d):
            module.reset_parameters()


def build_modules(size: Size, seed: int = 0) -> tuple[Any, Any, Any]:
    """(UNet, VAE, WhisperEncoder) with random weights, on the current default device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from transformers import WhisperConfig  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    unet_config, vae_config = configs(size)
    _seeded(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config(vae_config)
    encoder = WhisperEncoder(WhisperConfig(**WHISPER_TINY_CONFIG))
    _content_sensitive_whisper(encoder)
    return unet, vae, encoder


def write_checkpoint(model_dir: Path, size: Size = "tiny", seed: int = 0) -> ModelLayout:
    """Write a random checkpoint in MuseTalk's upstream layout and formats; returns its layout."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    layout = ModelLayout(Path(model_dir))
    unet_config, vae_config = configs(size)
    unet, vae, encoder = build_modules(size, seed)
    for directory in (layout.unet_config.parent, layout.vae_dir, layout.whisper_dir):
        directory.mkdir(parents=True, exist_ok=True)
    layout.unet_config.write_text(json.dumps(unet_config, indent=2) + "\n", encoding="utf-8")
    torch.save(unet.state_dict(), layout.unet_weights)
    layout.vae_config.write_text(json.dumps(vae_config, indent=2) + "\n", encoding="utf-8")
    torch.save(vae.state_dict(), layout.vae_dir / "diffusion_pytorch_model.bin")
    layout.whisper_config.write_text(json.dumps(WHISPER_TINY_CONFIG, indent=2) + "\n", encoding="utf-8")
    layout.whisper_preprocessor.write_text(
        json.dumps(WHISPER_PREPROCESSOR_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    # Upstream's file is WhisperForConditionalGeneration's state dict (model.encoder.*, model.decoder.*);
    # only the encoder is written here because only the encoder is ever loaded.
    torch.save(
        {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()},
        layout.whisper_dir / "pytorch_model.bin",
    )
    return layout


def random_models(size: Size, device: DeviceChoice, seed: int = 0) -> MuseTalkModels:
    """The models of `size` with random weights, built directly on `device` (no files)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from transformers import WhisperFeatureExtractor  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    started = time.perf_counter()
    with torch.device(device.torch_device()):
        unet, vae, encoder = build_modules(size, seed)
    for module in (unet, vae, encoder):
        module.to(dtype=device.torch_dtype())
        module.eval()
        module.requires_grad_(False)
    extractor = WhisperFeatureExtractor(
        **{k: v for k, v in WHISPER_PREPROCESSOR_CONFIG.items() if k != "feature_extractor_type"}
    )
    return MuseTalkModels(
        unet=unet,
        vae=vae,
        whisper_encoder=encoder,
        feature_extractor=extractor,
        vae_scaling_factor=float(vae.config.scaling_factor),
        device=device,
        vae_fingerprint=hashlib.sha256(f"random-{size}-{seed}".encode()).hexdigest(),
        load_ms=(time.perf_counter() - started) * 1000,
    )
