"""activities.validate on crafted archives and videos (the session-level cases live in tests/workflows)."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from activities.errors import AssetError
from activities.validate import (
    FramesReport,
    detect_face,
    natural_key,
    validate_frames_zip,
    validate_idle_video,
)
from bench.face_box import astronaut_variants
from tests.support import media
from tests.support.temporal_harness import fast_policy
from workflows.contracts import ErrorCode
from workflows.policy import SessionPolicy


def write(tmp_path: Path, data: bytes, name: str = "avatar.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check_zip(policy: SessionPolicy, path: Path) -> FramesReport:
    return validate_frames_zip(path, policy.assets.zip, policy.assets.frames)


def refused(policy: SessionPolicy, path: Path) -> AssetError:
    with pytest.raises(AssetError) as failure:
        check_zip(policy, path)
    assert not failure.value.retryable
    return failure.value


def test_good_zip_reports_frames_size_and_face(policy: SessionPolicy, tmp_path: Path) -> None:
    report = check_zip(policy, write(tmp_path, media.frames_zip(count=12, side_px=128)))
    assert (report.frame_count, report.width_px, report.height_px) == (12, 128, 128)
    assert report.face is not None
    # The astronaut's face sits in the upper middle of the crop.
    assert 20 < report.face.x_px + report.face.width_px / 2 < 108 and report.face.y_px < 64


def test_a_tilted_face_the_cascade_misses_is_found_as_preparation_finds_it(
    policy: SessionPolicy, tmp_path: Path
) -> None:
    """Validation must not refuse an avatar that preparation (the landmark detector) accepts."""
    frame = astronaut_variants()["tilted-right"]
    assert detect_face(frame) is None  # the frontal cascade alone misses this head
    report = check_zip(policy, write(tmp_path, media.zip_of({"0001.png": media.png(frame)})))
    assert report.face is not None
    # The astronaut's face, not the suit: its centre in the upper middle of the frame.
    assert 180 < report.face.x_px + report.face.width_px / 2 < 280 and report.face.y_px < 120


def test_natural_order() -> None:
    names = ["f10.png", "f2.png", "f1.png", "F3.png"]
    assert sorted(names, key=natural_key) == ["f1.png", "f2.png", "F3.png", "f10.png"]


def test_archiver_debris_and_manifest_are_accepted(policy: SessionPolicy, tmp_path: Path) -> None:
    frame = media.png(media.astronaut_frame())
    data = media.zip_of(
        {
            "frames/frame_1.png": frame,
            "__MACOSX/frames/._frame_1.png": b"resource fork",
            "frames/.DS_Store": b"\x00\x01",
            "avatar.json": b'{"face_boxes": []}',
        }
    )
    assert check_zip(policy, write(tmp_path, data)).frame_count == 1


def test_manifest_must_be_json(policy: SessionPolicy, tmp_path: Path) -> None:
    data = media.zip_of({"frame_1.png": media.png(media.astronaut_frame()), "avatar.json": b"{not json"})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.AVATAR_MANIFEST_INVALID


@pytest.mark.parametrize("name", ["/etc/cron.d/x.png", "a/../../x.png", "..\\..\\x.png", "C:/Windows/x.png"])
def test_traversal_names(policy: SessionPolicy, tmp_path: Path, name: str) -> None:
    data = media.zip_of({name: media.png(media.astronaut_frame())})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.ZIP_PATH_TRAVERSAL


@pytest.mark.parametrize("second", ["frame_1.png", "./frame_1.png", "FRAME_1.PNG"])
def test_duplicate_entries(policy: SessionPolicy, tmp_path: Path, second: str) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")
        archive.writestr("frame_1.png", media.png(media.astronaut_frame()))
        archive.writestr(second, media.png(media.astronaut_frame(shift_px=3)))
    assert refused(policy, write(tmp_path, buffer.getvalue())).code is ErrorCode.ZIP_DUPLICATE_ENTRY


def test_encrypted_entry(policy: SessionPolicy, tmp_path: Path) -> None:
    # zipfile never writes encrypted entries: set the "encrypted" flag in both headers by hand.
    data = bytearray(media.zip_of({"frame_1.png": media.png(media.astronaut_frame())}))
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    assert refused(policy, write(tmp_path, bytes(data))).code is ErrorCode.ZIP_ENCRYPTED


def test_overall_ratio_counts_many_small_bombs(policy: SessionPolicy, tmp_path: Path) -> None:
    # Each entry is under the per-entry threshold, together they inflate far past the ratio.
    data = media.zip_of({f"frame_{i}.png": bytes(900_000) for i in range(4)})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.ZIP_BOMB_RATIO


@pytest.mark.parametrize("side_px", [5_000, 40_000])  # over our side limit / over Pillow's own bomb limit
def test_pixel_bomb_is_refused_from_its_header(policy: SessionPolicy, tmp_path: Path, side_px: int) -> None:
    """A tiny PNG whose header claims side_px² pixels: refused before a single pixel is allocated."""
    png = bytearray(media.png(media.astronaut_frame()))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    png[ihdr : ihdr + 8] = struct.pack(">II", side_px, side_px)
    crc = zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13]))
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    data = media.zip_of({"frame_1.png": bytes(png)})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.FRAME_TOO_LARGE


def test_not_an_image_in_disguise(policy: SessionPolicy, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    gif = io.BytesIO()
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(gif, format="GIF")
    data = media.zip_of({"frame_1.png": gif.getvalue()})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.ZIP_NON_IMAGE_ENTRY


def test_good_video_reports_frames_and_rate(policy: SessionPolicy, tmp_path: Path) -> None:
    path = write(tmp_path, media.idle_video_bytes(tmp_path, count=12, side_px=128), "idle.mp4")
    report = validate_idle_video(path, policy.assets.video, policy.assets.frames)
    assert (report.frame_count, report.width_px, report.height_px) == (12, 128, 128)
    assert report.fps == pytest.approx(25.0) and report.face is not None


def test_video_that_changes_size_midway_is_refused(policy: SessionPolicy, tmp_path: Path) -> None:
    path = write(tmp_path, media.resizing_video_bytes(tmp_path), "idle.ts")
    with pytest.raises(AssetError) as failure:
        validate_idle_video(path, policy.assets.video, policy.assets.frames)
    assert failure.value.code is ErrorCode.MIXED_FRAME_SIZES
    assert "96x96 after 128x128" in str(failure.value)


def test_video_too_long(policy: SessionPolicy, tmp_path: Path) -> None:
    import dataclasses

    path = write(tmp_path, media.idle_video_bytes(tmp_path, count=30, side_px=128), "idle.mp4")
    short = dataclasses.replace(policy.assets.video, max_duration_s=0.5)
    with pytest.raises(AssetError) as failure:
        validate_idle_video(path, short, policy.assets.frames)
    assert failure.value.code is ErrorCode.VIDEO_TOO_LONG


def test_too_many_entries_is_refused_before_reading_any(tmp_path: Path) -> None:
    policy = fast_policy(assets__zip__max_entries=3)
    data = media.zip_of({f"frame_{i}.png": media.png(media.astronaut_frame()) for i in range(1, 5)})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.ZIP_TOO_MANY_ENTRIES


def test_entry_whose_bytes_do_not_match_its_crc_is_corrupt(policy: SessionPolicy, tmp_path: Path) -> None:
    frame = media.png(media.astronaut_frame())
    data = bytearray(media.zip_of({"frame_1.png": frame}, compression=zipfile.ZIP_STORED))
    start = data.index(frame)
    data[start + len(frame) // 2] ^= 0xFF  # one flipped byte in the stored image
    assert refused(policy, write(tmp_path, bytes(data))).code is ErrorCode.ZIP_CORRUPT


def test_zip_without_frames(policy: SessionPolicy, tmp_path: Path) -> None:
    data = media.zip_of({"avatar.json": b"{}", "__MACOSX/._x.png": b"fork", "frames/": b""})
    assert refused(policy, write(tmp_path, data)).code is ErrorCode.NO_FRAMES
