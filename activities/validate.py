"""Validate a downloaded avatar before any GPU host touches it: a frames zip or an idle video.

Zip: entry count, path traversal, symlinks, encryption, duplicates, non-image entries, bomb
limits (uncompressed total and per-entry/overall ratio), then every frame is decoded:
one size for all, sides within limits, a face on the first frame. Python's zipfile never
inflates an entry past its declared size (it stops and fails the CRC), so the declared sizes
checked up front bound what decoding reads. Images are opened header-first (Pillow) and
their dimensions checked before pixels are decoded, so a small PNG claiming 50 000² pixels
is refused without allocating them.

Video: PyAV must find a video stream and decode every frame within the frame/duration limits.

Every refusal is an AssetError with a reason code (non-retryable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import data as skdata
from skimage.feature import Cascade
from skimage.transform import rescale

from activities.errors import AssetError
from realtime.engine.avatar.landmarks import detect_face_rect, landmark_availability
from realtime.engine.avatar.source import IGNORED_ENTRY
from workflows.contracts import ErrorCode, FaceBox
from workflows.policy import FrameLimits, VideoLimits, ZipLimits

logger = logging.getLogger(__name__)

# The formats and the optional manifest the engine reads (realtime/engine/avatar/source.py).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "WEBP", "TIFF"})
MANIFEST_NAME = "avatar.json"  # optional face boxes
MAX_MANIFEST_BYTES = 1 << 20
RATIO_CHECK_MIN_BYTES = 1 << 20  # tiny entries compress well legitimately; bombs are big
_FACE_SEARCH_SIDE_PX = 512  # detect on a copy this size at most (speed); boxes are scaled back


@dataclass(frozen=True)
class FramesReport:
    frame_count: int
    width_px: int
    height_px: int
    face: FaceBox | None
    fps: float | None = None


def natural_key(name: str) -> list[int | str]:
    """frame2.png before frame10.png (the order a person numbered them in)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def validate_frames_zip(path: Path, zip_limits: ZipLimits, frame_limits: FrameLimits) -> FramesReport:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise AssetError(ErrorCode.NOT_A_ZIP, f"the avatar is not a readable zip archive: {exc}") from exc
    with archive:
        names = _check_entries(archive, zip_limits, frame_limits)
        return _check_frames(archive, names, frame_limits)


