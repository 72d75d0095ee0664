"""The preview engine: no weights, CPU only — opens the real avatar's mouth with the audio level.

Features per frame are a mouth *openness* in [0, 1]: the frame's RMS amplitude over
`REFERENCE_RMS` (-14 dBFS, loud speech) raised to `OPENNESS_GAMMA` < 1 (quiet speech still opens
the mouth a little), smoothed over the neighbouring frames (the stream's 80 ms lookahead already
holds the next one), plus a small boost on onsets so plosives read.

Rendering warps the lower face of the real frame: below the lip line the jaw is pulled down by
up to `MAX_JAW_DROP` of the face-box height (fading out towards the chin), and the gap between
the lips is filled with a feathered dark mouth interior with a hint of upper teeth. Everything
happens in a small region around the mouth, so a 512×512 frame costs well under a millisecond
of arithmetic plus one frame copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from realtime.engine.audio.framing import SAMPLES_PER_FRAME
from realtime.engine.audio.levels import frame_rms_dbfs, speech_weights
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.face import MouthGeometry
from realtime.engine.avatar.prepare import prepare_avatar
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.errors import RenderRequestInvalid
from realtime.engine.protocol import (
    EngineBase,
    EngineConfig,
    EngineInfo,
    RenderRequest,
    StageProfile,
    maybe_stage,
)

ENGINE_NAME = "preview"
ENGINE_VERSION = "preview-1"
REFERENCE_RMS = 0.2
OPENNESS_GAMMA = 0.7
ONSET_BOOST = 0.3
MAX_JAW_DROP = 0.13  # of the face box height at full openness
MIN_VISIBLE_OPENNESS = 0.02
INTERIOR_RGB = np.array([58.0, 22.0, 28.0], dtype=np.float32)
TEETH_RGB = np.array([222.0, 214.0, 204.0], dtype=np.float32)


def openness_from_levels(rms_dbfs: np.ndarray) -> np.ndarray:
    """Per-frame openness in [0, 1]; frame i uses levels i-1, i, i+1 (a missing neighbour counts as
    silence)."""
    amplitude = np.power(10.0, rms_dbfs.astype(np.float32) / 20.0)
    raw = np.clip(amplitude / REFERENCE_RMS, 0.0, 1.0) ** OPENNESS_GAMMA
    padded = np.concatenate([[0.0], raw, [0.0]]).astype(np.float32)
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    onset = np.maximum(0.0, raw - padded[:-2])
    return np.clip(smooth + ONSET_BOOST * onset, 0.0, 1.0).astype(np.float32)


class PreviewFeaturizer:
    def reset(self) -> None:
        """Stateless: openness is a function of the utterance's audio."""

    def encode_plan(
        self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int
    ) -> list[Any]:
        return []  # levels cost nothing: nothing to batch

    def features(self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int) -> list[Any]:
        first = max(0, frames.start - 1)
        last = frames.stop + 1  # the right neighbour: inside the 80 ms lookahead, or silence at the end
        start_sample = first * SAMPLES_PER_FRAME - audio_base
        levels = frame_rms_dbfs(audio[start_sample : last * SAMPLES_PER_FRAME - audio_base])
        levels = np.concatenate([levels, np.full(last - first - len(levels), -120.0, dtype=np.float32)])
        if frames.start == 0:
            levels = np.concatenate([[np.float32(-120.0)], levels])
        openness = openness_from_levels(levels)[1:-1]
        return [np.array([value], dtype=np.float32) for value in openness[: len(frames)]]


