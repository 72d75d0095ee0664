"""Face boxes in MuseTalk's sense, the v1.5 crop rule, and the lower-face blend mask.

Fallback detector (the landmark box of `landmarks` is the primary source): OpenCV's frontal-face
LBP cascade (`lbpcascade_frontalface_opencv.xml`), evaluated by scikit-image's `Cascade` because
opencv-python 5 no longer ships a cascade classifier nor its XML files; scikit-image bundles that
OpenCV cascade, so no weights are downloaded.

MuseTalk's face box is not a detector box: upstream derives it from 68 face landmarks as
`x`: jaw-contour extent, `y`: from `nose − (chin − nose)` down to the chin, so the box's
vertical middle is the nose and its lower half is the mouth and jaw (which the UNet repaints);
`musetalk_box_from_landmarks` is that rule, applied per frame to dlib's 68 landmarks (same iBUG
order as upstream's DWPose face keypoints; `landmarks`) and smoothed over time (`smooth_boxes`).
Where no landmark model is installed (or `face_box="cascade"`), preparation maps the cascade's box
(brows to lower lip/chin) onto that geometry with fixed proportions measured on frontal faces:
nose at 62 % of the cascade box height, chin at 108 %, jaw contour 4 %…96 % of its width; manifest
boxes win over both.

v1.5 crop rule: `extra_margin` = 10 px added to the bottom of the face box (capped at the frame),
then the crop is resized to 256×256.

Blend mask: with the face-parsing weights present, each frame gets upstream v1.5's parsed "jaw"
mask at preparation (`blend_mask`). Without them, `lower_face_mask` is the fallback: a geometric
ellipse over the lower half of the face box (nose line to chin, 90 % of the jaw width), feathered
with a Gaussian and forced to zero at the box border. It follows the jaw less tightly than a
parse (it reaches past the jaw corners and below the chin into background, collar or hair), but
it is identical for every frame in box coordinates, costs nothing to prepare, and never leaves a
seam because it reaches zero inside the box.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

EXTRA_MARGIN_PX = 10  # MuseTalk v1.5 `--extra_margin`
CROP_SIZE_PX = 256
NOSE_AT = 0.62
CHIN_AT = 1.08
JAW_LEFT, JAW_RIGHT = 0.04, 0.96
DETECTION_MAX_SIDE_PX = 512  # detect on a downscaled copy: the cascade's cost grows with pixels
# The cascade holds the GIL, so many frames are detected in worker processes; below this many frames starting
# them costs more than it saves.
DETECT_POOL_MIN_FRAMES = 32
DETECT_POOL_MAX_WORKERS = 8

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive), frame pixels


@dataclass(frozen=True)
class DetectorConfig:
    scale_factor: float = 1.15
    step_ratio: float = 1.0
    min_face_fraction: float = 0.08  # of the shorter (downscaled) frame side
    max_face_fraction: float = 0.95


def downscaled_for_detection(frame_rgb: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    """The frame shrunk so its longer side is at most `max_side_px` (area-averaged), and the scale applied:
    detectors find a face's outline as well at that size, in a fraction of the time."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    height, width = frame_rgb.shape[:2]
    scale = min(1.0, max_side_px / max(height, width))
    if scale == 1.0:
        return frame_rgb, scale
    return cv2.resize(frame_rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), scale


