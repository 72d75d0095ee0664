"""`lipsync models check`: what is in a MuseTalk model dir, what is wrong with it, and what "auto" would
pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from realtime.engine.device import choose_device
from realtime.engine.errors import EngineError
from realtime.engine.musetalk.weights.layout import check_model_dir
from realtime.engine.musetalk.weights.loader import load_musetalk
from realtime.engine.protocol import EngineConfig
from realtime.engine.registry import auto_choice


def check_document(model_dir: Path, device_name: str = "auto", *, load: bool = False) -> dict[str, Any]:
    """What `lipsync models check --json` prints (also served by the API's /debug/musetalk): the files, the
    device that would be used, what engine=auto would choose and, with `load`, whether the weights load."""
    report = check_model_dir(model_dir)
    document: dict[str, Any] = report.to_json()
    try:
        device = choose_device(device_name)
        document["device"] = {"device": device.device, "dtype": device.dtype_name, "reason": device.reason}
    except (ImportError, ValueError) as exc:
        document["device"] = {"error": str(exc)}
    try:
        document["engine_auto_would_use"] = auto_choice(EngineConfig(model_dir=model_dir))[0].name
    except EngineError:
        document["engine_auto_would_use"] = "none (fix the problems)"
    if load and report.ok and "error" not in document["device"]:
        try:
            models = load_musetalk(model_dir, choose_device(device_name))
            document["load"] = {
                "ok": True,
                "ms": round(models.load_ms),
                "vae_scaling_factor": models.vae_scaling_factor,
                "blend_mask": models.blend_mask_note,
            }
        except EngineError as exc:
            document["load"] = {"ok": False, "code": exc.code, "message": exc.message}
            document["ok"] = False
    return document
