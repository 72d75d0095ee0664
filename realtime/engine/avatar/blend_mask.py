"""MuseTalk v1.5's parsed blend mask: which pixels of the face box the generated face repaints.

Upstream's rule, per frame, for the face box `B` (the v1.5 crop box: landmark box + extra margin):

1. The square "expanded" box around B's centre, side `2·s` with `s = int(max(w, h) // 2 · 1.5)`,
   cut from the frame (black where it leaves the frame), is parsed at 512² (BiSeNet labels).
2. The labels become a 0/255 region by `mode`:
   * `raw`: skin (1) and mouth/lips (11, 12, 13);
   * `neck`: raw plus neck (14);
   * `jaw` (v1.5's default): skin dilated with a cone-shaped kernel (a 33² kernel whose rows
     below its centre widen by 2 px per row to 21 px, then stay 21 px wide: the region grows
     upward along its lower edge) — on the two cheek bands (x ≤ 256 − 90 and x ≥ 256 + 90 of the
     512² map) also eroded twice with a flat 35×3 ellipse — minus the nose (10), plus mouth
     and lips.
3. The region is resized to the expanded box, kept only inside B, and only in the expanded
   box's lower half (rows ≥ `int(side · 0.5)`), then Gaussian-blurred with an odd kernel of
   `int(0.1 · side // 2 · 2) + 1` px (the realtime script's preparation; the offline script's
   per-frame blend uses 0.05) and sigma derived from that size.
4. Upstream pastes the expanded box through this mask, but outside B that box still holds the
   original frame, so the blend only ever changes pixels inside B: the mask that matters is the
   blurred mask's B region, which is what this module returns (uint8, B's size).

Everything here is numpy + OpenCV; the parsing network lives in `weights.face_parse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realtime.engine.avatar.face import Box

PARSE_PX = 512
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14
MOUTH_LABELS = (MOUTH, UPPER_LIP, LOWER_LIP)
MODES = ("jaw", "raw", "neck")


@dataclass(frozen=True)
class BlendMaskSettings:
    mode: str = "jaw"  # upstream `--parsing_mode`
    expand: float = 1.5  # the parsed box's side relative to the face box's longer side
    upper_boundary_ratio: float = 0.5  # rows of the expanded box above this fraction are never repainted
    blur_fraction: float = 0.1  # Gaussian kernel size as a fraction of the expanded box's side
    cheek_width_px: int = 90  # upstream `--left_cheek_width` / `--right_cheek_width`, in the 512² parse

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"blend mask mode {self.mode!r}: choose one of {', '.join(MODES)}")


def expanded_box(face_box: Box, expand: float) -> Box:
    """The square box around the face box's centre that upstream parses (may extend past the frame)."""
    x1, y1, x2, y2 = face_box
    center_x, center_y = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (center_x - half, center_y - half, center_x + half, center_y + half)


def cut_padded(frame: np.ndarray, box: Box) -> np.ndarray:
    """`frame[box]` with black where the box leaves the frame."""
    x1, y1, x2, y2 = box
    height, width = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, *frame.shape[2:]), frame.dtype)
    sx1, sy1, sx2, sy2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out


def cone_kernel() -> np.ndarray:
    """The jaw mode's 33×33 dilation kernel (see the module docstring)."""
    kernel = np.zeros((33, 33), np.uint8)
    center = 16
    for row in range(10, 33):
        half = min(row - 10, 10)
        kernel[row, center - half : center + half + 1] = 1
    return kernel


def cheek_bands(cheek_width_px: int) -> np.ndarray:
    """Bool `[512, 512]`: the columns outside the central band of ±`cheek_width_px` (the cheeks)."""
    columns = np.arange(PARSE_PX)
    center = PARSE_PX // 2
    band = (columns <= center - cheek_width_px) | (columns >= center + cheek_width_px)
    return np.broadcast_to(band[None, :], (PARSE_PX, PARSE_PX))


def region_from_labels(labels: np.ndarray, mode: str = "jaw", cheek_width_px: int = 90) -> np.ndarray:
    """A 512² label map -> the repaint region, uint8 0/255, by upstream's `mode` rule."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    if mode == "raw":
        keep = np.isin(labels, (SKIN, *MOUTH_LABELS))
    elif mode == "neck":
        keep = np.isin(labels, (SKIN, *MOUTH_LABELS, NECK))
    elif mode == "jaw":
        skin = (labels == SKIN).astype(np.uint8) * 255
        grown = cv2.dilate(skin, cone_kernel(), iterations=1)
        flattened = cv2.erode(grown, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), iterations=2)
        cheeks = cheek_bands(cheek_width_px)
        jaw = np.where(cheeks, flattened, grown) == 255
        keep = (jaw & (labels != NOSE)) | np.isin(labels, MOUTH_LABELS)
    else:
        raise ValueError(f"blend mask mode {mode!r}: choose one of {', '.join(MODES)}")
    return keep.astype(np.uint8) * 255


def face_box_mask(region: np.ndarray, face_box: Box, settings: BlendMaskSettings) -> np.ndarray:
    """The 512² `region` (of `expanded_box(face_box)`) -> the blend mask over the face box, uint8 `[h, w]`."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    x1, y1, x2, y2 = face_box
    ex1, ey1, ex2, _ = expanded_box(face_box, settings.expand)
    side = ex2 - ex1
    interpolation = cv2.INTER_AREA if side < PARSE_PX else cv2.INTER_CUBIC
    full = cv2.resize(region, (side, side), interpolation=interpolation)
    kept = np.zeros_like(full)
    fy1, fy2, fx1, fx2 = y1 - ey1, y2 - ey1, x1 - ex1, x2 - ex1
    kept[fy1:fy2, fx1:fx2] = full[fy1:fy2, fx1:fx2]
    kept[: int(side * settings.upper_boundary_ratio)] = 0
    kernel = int(settings.blur_fraction * side // 2 * 2) + 1
    blurred = cv2.GaussianBlur(kept, (kernel, kernel), 0)
    return np.ascontiguousarray(blurred[fy1:fy2, fx1:fx2])


def parse_crops(frames: np.ndarray, face_boxes: list[Box], settings: BlendMaskSettings) -> list[np.ndarray]:
    """The expanded-box crops that are parsed, one per face box (RGB uint8, black outside the frame)."""
    return [
        cut_padded(frame, expanded_box(box, settings.expand))
        for frame, box in zip(frames, face_boxes, strict=True)
    ]