class FaceDetector:
    """Largest frontal face per frame, as a MuseTalk-style face box (or None)."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self._config = config or DetectorConfig()
        self._cascade: Any = None

    def _load(self) -> Any:
        if self._cascade is None:
            from skimage.data import lbp_frontal_face_cascade_filename  # noqa: PLC0415 (heavy native library: loaded on first use)
            from skimage.feature import Cascade  # noqa: PLC0415 (heavy native library: loaded on first use)

            self._cascade = Cascade(lbp_frontal_face_cascade_filename())
        return self._cascade

    def detect(self, frame_rgb: np.ndarray) -> Box | None:
        import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

        cascade = self._load()
        height, width = frame_rgb.shape[:2]
        small, scale = downscaled_for_detection(frame_rgb, DETECTION_MAX_SIDE_PX)
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
        side = min(gray.shape)
        lo = max(24, int(side * self._config.min_face_fraction))
        hi = max(lo + 1, int(side * self._config.max_face_fraction))
        found = cascade.detect_multi_scale(
            img=gray,
            scale_factor=self._config.scale_factor,
            step_ratio=self._config.step_ratio,
            min_size=(lo, lo),
            max_size=(hi, hi),
        )
        if not found:
            return None
        best = max(found, key=lambda d: d["width"] * d["height"])
        x, y = best["c"] / scale, best["r"] / scale
        w, h = best["width"] / scale, best["height"] / scale
        return musetalk_box_from_detection(x=x, y=y, w=w, h=h, frame_w=width, frame_h=height)


def detection_workers(frame_count: int) -> int:
    """Worker processes for detecting `frame_count` frames: 1 (in this process) for short avatars, else up
    to half the cores this process may use (live sessions assemble their frames on the same host
    meanwhile)."""
    if frame_count < DETECT_POOL_MIN_FRAMES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DETECT_POOL_MAX_WORKERS, cores // 2))


def detect_faces(
    frames: np.ndarray,
    config: DetectorConfig,
    workers: int,
    on_frames: Callable[[int], None] | None = None,
) -> list[Box | None]:
    """`FaceDetector(config).detect` of every frame, in order, on `workers` processes (1: in this one).

    `on_frames(done)` is called as frames finish (in chunks when pooled). Workers are spawned, not forked: the
    caller may be a threaded process holding torch and CUDA state."""
    if workers <= 1 or len(frames) < 2:
        detector = FaceDetector(config)
        boxes = []
        for index, frame in enumerate(frames):
            boxes.append(detector.detect(frame))
            if on_frames:
                on_frames(index + 1)
        return boxes
    chunks = [chunk for chunk in np.array_split(np.arange(len(frames)), workers * 2) if len(chunk)]
    results: dict[int, list[Box | None]] = {}
    try:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {
                pool.submit(
                    _detect_chunk, config, np.ascontiguousarray(frames[chunk[0] : chunk[-1] + 1])
                ): int(chunk[0])
                for chunk in chunks
            }
            done = 0
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += len(results[futures[future]])
                if on_frames:
                    on_frames(done)
    except (BrokenProcessPool, OSError) as exc:
        # A worker that cannot start (e.g. a main module that cannot be imported again) must not fail the
        # avatar.
        logger.warning("face detection workers failed; detecting in this process", extra={"error": repr(exc)})
        return detect_faces(frames, config, 1, on_frames)
    return [box for start in sorted(results) for box in results[start]]


def _detect_chunk(config: DetectorConfig, frames: np.ndarray) -> list[Box | None]:
    detector = FaceDetector(config)
    return [detector.detect(frame) for frame in frames]


def musetalk_box_from_detection(
    *, x: float, y: float, w: float, h: float, frame_w: int, frame_h: int
) -> Box | None:
    """Map a frontal-face detection (x, y, w, h) to the landmark-style box MuseTalk crops with."""
    nose = y + NOSE_AT * h
    chin = y + CHIN_AT * h
    top = max(0.0, nose - (chin - nose))
    x1, x2 = max(0.0, x + JAW_LEFT * w), min(float(frame_w), x + JAW_RIGHT * w)
    box = (round(x1), round(top), round(x2), round(min(chin, float(frame_h))))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    return box


def musetalk_box_from_landmarks(landmarks: np.ndarray, frame_h: int) -> Box | None:
    """Upstream's face box from the 68 face landmarks (iBUG order, frame pixels, `[68, 2]`), or None when
    unusable.

    x: the landmarks' extent (the jaw contour's, in practice); y: from `n − (c − n)` (at least 0) down to `c`,
    where `n` is the nose landmark 29 (the lower nose bridge) and `c` the lowest landmark (the chin).
    Coordinates are truncated to whole pixels first, as upstream. None where upstream would fall back to its
    detector box: an empty box or a left edge outside the frame.
    """
    points = np.asarray(landmarks)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) landmarks, got shape {points.shape}")
    pixels = points.astype(np.int32)
    nose_y = int(pixels[29, 1])
    chin_y = int(pixels[:, 1].max())
    top = max(0, nose_y - (chin_y - nose_y))
    box = (int(pixels[:, 0].min()), top, int(pixels[:, 0].max()), min(chin_y, frame_h))
    if box[3] - box[1] <= 0 or box[2] - box[0] <= 0 or box[0] < 0:
        return None
    return box


def smooth_boxes(boxes: list[Box | None], window_frames: int, max_shift_px: int) -> list[Box | None]:
    """Per-frame landmark boxes with their jitter damped: each coordinate becomes the mean of that coordinate
    over a centred window of `window_frames` frames (shorter at the ends and where a faceless frame breaks the
    run: a box never borrows from across a gap), rounded, but never more than `max_shift_px` from the frame's
    own box — so a still head's box stops trembling while every box stays within the parity tolerance of
    upstream's per-frame rule, and real motion is followed at once."""
    if window_frames <= 1 or max_shift_px <= 0:
        return list(boxes)
    half = window_frames // 2
    out: list[Box | None] = list(boxes)
    index = 0
    while index < len(boxes):
        if boxes[index] is None:
            index += 1
            continue
        end = index
        while end < len(boxes) and boxes[end] is not None:
            end += 1
        run = np.array([boxes[k] for k in range(index, end)], dtype=np.float64)  # [n, 4]
        sums = np.vstack([np.zeros((1, 4)), np.cumsum(run, axis=0)])
        for k in range(len(run)):
            lo, hi = max(0, k - half), min(len(run), k + half + 1)
            mean = (sums[hi] - sums[lo]) / (hi - lo)
            shifted = run[k] + np.clip(mean - run[k], -max_shift_px, max_shift_px)
            x1, y1, x2, y2 = (int(v) for v in np.round(shifted))
            out[index + k] = (x1, y1, x2, y2)
        index = end
    return out


