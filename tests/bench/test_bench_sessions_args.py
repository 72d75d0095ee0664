"""bench.sessions' frame sizes: N or WxH, even and >= 16 px (what video encoders take), and the avatar at that
size."""

from __future__ import annotations

import argparse
import io
import zipfile

import cv2
import numpy as np
import pytest

from bench.sessions import avatar_zip, frame_px


@pytest.mark.parametrize(
    ("text", "size"), [("512", (512, 512)), ("512x512", (512, 512)), ("1280X720", (1280, 720))]
)
def test_frame_sizes_are_a_side_or_width_by_height(text: str, size: tuple[int, int]) -> None:
    assert frame_px(text) == size


@pytest.mark.parametrize("text", ["", "wide", "1280x", "1280x720x2", "8x8", "513x512", "-512"])
def test_other_frame_sizes_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"N or WxH"):
        frame_px(text)


def test_a_wide_avatar_keeps_the_face_square_and_reflects_the_sides() -> None:
    with zipfile.ZipFile(io.BytesIO(avatar_zip(320, 180, count=2))) as archive:
        names = archive.namelist()
        decoded = [cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_COLOR) for n in names]
    frames = [frame for frame in decoded if frame is not None]
    assert len(frames) == 2
    assert all(frame.shape == (180, 320, 3) for frame in frames)
    # The middle 180 columns are the square photo; the 70 columns either side mirror its edges.
    frame = frames[0]
    assert np.array_equal(frame[:, 69::-1], frame[:, 70:140])
