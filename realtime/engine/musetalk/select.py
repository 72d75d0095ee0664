"""MuseTalk's registration: whether its weights are usable under a model dir, and building the engine."""

from __future__ import annotations

import logging

from realtime.engine.device import choose_device, configure_cpu_threads
from realtime.engine.errors import ModelFilesMissing
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.musetalk.weights.layout import check_model_dir
from realtime.engine.musetalk.weights.loader import load_musetalk
from realtime.engine.protocol import EngineConfig, EngineProbe

logger = logging.getLogger(__name__)

DESCRIPTION = "MuseTalk v1.5 (whisper-tiny features, UNet, VAE decode); needs its weights under --model-dir"


def probe_musetalk(config: EngineConfig) -> EngineProbe:
    """Usable when the weights are complete; absent when none of them exist. Weights that are present but
    broken are an error, also under "auto": a half-downloaded model dir fails loudly instead of quietly
    falling back to another engine."""
    report = check_model_dir(config.model_dir)
    if report.ok:
        return EngineProbe(usable=True, reason=f"MuseTalk v1.5 weights found under {config.model_dir}")
    try:
        report.raise_first()
    except ModelFilesMissing as exc:
        problem = ModelFilesMissing(
            f"{exc.message}; run `lipsync models check --model-dir {config.model_dir}`"
        )
        if report.any_present:
            raise problem from exc
        reason = f"no MuseTalk weights under {config.model_dir} (see `lipsync models check`)"
        return EngineProbe(usable=False, reason=reason, problem=problem)
    raise AssertionError("a model dir report with problems raises one")


def build_musetalk(config: EngineConfig) -> MuseTalkEngine:
    device = choose_device(config.device, config.dtype)
    if not device.is_cuda:
        configure_cpu_threads(config.cpu_threads)
    models = load_musetalk(config.model_dir, device)
    logger.info("musetalk models loaded", extra={"device": device.device, "load_ms": round(models.load_ms)})
    detail = (
        f"musetalk on {device.device} ({device.dtype_name}; {device.reason}), models loaded in "
        f"{models.load_ms:.0f} ms; {models.blend_mask_note}"
    )
    return MuseTalkEngine(models, config, config.model_dir, detail=detail)