def crop_box_v15(face_box: Box, frame_h: int, extra_margin_px: int = EXTRA_MARGIN_PX) -> Box:
    """MuseTalk v1.5's crop: the face box with `extra_margin` px more at the bottom, within the frame."""
    x1, y1, x2, y2 = face_box
    return (x1, y1, x2, min(y2 + extra_margin_px, frame_h))


def fill_missing(boxes: list[Box | None], max_gap_frames: int) -> list[Box | None]:
    """Frames without a detection borrow the nearest detected frame's box when it is at most `max_gap_frames`
    away.

    Alignment is kept either way: frame i keeps index i (upstream drops faceless frames from its
    latent list, which shifts every later frame against its image — we never do).
    """
    known = [i for i, box in enumerate(boxes) if box is not None]
    if not known:
        return list(boxes)
    out = list(boxes)
    for i, box in enumerate(boxes):
        if box is not None:
            continue
        nearest = min(known, key=lambda k: (abs(k - i), k))
        if abs(nearest - i) <= max_gap_frames:
            out[i] = boxes[nearest]
    return out


def lower_face_mask(size_px: int = CROP_SIZE_PX) -> np.ndarray:
    """The blend mask in face-box coordinates, float32 `[size, size]` in [0, 1] (see module docstring)."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    mask = np.zeros((size_px, size_px), dtype=np.float32)
    center = (size_px // 2, int(size_px * 0.74))
    axes = (int(size_px * 0.40), int(size_px * 0.30))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1.0, thickness=-1)
    mask[: size_px // 2] = 0.0  # upstream keeps only the lower half (upper_boundary_ratio 0.5)
    sigma = size_px * 0.035
    blurred = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)
    # Taper to exactly zero at the box border so the pasted face never shows a seam.
    ramp = np.clip(np.minimum(np.arange(size_px), np.arange(size_px)[::-1]) / (size_px * 0.04), 0.0, 1.0)
    return (blurred * ramp[:, None] * ramp[None, :]).astype(np.float32)


@dataclass(frozen=True)
class MouthGeometry:
    """Mouth position in frame pixels, derived from a MuseTalk face box (used by the preview engine)."""

    center_x: float
    lip_y: float  # the line between the lips
    half_width: float
    chin_y: float

    @staticmethod
    def from_face_box(box: Box) -> MouthGeometry:
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        return MouthGeometry(center_x=x1 + 0.5 * w, lip_y=y1 + 0.69 * h, half_width=0.2 * w, chin_y=float(y2))
