"""Parity with MuseTalk v1.5's blend mask and face box rules.

`upstream_*` below restate upstream's published rules step by step in the way upstream runs them
(PIL crops, resizes and pastes on a 512² parse; the box from 68 landmarks), written from its
description and checked against a reading of its code, not copied. The project's vectorised
versions (`realtime.engine.avatar.blend_mask`, `face.musetalk_box_from_landmarks`) must agree on
the same parse maps and landmarks: masks IoU >= 0.95, boxes within 2 px.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
from PIL import Image

from realtime.engine.avatar.blend_mask import (
    BlendMaskSettings,
    cut_padded,
    expanded_box,
    face_box_mask,
    region_from_labels,
)
from realtime.engine.avatar.face import Box, crop_box_v15, musetalk_box_from_landmarks

MASK_IOU_MIN = 0.95
BOX_TOLERANCE_PX = 2


# --- upstream's rules, restated -------------------------------------------------------------------


def upstream_jaw_region(labels: np.ndarray, cheek_width: int = 90) -> np.ndarray:
    """FaceParsing(mode="jaw") after the network: a 0/255 uint8 map."""
    size = 33
    kernel = np.zeros((size, size), np.uint8)
    middle = size // 2
    for row in range(21):  # the cone: nothing above row 10, then 1, 3, 5, ... px wide
        if row >= 10:
            width = 2 * (row - 10) + 1
            kernel[row, middle - width // 2 : middle + width // 2 + 1] = 1
    for row in range(21, size):  # the tail keeps the cone's last width
        kernel[row, middle - 10 : middle + 11] = 1
    cheek = np.zeros((512, 512), np.uint8)
    cv2.rectangle(cheek, (0, 0), (256 - cheek_width, 512), 255, -1)
    cv2.rectangle(cheek, (256 + cheek_width, 0), (512, 512), 255, -1)
    skin = (labels == 1).astype(np.uint8) * 255
    dilated = cv2.dilate(skin, kernel, iterations=1)
    eroded = cv2.erode(dilated, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), iterations=2)
    region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheek), cv2.bitwise_and(dilated, cv2.bitwise_not(cheek)))
    out = labels.astype(np.int32).copy()
    out[(region == 255) & (labels != 10)] = 255
    out[np.isin(labels, [11, 12, 13])] = 255
    out[out != 255] = 0
    return out.astype(np.uint8)


def upstream_mask(
    region512: np.ndarray, face_box: Box, expand: float = 1.5, blur: float = 0.1
) -> tuple[np.ndarray, Box]:
    """get_image_prepare_material's mask: (blurred mask over the expanded box, the expanded box)."""
    x, y, x1, y1 = face_box
    cx, cy = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    big = (cx - s, cy - s, cx + s, cy + s)
    side = 2 * s
    seg = Image.fromarray(region512).resize((side, side))  # PIL's default resample (bicubic)
    inner = (x - big[0], y - big[1], x1 - big[0], y1 - big[1])
    only_face = Image.new("L", (side, side), 0)
    only_face.paste(seg.crop(inner), inner)
    top = int(side * 0.5)
    lower = Image.new("L", (side, side), 0)
    lower.paste(only_face.crop((0, top, side, side)), (0, top))
    kernel = int(blur * side // 2 * 2) + 1
    return cv2.GaussianBlur(np.array(lower), (kernel, kernel), 0), big


def upstream_box(landmarks: np.ndarray) -> Box | None:
    """get_landmark_and_bbox's box from the 68 face keypoints (None: it would use the detector's box)."""
    points = landmarks.astype(np.int32)
    half_face = points[29].copy()
    half_dist = np.max(points[:, 1]) - half_face[1]
    upper = max(0, half_face[1] - half_dist)
    box = (int(np.min(points[:, 0])), int(upper), int(np.max(points[:, 0])), int(np.max(points[:, 1])))
    if box[3] - box[1] <= 0 or box[2] - box[0] <= 0 or box[0] < 0:
        return None
    return box


# --- inputs ---------------------------------------------------------------------------------------


def synthetic_parse(seed: int) -> np.ndarray:
    """A face-like 512² label map: hair, skin oval, nose, lips, mouth, neck, with random pose and size."""
    rng = np.random.default_rng(seed)
    labels = np.full((512, 512), 17, np.uint8)  # hair / background
    cx, cy = 256 + int(rng.integers(-30, 31)), 250 + int(rng.integers(-25, 26))
    ax, ay = int(rng.integers(120, 170)), int(rng.integers(150, 200))
    angle = float(rng.uniform(-15, 15))
    cv2.ellipse(labels, (cx, cy + ay), (ax // 2, 80), 0, 0, 360, 14, -1)  # neck
    cv2.ellipse(labels, (cx, cy), (ax, ay), angle, 0, 360, 1, -1)  # skin
    cv2.ellipse(labels, (cx, cy + 10), (18, 40), angle, 0, 360, 10, -1)  # nose
    mouth_y = cy + int(ay * 0.5)
    cv2.ellipse(labels, (cx, mouth_y - 6), (45, 9), angle, 0, 360, 12, -1)
    cv2.ellipse(labels, (cx, mouth_y + 6), (45, 10), angle, 0, 360, 13, -1)
    cv2.ellipse(labels, (cx, mouth_y), (40, 3), angle, 0, 360, 11, -1)
    return labels


@functools.cache  # one network run for every test that uses it (read-only)
def random_net_parse() -> np.ndarray:
    """Labels of the astronaut's face from a random-weight BiSeNet (random, but a real network's output)."""
    import torch
    from skimage.data import astronaut

    from realtime.engine.musetalk.weights.face_parse import FaceParser, build_bisenet

    torch.manual_seed(3)
    net = build_bisenet().eval()
    parser = FaceParser(net, torch.device("cpu"), torch.float32, "random", 0.0)
    labels = parser.labels([astronaut()[0:300, 100:400]])[0]
    # A random net rarely says "skin": take its most frequent label as skin so the jaw rule has work to do.
    values, counts = np.unique(labels, return_counts=True)
    return np.where(labels == values[np.argmax(counts)], 1, labels).astype(np.uint8)


FACE_BOXES: list[Box] = [
    (182, 140, 330, 318),  # inside a 512² frame
    (10, 20, 150, 190),  # the expanded box leaves the frame at the top left
    (400, 380, 505, 512),  # ... at the bottom right
    (200, 210, 291, 300),  # small, odd sizes
]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def upstream_plain_region(labels: np.ndarray, mode: str) -> np.ndarray:
    """FaceParsing(mode="raw" | "neck"): skin, mouth and lips (and the neck)."""
    keep = [1, 11, 12, 13] + ([14] if mode == "neck" else [])
    out = labels.astype(np.int32).copy()
    out[np.isin(labels, keep)] = 255
    out[out != 255] = 0
    return out.astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2, "net"])
def test_jaw_region_is_upstreams(seed: int | str) -> None:
    labels = random_net_parse() if seed == "net" else synthetic_parse(int(seed))
    np.testing.assert_array_equal(region_from_labels(labels, "jaw", 90), upstream_jaw_region(labels, 90))
    np.testing.assert_array_equal(region_from_labels(labels, "jaw", 60), upstream_jaw_region(labels, 60))


@pytest.mark.parametrize("mode", ["raw", "neck"])
def test_raw_and_neck_regions_are_upstreams(mode: str) -> None:
    labels = synthetic_parse(4)
    region = region_from_labels(labels, mode)
    np.testing.assert_array_equal(region, upstream_plain_region(labels, mode))
    assert (region[labels == 14] == 255).all() == (mode == "neck")


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of jaw, raw, neck"):
        BlendMaskSettings(mode="hair")
    with pytest.raises(ValueError, match="choose one of"):
        region_from_labels(synthetic_parse(0), "hair")


@pytest.mark.parametrize("seed", [0, 1, 2, "net"])
@pytest.mark.parametrize("face_box", FACE_BOXES)
@pytest.mark.parametrize("blur", [0.1, 0.05])  # the realtime script's preparation, the offline script's blend
def test_blend_mask_matches_upstream_within_iou(seed: int | str, face_box: Box, blur: float) -> None:
    labels = random_net_parse() if seed == "net" else synthetic_parse(int(seed))
    region = region_from_labels(labels, "jaw", 90)
    box = crop_box_v15(face_box, 512)  # upstream blends in the landmark box + extra_margin
    ours = face_box_mask(region, box, BlendMaskSettings(blur_fraction=blur))
    theirs_big, big = upstream_mask(upstream_jaw_region(labels), box, blur=blur)
    x1, y1, x2, y2 = box
    theirs = theirs_big[y1 - big[1] : y2 - big[1], x1 - big[0] : x2 - big[0]]
    assert ours.shape == theirs.shape == (y2 - y1, x2 - x1)
    # Upstream's blur also reaches past the face box, where its paste changes nothing (the original is there).
    assert (theirs > 127).mean() > 0.1  # a real mask, not two empty ones
    score = iou(ours > 127, theirs > 127)
    assert score >= MASK_IOU_MIN, f"IoU {score:.3f}"
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 8  # the soft edges agree too


def test_mask_rows_above_the_expanded_boxs_middle_are_never_repainted() -> None:
    box = (182, 140, 330, 318)
    mask = face_box_mask(np.full((512, 512), 255, np.uint8), box, BlendMaskSettings(blur_fraction=0.0))
    big = expanded_box(box, 1.5)
    middle = (big[1] + big[3]) // 2 - box[1]
    assert not mask[: middle - 1].any() and mask[middle + 1 :].all()


def test_expanded_crop_is_black_outside_the_frame() -> None:
    frame = np.full((100, 100, 3), 200, np.uint8)
    crop = cut_padded(frame, expanded_box((0, 0, 60, 60), 1.5))
    assert crop.shape == (90, 90, 3) and crop[:15, :15].max() == 0 and crop[50, 50, 0] == 200


def synthetic_landmarks(seed: int) -> np.ndarray:
    """68 iBUG landmarks of a face turned and tilted at random: jaw 0-16, brows 17-26, nose 27-35, eyes,
    mouth."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-1.0, 1.0, 17)
    jaw = np.stack([t * 1.0, 0.35 + 0.65 * np.sqrt(1 - 0.85 * t**2)], axis=1) * [70, 100]
    brows = np.stack([np.linspace(-0.8, 0.8, 10), np.full(10, -0.35)], axis=1) * [70, 100]
    nose = np.stack(
        [
            np.zeros(9) + np.r_[0, 0, 0, 0, -0.2, -0.1, 0, 0.1, 0.2],
            np.r_[-0.2, -0.05, 0.1, 0.25, 0.3, 0.32, 0.33, 0.32, 0.3],
        ],
        axis=1,
    ) * [70, 100]
    eyes = np.stack(
        [np.r_[np.linspace(-0.6, -0.2, 6), np.linspace(0.2, 0.6, 6)], np.full(12, -0.15)], axis=1
    ) * [
        70,
        100,
    ]
    angle = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    mouth = np.stack([0.35 * np.cos(angle), 0.55 + 0.08 * np.sin(angle)], axis=1) * [70, 100]
    points = np.concatenate([jaw, brows, nose, eyes, mouth])
    assert points.shape == (68, 2)
    yaw = float(rng.uniform(0.7, 1.0))  # a turned head: narrower
    roll = np.deg2rad(float(rng.uniform(-20, 20)))
    rotation = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    scaled = points * [yaw * float(rng.uniform(1.2, 1.8)), float(rng.uniform(1.2, 1.8))]
    return (
        scaled @ rotation.T
        + [float(rng.uniform(200, 300)), float(rng.uniform(150, 220))]
        + rng.normal(0, 1.5, (68, 2))
    )


@pytest.mark.parametrize("seed", range(8))
def test_landmark_box_matches_upstream(seed: int) -> None:
    landmarks = synthetic_landmarks(seed)
    ours, theirs = musetalk_box_from_landmarks(landmarks, 512), upstream_box(landmarks)
    assert ours is not None and theirs is not None
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= BOX_TOLERANCE_PX


def test_unusable_landmarks_give_no_box() -> None:
    landmarks = synthetic_landmarks(0)
    landmarks[:, 0] -= landmarks[:, 0].min() + 5  # left of the frame: upstream keeps its detector box
    assert musetalk_box_from_landmarks(landmarks, 512) is None and upstream_box(landmarks) is None
    with pytest.raises(ValueError, match="68"):
        musetalk_box_from_landmarks(landmarks[:60], 512)
