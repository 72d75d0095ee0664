"""68-point face landmarks per avatar frame, for upstream's landmark face box.

Model: dlib's `shape_predictor_68_face_landmarks.dat` (an ensemble of regression trees, iBUG 300-W
point order: jaw 0–16, brows 17–26, nose 27–35, eyes 36–47, mouth 48–67 — the order of the 68 face
keypoints upstream takes from DWPose), shipped inside the `face-recognition-models` wheel, run by
`dlib-bin`; faces are found by dlib's HOG frontal-face detector (part of dlib, no model file).
Licence: the package is CC0, but the 68-point model was trained on iBUG 300-W, whose licence excludes
commercial use, and dlib's model notes say the trained model therefore cannot be used in a commercial
product: a deployment that must avoid it sets `face_box="cascade"` (see docs/engine.md).

Detection and tracking (the shape predictor costs ~1 ms a frame, the detector ~15× that):

* the detector runs on every `detect_every_frames`-th frame (and the last), downscaled to at most
  `detection_max_side_px`, in a thread pool (dlib's detector releases the GIL); where it finds no face
  at that scale it looks again at twice the scale (faces under ~80 px);
* every frame gets landmarks, in order. A frame without its own detection takes its predictor box
  from the previous frame's landmarks, mapped by the detector-box ↔ landmark-extent relation measured
  at the last detection (tracking). The shape predictor fits a face into any box, so a tracked frame is
  checked twice and detected after all when either check fails: the box's content must still look like
  the previous frame's (normalised correlation of 32² grey patches at least `track_min_correlation`: a
  cut, or the face left), and the new landmarks' extent must agree with the box they were fitted in (IoU
  at least `track_min_iou`). A frame with neither a detection nor a tracked predecessor has no landmarks.

Several faces: the detector's most confident one (not the largest: on clothing, posters or
background a false detection can be larger than the real face, but scores lower).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from realtime.engine.avatar.face import downscaled_for_detection
from realtime.engine.avatar.workers import prepare_threads

logger = logging.getLogger(__name__)

LANDMARK_COUNT = 68
MODEL_PACKAGE = "face_recognition_models"
MODEL_FILE = "models/shape_predictor_68_face_landmarks.dat"
LANDMARK_MODEL_NAME = "dlib-68"  # meta's `face_box_source` says "landmarks:dlib-68"
LANDMARK_MODEL_LICENCE = (
    "face-recognition-models is CC0, but dlib's 68-point model was trained on iBUG 300-W, whose licence "
    "excludes commercial use: set face_box=cascade where that rules it out"
)

# (left, top, right, bottom) in frame pixels, floats.
Rect = tuple[float, float, float, float]


@dataclass(frozen=True)
class LandmarkSettings:
    detect_every_frames: int = 5
    detection_max_side_px: int = 640
    track_min_iou: float = 0.6
    track_min_correlation: float = 0.6

    def __post_init__(self) -> None:
        if self.detect_every_frames < 1:
            raise ValueError("detect_every_frames must be >= 1")
        if self.detection_max_side_px < 80:
            raise ValueError("detection_max_side_px must be >= 80 (the detector's window)")
        if not 0.0 < self.track_min_iou <= 1.0:
            raise ValueError("track_min_iou must be in (0, 1]")
        if not -1.0 <= self.track_min_correlation <= 1.0:
            raise ValueError("track_min_correlation must be in [-1, 1]")


@dataclass(frozen=True)
class LandmarkAvailability:
    usable: bool
    model_file: Path | None
    why: str  # a sentence: what was found, or what is missing


def landmark_availability() -> LandmarkAvailability:
    """Whether dlib and the 68-point model are installed, without importing either (the model package's
    own `__init__` needs pkg_resources, which recent setuptools no longer ships: only its file is used)."""
    if importlib.util.find_spec("dlib") is None:
        return LandmarkAvailability(False, None, "dlib is not installed (pip package dlib-bin)")
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return LandmarkAvailability(
            False, None, "the 68-point landmark model is not installed (pip package face-recognition-models)"
        )
    model = Path(locations[0]) / MODEL_FILE
    if not model.is_file():
        return LandmarkAvailability(False, None, f"{model} is missing from face-recognition-models")
    return LandmarkAvailability(True, model, f"dlib 68-point shape predictor from {model}")


_models: dict[Path, tuple[Any, Any]] = {}
_detectors: list[Any] = []
_models_lock = threading.Lock()


def _face_detector() -> Any:
    """dlib's frontal face detector (HOG, built into the library: no model file), once per process."""
    with _models_lock:
        if not _detectors:
            import dlib  # noqa: PLC0415 (heavy native library: loaded on first use)

            _detectors.append(dlib.get_frontal_face_detector())
        return _detectors[0]