def _check_entries(archive: zipfile.ZipFile, zip_limits: ZipLimits, frame_limits: FrameLimits) -> list[str]:
    infos = archive.infolist()
    if len(infos) > zip_limits.max_entries:
        raise AssetError(
            ErrorCode.ZIP_TOO_MANY_ENTRIES,
            f"the zip has {len(infos)} entries; the limit is {zip_limits.max_entries}",
        )
    seen: set[str] = set()
    frames: list[str] = []
    total_uncompressed = 0
    total_compressed = 0
    for info in infos:
        name = info.filename
        _check_name(name)
        # `a.png`, `./a.png` and `A.png` are one file once extracted (on a case-insensitive
        # disk too): two of them would make the frame order depend on which one a reader picks.
        key = posixpath.normpath(name.replace("\\", "/")).casefold()
        if key in seen:
            raise AssetError(
                ErrorCode.ZIP_DUPLICATE_ENTRY,
                f"the zip names {name!r} twice (or under another spelling)",
            )
        seen.add(key)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise AssetError(
                ErrorCode.ZIP_SYMLINK,
                f"entry {name!r} is a symbolic link; links are not accepted",
            )
        if info.flag_bits & 0x1:
            raise AssetError(ErrorCode.ZIP_ENCRYPTED, f"entry {name!r} is encrypted")
        # The engine's own rule for entries it skips (archivers' metadata, hidden files): a frame counted here
        # is a frame the sidecar plays.
        if info.is_dir() or IGNORED_ENTRY.search(name):
            continue
        total_uncompressed += info.file_size
        total_compressed += info.compress_size
        if total_uncompressed > zip_limits.max_uncompressed_bytes:
            raise AssetError(
                ErrorCode.ZIP_TOO_LARGE,
                f"the zip inflates to more than {zip_limits.max_uncompressed_bytes} bytes (limit)",
            )
        if info.file_size >= RATIO_CHECK_MIN_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > zip_limits.max_compression_ratio:
                raise AssetError(
                    ErrorCode.ZIP_BOMB_RATIO,
                    f"entry {name!r} inflates {ratio:.0f}x ({info.file_size} bytes); the limit is "
                    f"{zip_limits.max_compression_ratio:g}x",
                )
        if posixpath.basename(name) == MANIFEST_NAME:
            _check_manifest(archive, info)
            continue
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise AssetError(
                ErrorCode.ZIP_NON_IMAGE_ENTRY,
                f"entry {name!r} is not a frame image (expected {', '.join(IMAGE_SUFFIXES)})",
            )
        if info.file_size > max_frame_entry_bytes(frame_limits.max_side_px):
            raise AssetError(
                ErrorCode.FRAME_TOO_LARGE,
                f"entry {name!r} inflates to {info.file_size} bytes; a frame of at most "
                f"{frame_limits.max_side_px} px "
                f"per side never needs more than {max_frame_entry_bytes(frame_limits.max_side_px)}",
            )
        frames.append(name)
    if total_uncompressed >= RATIO_CHECK_MIN_BYTES:
        overall = total_uncompressed / max(total_compressed, 1)
        if overall > zip_limits.max_compression_ratio:
            raise AssetError(
                ErrorCode.ZIP_BOMB_RATIO,
                f"the zip inflates {overall:.0f}x overall; "
                f"the limit is {zip_limits.max_compression_ratio:g}x",
            )
    if not frames:
        raise AssetError(ErrorCode.NO_FRAMES, "the zip holds no frame images")
    if len(frames) > frame_limits.max_frames:
        raise AssetError(
            ErrorCode.TOO_MANY_FRAMES,
            f"the zip holds {len(frames)} frames; the limit is {frame_limits.max_frames}",
        )
    return sorted(frames, key=natural_key)


def max_frame_entry_bytes(max_side_px: int) -> int:
    """The most bytes an image file of max_side_px² needs (uncompressed 32-bit pixels plus headers): a larger
    entry carries something else, and is refused from the zip's directory without reading it."""
    return max_side_px * max_side_px * 4 + (1 << 20)


