"""Offline rendering of a whole clip (what `lipsync render` runs) and its diagnostic dump."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime.engine.audio.stream import FeatureFrame
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.preview import PreviewEngine
from realtime.engine.protocol import Engine, RenderRequest

logger = logging.getLogger(__name__)


@dataclass
class OfflineRender:
    frames: list[np.ndarray]
    features: list[FeatureFrame]
    cycle_indices: list[int]


def render_clip(engine: Engine, avatar: Avatar, audio: np.ndarray, batch_size: int = 8) -> OfflineRender:
    """Every frame of `audio` (16 kHz mono float32) rendered on `avatar`; output frame i shows cycle
    position i."""
    features = engine.offline_frames(audio)
    frames: list[np.ndarray] = []
    for start in range(0, len(features), max(1, batch_size)):
        batch = features[start : start + batch_size]
        frames.extend(engine.render([RenderRequest.for_frame(avatar, f.index, f) for f in batch]))
    return OfflineRender(frames, features, [f.index for f in features])


def dump_intermediates(
    engine: Engine, avatar: Avatar, audio: np.ndarray, result: OfflineRender, out_dir: Path
) -> list[Path]:
    """Write the render's intermediates as .npy (plus an index.json saying what each holds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def save(name: str, array: np.ndarray, what: str) -> None:
        np.save(out_dir / f"{name}.npy", array)
        written[f"{name}.npy"] = f"{what}; shape {list(array.shape)}, {array.dtype}"

    save("face_boxes", avatar.face_boxes, "MuseTalk face box per avatar frame, x1 y1 x2 y2 px (-1: no face)")
    save("crop_boxes", avatar.crop_boxes, "v1.5 crop box (face box + extra_margin) per avatar frame")
    save(
        "frame_indices",
        np.array([avatar.frame_at(i) for i in result.cycle_indices]),
        "avatar frame per output frame",
    )
    save(
        "rms_dbfs", np.array([f.rms_dbfs for f in result.features], dtype=np.float32), "audio level per frame"
    )
    save(
        "speech_weights",
        np.array([f.speech_weight for f in result.features], dtype=np.float32),
        "0 = idle frame",
    )
    if isinstance(engine, MuseTalkEngine):
        save(
            "audio_features",
            engine.offline_windows(audio).float().cpu().numpy(),
            "whisper windows [T,50,384] before positional encoding (upstream's whisper_chunks)",
        )
        save(
            "unet_condition",
            np.stack([f.features.float().cpu().numpy() for f in result.features])
            if result.features
            else np.zeros((0, 50, 384), np.float32),
            "UNet encoder_hidden_states [T,50,384] (windows + positional encoding)",
        )
        requests = [RenderRequest.for_frame(avatar, f.index, f) for f in result.features]
        active = [
            i for i, r in enumerate(requests) if r.speech_weight > 0 and avatar.has_face[avatar.frame_at(i)]
        ]
        inputs, outputs = [], []
        for start in range(0, len(active), 16):
            chunk = [requests[i] for i in active[start : start + 16]]
            latents_in, latents_out = engine.unet_inputs(chunk)
            inputs.append(latents_in)
            outputs.append(latents_out)
        save("active_frames", np.array(active, dtype=np.int64), "output frames the UNet ran for (speech)")
        save(
            "unet_input_latents",
            np.concatenate(inputs) if inputs else np.zeros((0, 8, 32, 32), np.float32),
            "UNet input [A,8,32,32]: masked + reference latents, rows follow active_frames",
        )
        save(
            "unet_output_latents",
            np.concatenate(outputs) if outputs else np.zeros((0, 4, 32, 32), np.float32),
            "UNet output [A,4,32,32] (before / scaling_factor), rows follow active_frames",
        )
    elif isinstance(engine, PreviewEngine):
        save(
            "openness",
            np.array([float(f.features[0]) for f in result.features], np.float32),
            "preview openness",
        )
    (out_dir / "index.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return [out_dir / name for name in written]