def _load(model_file: Path) -> tuple[Any, Any]:
    """(detector, shape predictor), loaded once per process: the predictor file is ~100 MB."""
    detector = _face_detector()
    with _models_lock:
        loaded = _models.get(model_file)
        if loaded is None:
            import dlib  # noqa: PLC0415 (heavy native library: loaded on first use)

            loaded = (detector, dlib.shape_predictor(str(model_file)))
            _models[model_file] = loaded
        return loaded


def detect_face_rect(frame_rgb: np.ndarray, detection_max_side_px: int = 640) -> Rect | None:
    """The most confident face's detector box in frame pixels, or None (dlib's detector on a frame scaled
    to at most `detection_max_side_px`; a second, upsampled pass finds faces under its ~80 px window)."""
    detector = _face_detector()
    small, scale = downscaled_for_detection(frame_rgb, detection_max_side_px)
    small = np.ascontiguousarray(small)
    found, scores, _ = detector.run(small, 0, 0.0)
    if len(found) == 0:
        found, scores, _ = detector.run(small, 1, 0.0)
    if len(found) == 0:
        return None
    best = found[int(np.argmax(scores))]
    return (best.left() / scale, best.top() / scale, best.right() / scale, best.bottom() / scale)


class FaceLandmarker:
    """The most confident face's 68 landmarks in a frame (detector + shape predictor)."""

    def __init__(self, model_file: Path, settings: LandmarkSettings | None = None) -> None:
        self.settings = settings or LandmarkSettings()
        _, self._predictor = _load(model_file)

    def detect(self, frame_rgb: np.ndarray) -> Rect | None:
        """The most confident face's detector box in frame pixels, or None."""
        return detect_face_rect(frame_rgb, self.settings.detection_max_side_px)

    def shape(self, frame_rgb: np.ndarray, rect: Rect) -> np.ndarray:
        """The 68 landmarks fitted in `rect`, float `[68, 2]` frame pixels (x, y)."""
        import dlib  # noqa: PLC0415 (heavy native library: loaded on first use)

        box = dlib.rectangle(round(rect[0]), round(rect[1]), round(rect[2]), round(rect[3]))
        fitted = self._predictor(np.ascontiguousarray(frame_rgb), box)
        return np.array([(p.x, p.y) for p in fitted.parts()], dtype=np.float32)


PATCH_PX = 32


