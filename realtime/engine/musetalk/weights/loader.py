"""Loading MuseTalk v1.5 from its upstream file layout — the same code for real and tiny weights.

* UNet: `UNet2DConditionModel(**musetalk.json)` + `unet.pth`, strict `load_state_dict`, no key
  remapping (the real file is a diffusers UNet state dict).
* VAE: `AutoencoderKL` built from `sd-vae/config.json`; its weights loaded strictly. The only
  rewrite is diffusers' own rename of pre-0.14 attention keys (`query`→`to_q` …), which the
  upstream `diffusion_pytorch_model.bin` of sd-vae-ft-mse may still use.
* Whisper: only the encoder (`WhisperEncoder`) and the `WhisperFeatureExtractor`; decoder
  weights in the file are skipped, encoder weights must all be present.
* Face parsing (optional): BiSeNet from `face-parse-bisent/` (see `face_parse`) when both of its
  files are there; it makes each avatar's parsed jaw blend mask. Without it the compositor
  blends through its fixed ellipse, and `blend_mask_note` says so.

Models are built on the meta device and their weights assigned, so a real 3 GB UNet is not
randomly initialised first. fp16 on CUDA, fp32 on CPU (see `device.choose_device`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from realtime.engine.device import DeviceChoice
from realtime.engine.errors import (
    ModelConfigInvalid,
    ModelFileCorrupt,
    ModelFilesMissing,
    ModelWeightsMismatch,
)
from realtime.engine.musetalk.weights.face_parse import load_face_parser
from realtime.engine.musetalk.weights.layout import (
    ModelLayout,
    check_face_parsing,
    read_json,
    unet_config_problems,
    vae_config_problems,
    weight_file_problem,
    whisper_config_problems,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


@dataclass
class MuseTalkModels:
    # Typed Any: diffusers' and transformers' decorated classes defeat mypy. They are
    # UNet2DConditionModel, AutoencoderKL, WhisperEncoder and WhisperFeatureExtractor.
    unet: Any
    vae: Any
    whisper_encoder: Any
    feature_extractor: Any
    vae_scaling_factor: float
    device: DeviceChoice
    # Identifies the weights that produce cached avatar latents (VAE config + weights).
    vae_fingerprint: str
    load_ms: float
    face_parser: Any = None  # weights.face_parse.FaceParser, or None: the ellipse blend mask
    blend_mask_note: str = "ellipse blend mask (no face parser loaded)"

    @property
    def avatar_fingerprint(self) -> str:
        """Identifies every model whose output an avatar cache entry holds (VAE latents, parsed masks)."""
        parser = self.face_parser.fingerprint if self.face_parser is not None else "no-parser"
        return f"{self.vae_fingerprint}+{parser}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    if not path.is_file():
        raise ModelFilesMissing(f"{path} is missing")
    if (problem := weight_file_problem(path)) is not None:
        raise ModelFileCorrupt(problem)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to deserialise is a corrupt file to the user
        raise ModelFileCorrupt(f"{path} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileCorrupt(f"{path} does not hold a state dict of tensors")
    return state


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load that assigns the file's tensors (the module was built on the meta device)."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        text = str(exc)
        raise ModelWeightsMismatch(f"{what}: weights do not match the config: {text[:1200]}") from exc
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise ModelWeightsMismatch(f"{what}: {name} was not in the weights file")


def _build_on_meta(factory: Any, *args: Any, **kwargs: Any) -> Any:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    with torch.device("meta"):
        return factory(*args, **kwargs)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_unet(layout: ModelLayout) -> Any:
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    config = read_json(layout.unet_config)
    if problems := unet_config_problems(config, layout.unet_config):
        raise ModelConfigInvalid("; ".join(problems))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    state = _read_state_dict(layout.unet_weights)
    try:
        unet = _build_on_meta(UNet2DConditionModel, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelConfigInvalid(f"{layout.unet_config}: not a UNet2DConditionModel config ({exc})") from exc
    _strict_load(unet, state, str(layout.unet_weights))
    return unet


def load_vae(layout: ModelLayout) -> tuple[Any, float, str]:
    from diffusers import AutoencoderKL  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    config = read_json(layout.vae_config)
    if problems := vae_config_problems(config, layout.vae_config):
        raise ModelConfigInvalid("; ".join(problems))
    weights = layout.vae_weights()
    state = _read_state_dict(weights)
    try:
        vae = _build_on_meta(AutoencoderKL.from_config, config)
    except (TypeError, ValueError) as exc:
        raise ModelConfigInvalid(f"{layout.vae_config}: not an AutoencoderKL config ({exc})") from exc
    fix_keys = getattr(vae, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:  # diffusers' rename of pre-0.14 attention keys; a no-op on current files
        fix_keys(state)
    _strict_load(vae, state, str(weights))
    scaling_factor = float(vae.config.scaling_factor)
    fingerprint = hashlib.sha256(
        (layout.vae_config.read_text(encoding="utf-8") + file_sha256(weights)).encode()
    ).hexdigest()
    return vae, scaling_factor, fingerprint


def load_whisper(layout: ModelLayout) -> tuple[Any, Any]:
    from transformers import WhisperConfig, WhisperFeatureExtractor  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    config_dict = read_json(layout.whisper_config)
    if problems := whisper_config_problems(config_dict, layout.whisper_config):
        raise ModelConfigInvalid("; ".join(problems))
    if not layout.whisper_preprocessor.is_file():
        raise ModelFilesMissing(f"{layout.whisper_preprocessor} is missing")
    read_json(layout.whisper_preprocessor)  # typed error for a corrupt file before transformers sees it
    try:
        config = WhisperConfig.from_pretrained(str(layout.whisper_dir), local_files_only=True)
        extractor = WhisperFeatureExtractor.from_pretrained(str(layout.whisper_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelConfigInvalid(f"{layout.whisper_dir}: cannot read the whisper config ({exc})") from exc
    full_state = _read_state_dict(layout.whisper_weights())
    state = {}
    for key, tensor in full_state.items():
        for prefix in WHISPER_ENCODER_PREFIXES:
            if key.startswith(prefix):
                state[key[len(prefix) :]] = tensor
                break
    if not state:
        raise ModelWeightsMismatch(
            f"{layout.whisper_weights()} holds no whisper encoder weights (model.encoder.*)"
        )
    encoder = _build_on_meta(WhisperEncoder, config)
    _strict_load(encoder, state, f"{layout.whisper_weights()} (encoder)")
    return encoder, extractor


def load_musetalk(model_dir: Path, device: DeviceChoice) -> MuseTalkModels:
    """Load all three models onto `device` (fp16 on CUDA); typed errors name the file at fault."""
    started = time.perf_counter()
    layout = ModelLayout(Path(model_dir))
    for role, path in layout.required_files():
        if not path.is_file():
            raise ModelFilesMissing(f"{role}: {path} is missing (model dir {layout.root})")
    unet = load_unet(layout)
    vae, scaling_factor, fingerprint = load_vae(layout)
    encoder, extractor = load_whisper(layout)
    torch_device, dtype = device.torch_device(), device.torch_dtype()
    parsing = check_face_parsing(layout)
    parser = None
    if parsing.usable:
        parser = load_face_parser(layout, torch_device, dtype)
        note = f"parsed jaw blend mask (BiSeNet from {layout.face_parse_weights.parent})"
    elif any(f.exists for f in parsing.files):
        parsing_problem = parsing.problems[0]
        raise (ModelFileCorrupt if parsing_problem.code == ModelFileCorrupt.code else ModelFilesMissing)(
            parsing_problem.message
        )
    else:
        note = f"ellipse blend mask: no face-parsing weights ({layout.face_parse_weights} is missing)"
    for module in (unet, vae, encoder):
        module.to(device=torch_device, dtype=dtype)
        module.eval()
        module.requires_grad_(False)
    load_ms = (time.perf_counter() - started) * 1000
    logger.info(
        "musetalk models loaded",
        extra={
            "model_dir": str(model_dir),
            "device": device.device,
            "dtype": device.dtype_name,
            "ms": load_ms,
        },
    )
    return MuseTalkModels(
        unet=unet,
        vae=vae,
        whisper_encoder=encoder,
        feature_extractor=extractor,
        vae_scaling_factor=scaling_factor,
        device=device,
        vae_fingerprint=fingerprint,
        load_ms=load_ms,
        face_parser=parser,
        blend_mask_note=note,
    )