def _check_manifest(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if info.file_size > MAX_MANIFEST_BYTES:
        raise AssetError(
            ErrorCode.AVATAR_MANIFEST_INVALID,
            f"{info.filename} is {info.file_size} bytes (limit {MAX_MANIFEST_BYTES})",
        )
    try:
        json.loads(archive.read(info).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error) as exc:
        raise AssetError(
            ErrorCode.AVATAR_MANIFEST_INVALID,
            f"{info.filename} is not valid JSON: {exc}",
        ) from exc


def _check_name(name: str) -> None:
    unix = name.replace("\\", "/")
    parts = unix.split("/")
    if (
        unix.startswith("/")
        or re.match(r"^[A-Za-z]:", unix)
        or ".." in parts
        or "\x00" in unix
        or posixpath.normpath(unix).startswith("..")
    ):
        raise AssetError(
            ErrorCode.ZIP_PATH_TRAVERSAL,
            f"entry {name!r} would be written outside the avatar folder",
        )


def _check_frames(archive: zipfile.ZipFile, names: list[str], limits: FrameLimits) -> FramesReport:
    """Headers first (format by magic, sides, one size, the decoded-pixel budget), without decoding any frame;
    then each frame decoded from its stream, one at a time. No entry is ever read whole into memory."""
    size: tuple[int, int] | None = None
    for name in names:
        with _open_image(archive, name) as image:
            image_size = image.size
        _check_side(name, image_size[0], image_size[1], limits)
        if size is None:
            size = image_size
        elif image_size != size:
            raise AssetError(
                ErrorCode.MIXED_FRAME_SIZES,
                f"frame {name!r} is {image_size[0]}x{image_size[1]} but the first frame is "
                f"{size[0]}x{size[1]}; "
                "all frames must have one size",
            )
    assert size is not None
    _check_pixel_budget(len(names), size, limits)
    face: FaceBox | None = None
    for index, name in enumerate(names):
        with _open_image(archive, name) as image:
            try:
                rgb = np.asarray(image.convert("RGB"))
            except (zlib.error, zipfile.BadZipFile) as exc:  # the entry's bytes (CRC, inflate), not the image
                raise AssetError(ErrorCode.ZIP_CORRUPT, f"entry {name!r} cannot be inflated: {exc}") from exc
            except (OSError, ValueError, EOFError) as exc:
                raise AssetError(
                    ErrorCode.IMAGE_UNDECODABLE,
                    f"frame {name!r} cannot be decoded: {exc}",
                ) from exc
        if index == 0 and limits.require_face:
            face = _require_face(rgb, name)
        del rgb
    return FramesReport(frame_count=len(names), width_px=size[0], height_px=size[1], face=face)


def _check_pixel_budget(count: int, size: tuple[int, int], limits: FrameLimits) -> None:
    scale = min(1.0, limits.max_output_side_px / max(size))
    out_w, out_h = round(size[0] * scale), round(size[1] * scale)
    if count * out_w * out_h > limits.max_total_pixels:
        raise AssetError(
            ErrorCode.AVATAR_TOO_MANY_PIXELS,
            f"{count} frames of {out_w}x{out_h} px (scaled to at most "
            f"{limits.max_output_side_px} px per side) are "
            f"{count * out_w * out_h} px, over the avatar budget of {limits.max_total_pixels}; "
            "use fewer or smaller frames",
        )


@contextlib.contextmanager
def _open_image(archive: zipfile.ZipFile, name: str) -> Iterator[Any]:
    """The entry as a PIL image read from its stream: `Image.open` reads the header only (the format is known
    by its magic bytes, not the name), decoding reads what the image needs, never the whole entry at once."""
    try:
        with archive.open(name) as member, Image.open(member) as image:
            if image.format not in _IMAGE_FORMATS:
                raise AssetError(
                    ErrorCode.ZIP_NON_IMAGE_ENTRY,
                    f"frame {name!r} is {image.format}, not one of {sorted(_IMAGE_FORMATS)}",
                )
            yield image
    except Image.DecompressionBombError as exc:
        raise AssetError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame {name!r} declares too many pixels: {exc}",
        ) from exc
    except (UnidentifiedImageError, OSError, EOFError) as exc:
        raise AssetError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"frame {name!r} is not a readable image: {exc}",
        ) from exc
    except (zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise AssetError(ErrorCode.ZIP_CORRUPT, f"entry {name!r} cannot be inflated: {exc}") from exc


def _check_side(name: str, width: int, height: int, limits: FrameLimits) -> None:
    if min(width, height) < limits.min_side_px:
        raise AssetError(
            ErrorCode.FRAME_TOO_SMALL,
            f"{name} is {width}x{height}; each side must be >= {limits.min_side_px} px",
        )
    if max(width, height) > limits.max_side_px:
        raise AssetError(
            ErrorCode.FRAME_TOO_LARGE,
            f"{name} is {width}x{height}; each side must be <= {limits.max_side_px} px",
        )


def _require_face(rgb: np.ndarray, name: str) -> FaceBox:
    # Preparation finds faces with the landmark detector where it is installed, which accepts turned and
    # tilted heads the frontal cascade misses: validation must not refuse an avatar preparation would take.
    face = detect_face(rgb) or _detect_face_with_landmark_detector(rgb)
    if face is None:
        raise AssetError(ErrorCode.NO_FACE, f"no frontal face found in {name}; the avatar must show one")
    return face


def detect_face(rgb: np.ndarray) -> FaceBox | None:
    """The largest frontal face (scikit-image's bundled LBP cascade), or None."""
    height, width = rgb.shape[:2]
    scale = min(1.0, _FACE_SEARCH_SIDE_PX / max(height, width))
    image = rgb.astype(np.float32) / 255.0
    if scale < 1.0:
        image = rescale(image, scale, channel_axis=2, anti_aliasing=True)
    side = min(image.shape[:2])
    detector = Cascade(skdata.lbp_frontal_face_cascade_filename())
    found = detector.detect_multi_scale(
        img=image, scale_factor=1.2, step_ratio=1, min_size=(max(16, side // 10),) * 2, max_size=(side, side)
    )
    if not found:
        return None
    best = max(found, key=lambda box: box["width"] * box["height"])
    return FaceBox(
        x_px=round(best["c"] / scale),
        y_px=round(best["r"] / scale),
        width_px=round(best["width"] / scale),
        height_px=round(best["height"] / scale),
    )


def _detect_face_with_landmark_detector(rgb: np.ndarray) -> FaceBox | None:
    if not landmark_availability().usable:
        return None
    rect = detect_face_rect(rgb)
    if rect is None:
        return None
    left, top, right, bottom = (round(v) for v in rect)
    return FaceBox(x_px=left, y_px=top, width_px=right - left, height_px=bottom - top)


def validate_idle_video(path: Path, video_limits: VideoLimits, frame_limits: FrameLimits) -> FramesReport:
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise AssetError(ErrorCode.VIDEO_UNDECODABLE, f"the idle video cannot be opened: {exc}") from exc
    with container:
        if not container.streams.video:
            kinds: list[str] = sorted({str(stream.type) for stream in container.streams}) or ["none"]
            raise AssetError(
                ErrorCode.VIDEO_NO_VIDEO_STREAM,
                f"the idle video has no video stream (streams: {', '.join(kinds)})",
            )
        stream = container.streams.video[0]
        if container.duration is not None and container.duration / 1_000_000 > video_limits.max_duration_s:
            raise AssetError(
                ErrorCode.VIDEO_TOO_LONG,
                f"the idle video lasts {container.duration / 1_000_000:.1f} s; the limit is "
                f"{video_limits.max_duration_s:g} s",
            )
        max_frames = min(video_limits.max_frames, frame_limits.max_frames)
        count = 0
        size: tuple[int, int] | None = None
        face: FaceBox | None = None
        last_time_s = 0.0
        try:
            for frame in container.decode(stream):
                count += 1
                if count > max_frames:
                    raise AssetError(
                        ErrorCode.TOO_MANY_FRAMES, f"the idle video has more than {max_frames} frames (limit)"
                    )
                if frame.time is not None:
                    last_time_s = float(frame.time)
                    if last_time_s > video_limits.max_duration_s:
                        raise AssetError(
                            ErrorCode.VIDEO_TOO_LONG,
                            f"the idle video runs past {video_limits.max_duration_s:g} s (limit)",
                        )
                if size is None:
                    size = (frame.width, frame.height)
                    _check_side("the idle video", frame.width, frame.height, frame_limits)
                    if frame_limits.require_face:
                        face = _require_face(frame.to_ndarray(format="rgb24"), "the idle video's first frame")
                else:
                    _check_pixel_budget(
                        count,
                        size,
                        frame_limits,
                    )  # grows with the count: refused when it passes
                if (frame.width, frame.height) != size:
                    # A stream may change resolution midway (concatenated segments): caught here, before any
                    # GPU work, as the zip path catches mixed frame sizes.
                    raise AssetError(
                        ErrorCode.MIXED_FRAME_SIZES,
                        f"the idle video changes size at frame {count}: {frame.width}x{frame.height} after "
                        f"{size[0]}x{size[1]}; all frames must have one size",
                    )
        except av.FFmpegError as exc:
            raise AssetError(ErrorCode.VIDEO_UNDECODABLE, f"the idle video fails to decode: {exc}") from exc
        if count == 0 or size is None:
            raise AssetError(
                ErrorCode.VIDEO_UNDECODABLE,
                "the idle video has a video stream but no decodable frame",
            )
        rate = stream.average_rate
        fps = float(rate) if rate else (count / last_time_s if last_time_s > 0 else None)
    return FramesReport(frame_count=count, width_px=size[0], height_px=size[1], face=face, fps=fps)