class PreviewEngine(EngineBase):
    """No weights, CPU only: renders synchronously, so the base's render_async, warm-up and prefetch apply."""

    def __init__(self, config: EngineConfig, reason: str = "") -> None:
        self._config = config
        self._info = EngineInfo(
            name=ENGINE_NAME,
            version=ENGINE_VERSION,
            device="cpu",
            dtype="uint8",
            model_dir=None,
            detail=reason or "CPU preview engine (no weights): mouth opens with the audio level",
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar:
        return prepare_avatar(
            source,
            engine=ENGINE_NAME,
            engine_version=ENGINE_VERSION,
            cache_root=self._config.cache_dir,
            cache_max_bytes=self._config.cache_max_bytes,
            on_progress=on_progress,
            settings=self._config.prepare,
        )

    def open_stream(self) -> AudioFeatureStream:
        return AudioFeatureStream(PreviewFeaturizer(), self._config.gate)

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]:
        audio = np.asarray(audio, dtype=np.float32)
        rms = frame_rms_dbfs(audio)
        openness = openness_from_levels(rms)
        weights = speech_weights(rms, self._config.gate)
        return [
            FeatureFrame(
                i, 0, i, np.array([openness[i]], dtype=np.float32), float(rms[i]), float(weights[i]), False
            )
            for i in range(len(rms))
        ]

    def render(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> list[np.ndarray]:
        out = []
        with maybe_stage(profile, "blend"):
            for request in requests:
                out.append(self._render_one(request))
        if profile is not None:
            profile.frames += len(requests)
        return out

    def _render_one(self, request: RenderRequest) -> np.ndarray:
        avatar = request.avatar
        frame_no = avatar.frame_at(request.frame_index)
        idle = avatar.frames[frame_no]
        feature = np.asarray(request.features, dtype=np.float32).reshape(-1)
        if feature.size != 1:
            raise RenderRequestInvalid(
                f"preview render requests need a 1-value openness feature, got {feature.size}"
            )
        openness = float(np.clip(feature[0], 0.0, 1.0)) * min(1.0, max(0.0, request.speech_weight))
        if openness < MIN_VISIBLE_OPENNESS or not avatar.has_face[frame_no]:
            return idle
        frame = np.array(idle)
        x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[frame_no])
        open_mouth(frame, MouthGeometry.from_face_box((x1, y1, x2, y2)), y2 - y1, openness)
        return frame


def open_mouth(frame: np.ndarray, mouth: MouthGeometry, face_height: int, openness: float) -> None:
    """Warp `frame` in place: drop the lower lip and jaw by `openness` and fill the opening."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    height, width = frame.shape[:2]
    gap = openness * MAX_JAW_DROP * face_height
    half_w = mouth.half_width * (0.85 + 0.15 * openness)
    reach = 1.8 * mouth.half_width
    x0, x1 = max(0, int(mouth.center_x - reach)), min(width, int(mouth.center_x + reach) + 1)
    y0 = max(0, int(mouth.lip_y - 0.35 * mouth.half_width))
    y1 = min(height, int(mouth.chin_y + 0.6 * (mouth.chin_y - mouth.lip_y)) + 1)
    if x1 - x0 < 4 or y1 - y0 < 4 or gap < 0.5:
        return
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    # At the lip line the lower lip drops along a half ellipse (the opening's outline); further
    # down the whole jaw drops, with a broad profile that eases out 1.8 half-widths from the centre.
    lip_profile = np.sqrt(np.clip(1.0 - ((xs - mouth.center_x) / half_w) ** 2, 0.0, 1.0))
    dx = np.abs(xs - mouth.center_x) / reach
    jaw_profile = np.where(dx < 0.55, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip((dx - 0.55) / 0.45, 0.0, 1.0)))
    below = np.clip((ys - mouth.lip_y) / max(1.0, y1 - mouth.lip_y), 0.0, 1.0)
    blend = np.clip(below * 4.0, 0.0, 1.0)  # lip outline near the lip line, jaw profile below
    across = lip_profile * (1.0 - blend) + jaw_profile * blend
    displacement = np.where(ys >= mouth.lip_y, gap * across * (1.0 - below), 0.0).astype(np.float32)
    map_x = np.broadcast_to(xs - x0, displacement.shape).astype(np.float32)
    map_y = (ys - y0 - displacement).astype(np.float32)
    warped = cv2.remap(roi, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # The opening: between the upper lip (lip line) and the dropped lower lip.
    lip_row = mouth.lip_y - y0
    opening = ((ys - y0 >= lip_row) & (ys - y0 <= lip_row + gap * lip_profile)).astype(np.float32)
    teeth = ((ys - y0 >= lip_row) & (ys - y0 <= lip_row + 0.22 * gap * lip_profile)).astype(np.float32)
    teeth *= np.clip(1.0 - np.abs(xs - mouth.center_x) / (0.75 * half_w), 0.0, 1.0) ** 0.5
    feather = max(0.6, gap * 0.08)
    opening_alpha = np.asarray(cv2.GaussianBlur(opening, (0, 0), feather), np.float32)[..., None]
    teeth_alpha = np.asarray(cv2.GaussianBlur(teeth, (0, 0), feather), np.float32)[..., None] * 0.6
    mouth_rgb = INTERIOR_RGB * (1.0 - teeth_alpha) + TEETH_RGB * teeth_alpha
    composed = np.asarray(warped, dtype=np.float32) * (1.0 - opening_alpha) + mouth_rgb * opening_alpha
    frame[y0:y1, x0:x1] = np.clip(composed + 0.5, 0, 255).astype(np.uint8)
