"""The batched compositor against the per-face definition: F.interpolate the face into its crop box, blend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realtime.engine.avatar.face import lower_face_mask
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.musetalk.composite import Compositor, PasteJob, resize_matrix


def synthetic_avatar(key: str, frames: int, height: int, width: int, seed: int) -> Avatar:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    boxes = []
    for _ in range(frames):
        size = int(rng.integers(120, min(height, width) - 4))  # smaller and (below) larger than the 256² face
        x1 = int(rng.integers(0, width - size))
        y1 = int(rng.integers(0, height - size))
        boxes.append([x1, y1, x1 + size + int(rng.integers(-3, 4)), y1 + size])
    has_face = np.ones(frames, bool)
    has_face[-1] = False
    crop = np.asarray(boxes, np.int32)
    crop[-1] = -1
    return Avatar(
        key=key,
        digest_sha256=key,
        engine="musetalk",
        kind="frames_zip",
        cache_dir=Path("/nonexistent"),
        cache_hit=False,
        frames=images,
        face_boxes=crop.copy(),
        crop_boxes=crop,
        has_face=has_face,
        latents=None,
    )


def with_parsed_masks(avatar: Avatar, seed: int) -> Avatar:
    """`avatar` with random per-frame blend masks over its crop boxes (as preparation stores parsed ones)."""
    rng = np.random.default_rng(seed)
    heights = avatar.crop_boxes[:, 3] - avatar.crop_boxes[:, 1]
    widths = avatar.crop_boxes[:, 2] - avatar.crop_boxes[:, 0]
    masks = np.zeros((avatar.frame_count, int(heights.max()), int(widths.max())), np.uint8)
    for index in np.flatnonzero(avatar.has_face):
        masks[index, : heights[index], : widths[index]] = rng.integers(
            0, 256, (heights[index], widths[index])
        )
    return dataclasses.replace(avatar, blend_masks=masks, blend_mask="parsed:jaw")


def reference_paste(face: torch.Tensor, avatar: Avatar, frame: int, weight: float) -> np.ndarray:
    """The definition, one face at a time (what the compositor computed before it was batched)."""
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[frame])
    roi = torch.from_numpy(np.ascontiguousarray(avatar.frames[frame, y1:y2, x1:x2])).float()
    height, width = roi.shape[:2]
    resized = F.interpolate(
        face[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    if avatar.blend_masks is not None:  # the frame's own parsed mask, already at the box's size
        mask = torch.from_numpy(np.array(avatar.blend_masks[frame, :height, :width])).float() / 255.0
    else:
        mask = F.interpolate(
            torch.from_numpy(lower_face_mask())[None, None], size=(height, width), mode="bilinear"
        )[0, 0]
    out = roi + (resized[0].permute(1, 2, 0) * 255.0 - roi) * (mask * weight)[..., None]
    expected = np.array(avatar.frames[frame])
    expected[y1:y2, x1:x2] = out.round().clamp(0, 255).to(torch.uint8).numpy()
    return expected


@pytest.mark.parametrize(("src_px", "dst_px"), [(256, 173), (256, 256), (256, 301), (256, 1)])
@pytest.mark.parametrize("antialias", [True, False])
def test_resize_matrix_is_f_interpolate(src_px: int, dst_px: int, antialias: bool) -> None:
    image = torch.rand(1, 2, src_px, 40, dtype=torch.float64).float()
    expected = F.interpolate(
        image, size=(dst_px, 40), mode="bilinear", align_corners=False, antialias=antialias
    )
    matrix = torch.from_numpy(resize_matrix(src_px, dst_px, antialias))
    assert matrix.shape == (dst_px, src_px)
    torch.testing.assert_close(matrix @ image, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("parsed", ["none", "small", "both"])
def test_a_batch_of_two_avatars_pastes_like_one_face_at_a_time(parsed: str) -> None:
    small = synthetic_avatar("small", 5, 300, 280, seed=1)  # crop boxes of 120..276 px: the face shrinks
    large = synthetic_avatar("large", 4, 420, 460, seed=2)  # up to 412 px: the face grows
    if parsed != "none":  # parsed masks, alone or beside an ellipse avatar in the same call
        small = with_parsed_masks(small, seed=5)
    if parsed == "both":
        large = with_parsed_masks(large, seed=6)
    faces = torch.rand(9, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    # Interleaved avatars, a repeated frame, weights under and at 1: rows come back in the callers' order.
    plan = [
        (small, 0, 1.0),
        (large, 2, 0.4),
        (small, 3, 1.0),
        (large, 0, 1.0),
        (small, 0, 0.7),
        (large, 1, 1.0),
    ]
    jobs = [PasteJob(avatar, frame, row, weight) for row, (avatar, frame, weight) in enumerate(plan)]
    compositor = Compositor(torch.device("cpu"))

    frames = compositor.paste(faces, jobs)

    assert len(frames) == len(jobs)
    exact = total = 0
    for job, frame in zip(jobs, frames, strict=True):
        expected = reference_paste(faces[job.face_row], job.avatar, job.frame, job.weight)
        assert frame.shape == expected.shape and frame.dtype == np.uint8
        difference = np.abs(frame.astype(np.int16) - expected.astype(np.int16))
        assert difference.max() <= 1, "float rounding may flip a level, never more"
        exact += int((difference == 0).sum())
        total += difference.size
        x1, y1, x2, y2 = (int(v) for v in job.avatar.crop_boxes[job.frame])
        outside = np.ones(frame.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(frame[outside], job.avatar.frames[job.frame][outside]), (
            "nothing outside the box moves"
        )
    assert exact / total > 0.999


def test_forgetting_an_avatar_between_blend_and_assembly_is_harmless() -> None:
    avatar = synthetic_avatar("gone", 3, 300, 300, seed=4)
    compositor = Compositor(torch.device("cpu"))
    pending = compositor.paste_async(torch.rand(1, 3, 256, 256), [PasteJob(avatar, 1, 0, 1.0)])
    compositor.forget(avatar.key)  # the last session of this avatar ended meanwhile
    (frame,) = compositor.finish(pending)
    assert frame.shape == (300, 300, 3)


def test_no_jobs_paste_nothing() -> None:
    assert Compositor(torch.device("cpu")).paste(torch.rand(0, 3, 256, 256), []) == []


def test_warm_up_pastes_once_and_keeps_nothing() -> None:
    compositor = Compositor(torch.device("cpu"))
    compositor.warm_up(torch.rand(3, 3, 256, 256))
    assert compositor._avatars == {}


def test_staging_pool_reuses_the_smallest_fitting_buffer_and_keeps_the_largest_free_ones() -> None:
    """The compositor's pinned staging pool, on host memory: buffers of several sizes come back beyond the cap
    (what a render lane under load does: on the H200, list.remove on tensors failed 2,526 renders here)."""
    import torch

    from realtime.engine.device import StagingPool

    pool = StagingPool(torch.device("cpu"), max_free=2, headroom=1.0)
    buffers = [pool.take(numel) for numel in (300, 100, 200, 400)]
    assert [b.numel() for b in buffers] == [301, 101, 201, 401]  # none free yet: fresh ones, plus one byte
    for buffer in buffers:
        pool.give_back(buffer)  # the third and fourth overflow the cap: the smallest free one goes each time
    assert pool.free_numels == [301, 401]
    reused = pool.take(250)
    assert reused is buffers[0]  # the smallest one that fits
    assert pool.free_numels == [401]
    assert pool.take(500).numel() == 501  # nothing fits: a new one
