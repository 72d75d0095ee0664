"""Choosing and building an engine: MuseTalk when its weights exist under the model dir, else preview."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from realtime.engine.api import Engine, EngineConfig
from realtime.engine.errors import ModelFilesMissing
from realtime.engine.weights.layout import check_model_dir

logger = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "musetalk", "preview")


@dataclass(frozen=True)
class EngineSelection:
    engine: Engine
    name: str  # "musetalk" | "preview"
    reason: str  # one sentence for logs, `lipsync` output and /debug: which engine and why


def create_engine(config: EngineConfig) -> EngineSelection:
    """Build the configured engine; with `engine="auto"` pick musetalk when weights exist, else preview.

    Weights that are present but broken are an error, also under "auto": a deployment with a
    half-downloaded model dir should fail loudly, not quietly fall back to the preview.
    """
    if config.engine not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {config.engine!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if config.engine == "preview":
        return _preview(config, "the preview engine was requested")
    report = check_model_dir(config.model_dir)
    if config.engine == "auto" and not report.any_present:
        return _preview(
            config,
            f"no MuseTalk weights under {config.model_dir} (see `lipsync models check`): "
            "using the CPU preview engine, whose mouth follows the audio level",
        )
    if not report.ok:
        try:
            report.raise_first()
        except ModelFilesMissing as exc:
            raise ModelFilesMissing(
                f"{exc.message}; run `lipsync models check --model-dir {config.model_dir}`"
            ) from exc
    return _musetalk(config)


def _preview(config: EngineConfig, reason: str) -> EngineSelection:
    from realtime.engine.preview import PreviewEngine

    logger.info("engine selected", extra={"engine": "preview", "reason": reason})
    return EngineSelection(PreviewEngine(config, reason), "preview", reason)


def _musetalk(config: EngineConfig) -> EngineSelection:
    from realtime.engine.device import choose_device, configure_cpu_threads
    from realtime.engine.musetalk import MuseTalkEngine
    from realtime.engine.weights.loader import load_musetalk

    device = choose_device(config.device, config.dtype)
    if not device.is_cuda:
        configure_cpu_threads(config.cpu_threads)
    models = load_musetalk(config.model_dir, device)
    reason = (
        f"MuseTalk v1.5 weights found under {config.model_dir}: using musetalk on {device.device} "
        f"({device.dtype_name}; {device.reason}), models loaded in {models.load_ms:.0f} ms; {models.blend_mask_note}"
    )
    logger.info("engine selected", extra={"engine": "musetalk", "reason": reason})
    return EngineSelection(MuseTalkEngine(models, config, config.model_dir), "musetalk", reason)
