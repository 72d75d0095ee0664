"""Upstream's landmark face box on a real face: dlib's 68 landmarks → the v1.5 box rule, tracking between
detections, smoothing, and the cascade fallback.

The real face is the astronaut photo, frontal and warped into tilted (roll) and turned (a perspective
squeeze of one side, as a yaw does) variants. Each avatar's boxes must be within 2 px of upstream's rule
(restated independently in test_v15_parity) applied to the same landmarks, and agree with the cascade
box where both describe the same face.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from bench.face_box import astronaut_variants, box_iou, tilted
from realtime.engine.avatar.face import Box, FaceDetector, smooth_boxes
from realtime.engine.avatar.landmarks import (
    FaceLandmarker,
    LandmarkSettings,
    TrackStats,
    landmark_availability,
    track_landmarks,
)
from realtime.engine.avatar.prepare import (
    FACE_BOX_CASCADE,
    FACE_BOX_LANDMARKS,
    PrepareSettings,
    _cascade_where_no_landmarks,
    planned_face_box_source,
    prepare_avatar,
)
from tests.realtime.engine.test_v15_parity import BOX_TOLERANCE_PX, upstream_box
from tests.support.engine_media import frames_zip

VARIANTS = astronaut_variants()


def moving(image: np.ndarray, count: int) -> list[np.ndarray]:
    """`image` drifting by a few pixels per frame (a still head breathing)."""
    out = []
    for k in range(count):
        phase = 2 * np.pi * k / count
        shift = np.array([[1, 0, 3.0 * np.sin(phase)], [0, 1, 2.0 * np.cos(phase)]], np.float32)
        out.append(
            cv2.warpAffine(image, shift, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)
        )
    return out


@functools.cache
def landmarker() -> FaceLandmarker:
    availability = landmark_availability()
    assert availability.usable, availability.why  # installed with the project (pyproject + constraints)
    assert availability.model_file is not None
    return FaceLandmarker(availability.model_file)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_landmark_box_on_a_real_face_is_upstreams_rule_and_agrees_with_the_cascade(
    variant: str, tmp_path: Path
) -> None:
    frames = moving(VARIANTS[variant], 6)
    avatar = prepare_avatar(frames_zip(frames), engine="preview", engine_version="t", cache_root=tmp_path)
    assert avatar.face_box_source == FACE_BOX_LANDMARKS and avatar.has_face.all()
    assert avatar.landmarks is not None and np.isfinite(avatar.landmarks).all()
    for index, frame in enumerate(frames):
        x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[index])
        ours = (x1, y1, x2, y2)
        theirs = upstream_box(avatar.landmarks[index])
        assert theirs is not None
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= BOX_TOLERANCE_PX, (
            index,
            ours,
            theirs,
        )
        # The nose (landmark 30) sits in the box's middle rows, the mouth corners (48, 54) in its lower half.
        nose_y, mouth_y = avatar.landmarks[index][30, 1], avatar.landmarks[index][[48, 54], 1].mean()
        height = ours[3] - ours[1]
        assert ours[1] + 0.4 * height < nose_y < ours[1] + 0.65 * height
        assert ours[1] + 0.6 * height < mouth_y < ours[3]
        cascade = FaceDetector().detect(frame)
        assert cascade is not None
        # Same face: the boxes overlap, their sides agree and their centres lie close (the cascade maps a
        # detector box with fixed proportions, so its top and bottom are known to sit up to ~20 px off).
        assert box_iou(ours, cascade) > 0.5, (ours, cascade)
        assert abs(ours[0] - cascade[0]) <= 12 and abs(ours[2] - cascade[2]) <= 12, (ours, cascade)
        centre_dx = (ours[0] + ours[2] - cascade[0] - cascade[2]) / 2
        centre_dy = (ours[1] + ours[3] - cascade[1] - cascade[3]) / 2
        assert np.hypot(centre_dx, centre_dy) <= 0.15 * height, (ours, cascade)


def test_tracked_landmarks_match_detecting_every_frame() -> None:
    """A head tilting and drifting: detecting every 5th frame and tracking between gives the boxes that
    detecting every frame gives."""
    image = astronaut()
    frames = np.stack([tilted(frame, 1.5 * k) for k, frame in enumerate(moving(image, 10))])
    stats = TrackStats()
    tracked = track_landmarks(frames, landmarker(), threads=2, stats=stats)
    assert stats.tracked >= 6 and stats.detections <= 4 and stats.without_face == 0
    model = landmark_availability().model_file
    assert model is not None
    every = FaceLandmarker(model, LandmarkSettings(detect_every_frames=1))
    detected = track_landmarks(frames, every, threads=1)
    for ours, reference in zip(tracked, detected, strict=True):
        assert ours is not None and reference is not None
        box, reference_box = upstream_box(ours), upstream_box(reference)
        assert box is not None and reference_box is not None
        assert max(abs(a - b) for a, b in zip(box, reference_box, strict=True)) <= 4, (box, reference_box)


def test_a_cut_is_detected_again_not_tracked() -> None:
    """The same person, then (a cut) the picture mirrored: the boxes follow the cut at once."""
    image = astronaut()
    mirrored = np.ascontiguousarray(image[:, ::-1])
    frames = np.stack([image, image, image, mirrored, mirrored])
    points = track_landmarks(frames, landmarker(), threads=1)
    boxes = [upstream_box(p) if p is not None else None for p in points]
    assert all(box is not None for box in boxes)
    left, right = boxes[2], boxes[3]
    assert left is not None and right is not None
    assert abs((512 - right[2]) - left[0]) <= 6 and abs((512 - right[0]) - left[2]) <= 6


def test_smoothing_damps_jitter_within_two_pixels_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    still: list[Box | None] = [
        (100 + int(d[0]), 50 + int(d[1]), 200 + int(d[2]), 180 + int(d[3]))
        for d in rng.integers(-3, 4, (30, 4))
    ]
    smoothed = smooth_boxes(still, 5, 2)
    raw = np.array(still, dtype=float)
    out = np.array(smoothed, dtype=float)
    assert np.abs(out - raw).max() <= 2
    assert np.abs(np.diff(out, axis=0)).mean() < 0.6 * np.abs(np.diff(raw, axis=0)).mean()
    moving_boxes: list[Box | None] = [(10 * k, 0, 10 * k + 100, 120) for k in range(10)]
    assert smooth_boxes(moving_boxes, 5, 2)[2:-2] == moving_boxes[2:-2]  # a linear motion's mean is itself
    # A faceless frame breaks the window: nothing is borrowed across it.
    gap: list[Box | None] = [(0, 0, 100, 100), (0, 0, 100, 100), None, (4, 4, 104, 104), (4, 4, 104, 104)]
    assert smooth_boxes(gap, 5, 2) == gap


def test_cascade_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = moving(astronaut(), 3)
    avatar = prepare_avatar(
        frames_zip(frames),
        engine="preview",
        engine_version="t",
        cache_root=tmp_path,
        settings=PrepareSettings(face_box="cascade"),
    )
    assert avatar.face_box_source == FACE_BOX_CASCADE and avatar.landmarks is None and avatar.has_face.all()
    real_find_spec = importlib.util.find_spec

    def without_dlib(name: str, *args: Any) -> Any:
        return None if name == "dlib" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_dlib)
    availability = landmark_availability()
    assert not availability.usable and "dlib-bin" in availability.why
    assert planned_face_box_source(PrepareSettings()) == FACE_BOX_CASCADE


def test_settings_refuse_unknown_values() -> None:
    with pytest.raises(ValueError, match="face_box 'dwpose'"):
        PrepareSettings(face_box="dwpose")
    with pytest.raises(ValueError, match="detect_every_frames"):
        LandmarkSettings(detect_every_frames=0)


def test_cascade_takes_over_where_the_landmark_model_finds_no_face(tmp_path: Path) -> None:
    """A detector window larger than the downscaled face: the landmark model finds nothing, so every box is
    the cascade's (and the avatar says so)."""
    frames = moving(astronaut(), 3)
    blind = PrepareSettings(landmarks=LandmarkSettings(detection_max_side_px=80))
    avatar = prepare_avatar(
        frames_zip(frames), engine="preview", engine_version="t", cache_root=tmp_path, settings=blind
    )
    assert avatar.face_box_source == FACE_BOX_CASCADE and avatar.landmarks is None and avatar.has_face.all()
    cascade = FaceDetector().detect(frames[0])
    assert cascade is not None and tuple(int(v) for v in avatar.face_boxes[0]) == cascade


def test_frames_without_landmarks_fall_back_to_the_cascade_per_frame() -> None:
    """Landmark boxes stay; a frame with none borrows a neighbour's within the gap, else the cascade's."""
    image = astronaut()
    frames = np.stack([image] * 6)
    mark: Box = (1, 2, 3, 4)  # not a box any detector gives: shows which frames kept theirs
    boxes: list[Box | None] = [mark, None, None, None, None, None]
    out = _cascade_where_no_landmarks(boxes, frames, PrepareSettings(max_gap_frames=2))
    cascade = FaceDetector().detect(image)
    assert out[:3] == [mark, None, None]  # within the gap: left for fill_missing to lend the landmark box
    assert out[3:] == [cascade] * 3