def patch(frame_rgb: np.ndarray, rect: Rect) -> np.ndarray:
    """The grey content of `rect` at 32², zero-mean and unit-norm (all zero where it is flat)."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    height, width = frame_rgb.shape[:2]
    x1, y1 = max(0, int(rect[0])), max(0, int(rect[1]))
    x2, y2 = min(width, int(np.ceil(rect[2]))), min(height, int(np.ceil(rect[3])))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return np.zeros(PATCH_PX * PATCH_PX, np.float32)
    grey = cv2.cvtColor(np.ascontiguousarray(frame_rgb[y1:y2, x1:x2]), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (PATCH_PX, PATCH_PX), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 1e-3 * PATCH_PX else np.zeros_like(small)


def points_extent(points: np.ndarray) -> Rect:
    return (
        float(points[:, 0].min()),
        float(points[:, 1].min()),
        float(points[:, 0].max()),
        float(points[:, 1].max()),
    )


def rect_relation(rect: Rect, points: np.ndarray) -> Rect:
    """The detector box relative to the landmarks' extent (each edge's offset over the extent's size)."""
    x1, y1, x2, y2 = points_extent(points)
    w, h = max(1.0, x2 - x1), max(1.0, y2 - y1)
    return ((rect[0] - x1) / w, (rect[1] - y1) / h, (rect[2] - x2) / w, (rect[3] - y2) / h)


def rect_from_points(points: np.ndarray, relation: Rect) -> Rect:
    """The detector box these landmarks imply, by a relation from `rect_relation`."""
    x1, y1, x2, y2 = points_extent(points)
    w, h = max(1.0, x2 - x1), max(1.0, y2 - y1)
    return (x1 + relation[0] * w, y1 + relation[1] * h, x2 + relation[2] * w, y2 + relation[3] * h)


def rect_iou(a: Rect, b: Rect) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class TrackStats:
    detections: int = 0  # detector runs, keyframes included
    tracked: int = 0  # frames whose landmarks came from the previous frame's
    without_face: int = 0


def track_landmarks(
    frames: np.ndarray,
    landmarker: FaceLandmarker,
    *,
    threads: int | None = None,
    on_frames: Callable[[int], None] | None = None,
    stats: TrackStats | None = None,
) -> list[np.ndarray | None]:
    """Landmarks `[68, 2]` (or None) of every frame of `frames` `[N, H, W, 3]`, by the module's rule."""
    count = len(frames)
    stats = stats if stats is not None else TrackStats()
    every = landmarker.settings.detect_every_frames
    keyframes = sorted({*range(0, count, every), count - 1}) if count else []
    workers = threads or prepare_threads()
    if workers > 1 and len(keyframes) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="landmark-detect") as pool:
            found = list(pool.map(lambda index: landmarker.detect(frames[index]), keyframes))
    else:
        found = [landmarker.detect(frames[index]) for index in keyframes]
    detections: dict[int, Rect | None] = dict(zip(keyframes, found, strict=True))
    stats.detections += len(keyframes)

    settings = landmarker.settings
    out: list[np.ndarray | None] = []
    previous: np.ndarray | None = None
    previous_patch: np.ndarray | None = None
    relation: Rect | None = None
    for index in range(count):
        frame = frames[index]
        rect = detections.get(index)
        points = None
        if rect is None and previous is not None and relation is not None and previous_patch is not None:
            tracked = rect_from_points(previous, relation)
            if float(patch(frame, tracked) @ previous_patch) >= settings.track_min_correlation:
                points = landmarker.shape(frame, tracked)
                if rect_iou(rect_from_points(points, relation), tracked) >= settings.track_min_iou:
                    rect = tracked
                    stats.tracked += 1
                else:
                    points = None
            if points is None:  # the face left the tracked box: look for it again
                rect = landmarker.detect(frame)
                stats.detections += 1
                if rect is not None:
                    points = landmarker.shape(frame, rect)
                    relation = rect_relation(rect, points)
        elif rect is None and index not in detections:  # no face in the previous frame: look again
            rect = landmarker.detect(frame)
            stats.detections += 1
            if rect is not None:
                points = landmarker.shape(frame, rect)
                relation = rect_relation(rect, points)
        elif rect is not None:  # this frame's own detection
            points = landmarker.shape(frame, rect)
            relation = rect_relation(rect, points)
        if points is None or rect is None:
            stats.without_face += 1
            previous, previous_patch = None, None
        else:
            previous, previous_patch = points, patch(frame, rect)
        out.append(points)
        if on_frames:
            on_frames(index + 1)
    return out
