"""Avatar preparation on a real face: order, boxes, v1.5 crops, latents, cache, progress, bad inputs."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from realtime.engine.avatar.face import EXTRA_MARGIN_PX
from realtime.engine.avatar.prepare import FACE_BOX_LANDMARKS
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.avatar.source import decode_source
from realtime.engine.errors import (
    AvatarMixedSizes,
    AvatarNoFace,
    AvatarNoImages,
    AvatarNoVideoStream,
    AvatarUnreadableImage,
    AvatarUnsupported,
)
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.preview import PreviewEngine
from realtime.host import PrepareProgress
from tests.support.engine_media import astronaut_frames, frames_zip, idle_video, png_bytes


def test_zip_frames_come_in_natural_order(frames: list[np.ndarray], avatar_zip: bytes) -> None:
    decoded = decode_source(avatar_zip)
    assert [name.rsplit("/", 1)[-1] for name in decoded.names][:3] == [
        "frame_1.png",
        "frame_2.png",
        "frame_3.png",
    ]
    assert decoded.names[9].endswith("frame_10.png")
    for ours, original in zip(decoded.frames, frames, strict=True):
        np.testing.assert_array_equal(ours, original)


def test_musetalk_avatar_has_faces_v15_crops_and_latents(
    musetalk_avatar: Avatar, frames: list[np.ndarray]
) -> None:
    avatar = musetalk_avatar
    assert avatar.frame_count == len(frames) and (avatar.height_px, avatar.width_px) == frames[0].shape[:2]
    assert avatar.has_face.all()
    face, crop = avatar.face_boxes, avatar.crop_boxes
    np.testing.assert_array_equal(crop[:, :3], face[:, :3])
    np.testing.assert_array_equal(crop[:, 3], np.minimum(face[:, 3] + EXTRA_MARGIN_PX, avatar.height_px))
    # The astronaut's face (nose tip near (117, 84) in the 256 px frame) lies inside every box.
    assert np.all((face[:, 0] < 105) & (face[:, 2] > 130) & (face[:, 1] < 70) & (face[:, 3] > 100))
    assert avatar.latents is not None and avatar.latents.shape == (len(frames), 8, 32, 32)
    assert np.isfinite(avatar.latents.astype(np.float32)).all()
    # Masked half and reference half differ (the lower half of the crop was blacked out).
    assert not np.allclose(avatar.latents[:, :4], avatar.latents[:, 4:])


def test_second_prepare_of_the_same_bytes_is_a_cache_hit(
    preview_engine: PreviewEngine, frames: list[np.ndarray]
) -> None:
    data = frames_zip(frames[:5])
    progress: list[PrepareProgress] = []
    first = preview_engine.prepare_avatar(data, on_progress=progress.append)
    assert not first.cache_hit
    assert [p.frames_done for p in progress] == [1, 2, 3, 4, 5] and {p.frames_total for p in progress} == {5}
    again: list[PrepareProgress] = []
    second = preview_engine.prepare_avatar(data, on_progress=again.append)
    assert second.cache_hit and second.key == first.key and second.cache_dir == first.cache_dir
    assert first.face_box_source == FACE_BOX_LANDMARKS
    assert again == [PrepareProgress(5, 5, FACE_BOX_LANDMARKS)]
    np.testing.assert_array_equal(second.frames, first.frames)
    other = preview_engine.prepare_avatar(frames_zip(frames[:4]))
    assert not other.cache_hit and other.key != first.key


def test_musetalk_progress_counts_detection_encoding_and_parsing(
    musetalk_engine: MuseTalkEngine, frames: list[np.ndarray]
) -> None:
    progress: list[PrepareProgress] = []
    avatar = musetalk_engine.prepare_avatar(frames_zip(frames[:3]), on_progress=progress.append)
    assert not avatar.cache_hit and avatar.blend_mask == "parsed:jaw"
    done = [p.frames_done for p in progress]
    assert done == sorted(done) and done[-1] == 9 and {p.frames_total for p in progress} == {9}
    assert 6 in done  # encoding finished before parsing started


def test_idle_video_is_decoded_with_pyav(
    preview_engine: PreviewEngine, frames: list[np.ndarray], tmp_path: Path
) -> None:
    video = idle_video(frames[:6], tmp_path / "idle.mp4")
    avatar = preview_engine.prepare_avatar(video)
    assert avatar.kind == "idle_video" and avatar.frame_count == 6 and avatar.has_face.all()


def test_manifest_boxes_win_over_detection(preview_engine: PreviewEngine, frames: list[np.ndarray]) -> None:
    boxes = {f"frame_{i}.png": [60, 40, 160, 150] for i in range(1, 4)}
    avatar = preview_engine.prepare_avatar(frames_zip(frames[:3], manifest={"face_boxes": boxes}))
    np.testing.assert_array_equal(avatar.face_boxes, [[60, 40, 160, 150]] * 3)
    np.testing.assert_array_equal(avatar.crop_boxes, [[60, 40, 160, 160]] * 3)


def test_frames_without_a_face_keep_their_alignment(
    preview_engine: PreviewEngine, frames: list[np.ndarray]
) -> None:
    blank = np.full_like(frames[0], 128)
    mixed = frames[:2] + [blank] * 7 + frames[2:4]  # frames 2..8 have no face
    avatar = preview_engine.prepare_avatar(frames_zip(mixed))
    # A frame at most 3 frames from a detection borrows that box; frame 5 (4 away) keeps none.
    assert avatar.has_face.tolist() == [True] * 5 + [False] + [True] * 5
    np.testing.assert_array_equal(avatar.face_boxes[5], [-1, -1, -1, -1])
    np.testing.assert_array_equal(avatar.face_boxes[4], avatar.face_boxes[1])
    np.testing.assert_array_equal(avatar.frames[5], blank)
    np.testing.assert_array_equal(avatar.frames[9], frames[2])  # still the 10th image, not shifted


def test_ping_pong_cycle() -> None:
    from realtime.engine.avatar.prepared import Avatar

    avatar = Avatar(
        "k", "d", "preview", "frames_zip", Path("."), False,
        np.zeros((3, 64, 64, 3), np.uint8), np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32),
        np.ones(3, bool), None,
    )  # fmt: skip
    assert avatar.cycle_length == 6
    assert [avatar.frame_at(i) for i in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def test_zip_without_images(preview_engine: PreviewEngine) -> None:
    with pytest.raises(AvatarNoImages) as excinfo:
        preview_engine.prepare_avatar(_zip({"readme.txt": b"hello", "frames/": b""}))
    assert excinfo.value.code == "avatar_no_images"


def test_zip_with_mixed_sizes(preview_engine: PreviewEngine, frames: list[np.ndarray]) -> None:
    data = _zip({"1.png": png_bytes(frames[0]), "2.png": png_bytes(frames[1][:200, :200])})
    with pytest.raises(AvatarMixedSizes) as excinfo:
        preview_engine.prepare_avatar(data)
    assert excinfo.value.code == "avatar_mixed_sizes" and "2.png is 200x200" in excinfo.value.message


def test_zip_with_an_unreadable_image(preview_engine: PreviewEngine, frames: list[np.ndarray]) -> None:
    data = _zip({"1.png": png_bytes(frames[0]), "2.png": b"\x89PNG\r\n\x1a\n garbage"})
    with pytest.raises(AvatarUnreadableImage) as excinfo:
        preview_engine.prepare_avatar(data)
    assert excinfo.value.code == "avatar_unreadable_image" and "2.png" in excinfo.value.message


def test_no_face_in_any_frame(preview_engine: PreviewEngine) -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    with pytest.raises(AvatarNoFace) as excinfo:
        preview_engine.prepare_avatar(frames_zip(noise))
    assert excinfo.value.code == "avatar_no_face" and "3 frames" in excinfo.value.message


def test_video_without_a_video_stream(preview_engine: PreviewEngine, tmp_path: Path) -> None:
    import subprocess

    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "no video here"], check=True, timeout=60)
    with pytest.raises(AvatarNoVideoStream) as excinfo:
        preview_engine.prepare_avatar(wav)
    assert excinfo.value.code == "avatar_no_video_stream"


def test_bytes_that_are_no_avatar_at_all(preview_engine: PreviewEngine) -> None:
    with pytest.raises(AvatarUnsupported) as excinfo:
        preview_engine.prepare_avatar(b"this is not a zip, an image or a video" * 10)
    assert excinfo.value.code == "avatar_unsupported"


def test_a_single_image_is_a_one_frame_avatar(preview_engine: PreviewEngine) -> None:
    avatar = preview_engine.prepare_avatar(png_bytes(astronaut_frames(1)[0]))
    assert avatar.kind == "image" and avatar.frame_count == 1 and avatar.cycle_length == 2


def test_pooled_detection_finds_the_same_boxes_in_order(frames: list[np.ndarray]) -> None:
    from realtime.engine.avatar.face import DetectorConfig, detect_faces, detection_workers

    stack = np.stack(frames[:5])
    progress: list[int] = []
    serial = detect_faces(stack, DetectorConfig(), 1)
    pooled = detect_faces(stack, DetectorConfig(), 2, progress.append)
    assert pooled == serial and all(box is not None for box in serial)
    assert progress == sorted(progress) and progress[-1] == 5
    assert detection_workers(3) == 1  # short avatars: no processes started


def test_detection_falls_back_to_this_process_when_workers_cannot_start() -> None:
    import subprocess
    import sys

    # A main module read from stdin cannot be imported again by a spawned worker: the pool breaks at start.
    script = (
        "import numpy as np, cv2\n"
        "from skimage.data import astronaut\n"
        "from realtime.engine.avatar.face import DetectorConfig, detect_faces\n"
        "frame = cv2.resize(astronaut(), (256, 256))\n"
        "print(detect_faces(np.stack([frame] * 2), DetectorConfig(), 2))\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120, check=True
    )
    assert "None" not in done.stdout and done.stdout.count("(") == 2
    assert "detecting in this process" in done.stderr
