"""Decoding an avatar asset into RGB frames: a frames zip, an idle video (PyAV), or one image.

Zips: image members in natural-sort order ("frame2" before "frame10"), directories, hidden and
`__MACOSX` entries skipped, nothing extracted to disk (so traversal names cannot escape), sizes
bounded before decoding (zip bombs). An optional `avatar.json` in the zip supplies face boxes
that win over detection: `{"face_boxes": {"<member name>": [x1, y1, x2, y2] | null, ...}}` or a
list in frame order. Boxes are MuseTalk face boxes (nose-centred, chin at the bottom), before
the v1.5 `extra_margin`.

Frames with an odd width/height lose their last column/row: the video encoders need even sizes.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from realtime.engine.avatar.workers import prepare_threads
from realtime.engine.errors import (
    AvatarManifestInvalid,
    AvatarMixedSizes,
    AvatarNoImages,
    AvatarNoVideoStream,
    AvatarTooLarge,
    AvatarUnreadableImage,
    AvatarUnreadableVideo,
    AvatarUnsupported,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST_NAME = "avatar.json"
MIN_SIDE_PX = 64
# Entries skipped, not decoded: archivers' metadata folders, hidden files. activities/validate.py applies the
# same rule, so a frame the validator counts is one the sidecar plays.
IGNORED_ENTRY = re.compile(r"(^|/)(__MACOSX/|\.[^/]*$|Thumbs\.db$)")


@dataclass(frozen=True)
class SourceLimits:
    max_frames: int = 3000
    max_frame_pixels: int = 4096 * 4096  # of one frame as stored
    max_uncompressed_bytes: int = 2 << 30
    # Frames larger than this per side are scaled down (aspect kept, even sides) as each is decoded, so an
    # avatar's frames in memory and in the cache are at most this size. infra/policies.yaml `assets.frames`
    # holds the same.
    max_output_side_px: int = 1024
    # frames x width x height after that scaling: the avatar's decoded-pixel budget (3 bytes each, held once).
    max_total_pixels: int = 150_000_000


@dataclass
class DecodedAvatar:
    kind: str  # "frames_zip" | "idle_video" | "image"
    frames: list[np.ndarray]  # RGB uint8, one size, even sides
    names: list[str]
    manifest_boxes: list[tuple[int, int, int, int] | None] = field(
        default_factory=list
    )  # per frame, or empty


def natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def detect_kind(data: bytes) -> str:
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return "frames_zip"
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:2] == b"BM":
        return "image"
    return "idle_video"


def decode_source(data: bytes, limits: SourceLimits | None = None, name: str = "avatar") -> DecodedAvatar:
    """Frames of an avatar asset given as bytes; typed errors name the member or stream at fault."""
    limits = limits or SourceLimits()
    if not data:
        raise AvatarUnsupported(f"{name} is empty")
    kind = detect_kind(data)
    if kind == "frames_zip":
        decoded = _decode_zip(data, limits, name)
    elif kind == "image":
        decoded = DecodedAvatar("image", [_decode_image(data, name, limits)], [name])
    else:
        decoded = _decode_video(data, limits, name)
    _check_sizes(decoded)
    return decoded


def output_size(width: int, height: int, max_side_px: int) -> tuple[int, int]:
    """(width, height) of a frame once scaled to fit `max_side_px` (never up), even sides."""
    scale = min(1.0, max_side_px / max(width, height))
    out_w, out_h = max(2, round(width * scale)), max(2, round(height * scale))
    return out_w - out_w % 2, out_h - out_h % 2


def _fit(rgb: np.ndarray, limits: SourceLimits) -> np.ndarray:
    """`rgb` scaled down to the output size (area filter), or as it is when it fits."""
    height, width = rgb.shape[:2]
    if max(width, height) <= limits.max_output_side_px:
        return rgb
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    out_w, out_h = output_size(width, height, limits.max_output_side_px)
    return np.ascontiguousarray(cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA))


class _PixelBudget:
    """The decoded-pixel budget of one avatar, charged frame by frame (and up front when the count is
    known)."""

    def __init__(self, limits: SourceLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.used = 0

    def check_total(self, frames: int, width: int, height: int) -> None:
        if frames * width * height > self.limits.max_total_pixels:
            raise AvatarTooLarge(
                f"{self.name}: {frames} frames of {width}x{height} px (after scaling to at most "
                f"{self.limits.max_output_side_px} px per side) exceed the decoded-pixel budget of "
                f"{self.limits.max_total_pixels} px; use fewer or smaller frames"
            )

    def charge(self, frame: np.ndarray) -> None:
        self.used += frame.shape[0] * frame.shape[1]
        if self.used > self.limits.max_total_pixels:
            self.check_total(1, self.used, 1)


def _decode_image(data: bytes, member: str, limits: SourceLimits) -> np.ndarray:
    return _decode_image_scaled(data, member, limits)[0]


def _decode_image_scaled(data: bytes, member: str, limits: SourceLimits) -> tuple[np.ndarray, float]:
    """The frame at its output size, and the factor it was scaled by (1.0: as stored)."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise AvatarUnreadableImage(f"{member} is empty")
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise AvatarUnreadableImage(f"{member} is not a decodable image")
    if bgr.shape[0] * bgr.shape[1] > limits.max_frame_pixels:
        raise AvatarTooLarge(
            f"{member} is {bgr.shape[1]}x{bgr.shape[0]} px, over the {limits.max_frame_pixels} px limit"
        )
    fitted = _fit(np.ascontiguousarray(bgr[:, :, ::-1]), limits)
    return fitted, fitted.shape[1] / bgr.shape[1]


def _decode_zip(data: bytes, limits: SourceLimits, name: str) -> DecodedAvatar:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AvatarUnsupported(f"{name} is not a readable zip archive ({exc})") from exc
    with archive:
        images, manifest_info = [], None
        for info in infos:
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not base or IGNORED_ENTRY.search(info.filename):
                continue
            if base == MANIFEST_NAME:
                manifest_info = info
            elif base.lower().endswith(IMAGE_SUFFIXES):
                images.append(info)
        if not images:
            raise AvatarNoImages(f"{name} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        if len(images) > limits.max_frames:
            raise AvatarTooLarge(f"{name} has {len(images)} images, over the limit of {limits.max_frames}")
        # An image of max_frame_pixels needs at most 4 bytes a pixel plus headers: a larger entry is refused
        # from the zip's directory, before it is read into memory.
        max_entry_bytes = limits.max_frame_pixels * 4 + (1 << 20)
        for info in images:
            if info.file_size > max_entry_bytes:
                raise AvatarTooLarge(
                    f"{info.filename} inflates to {info.file_size} bytes, over {max_entry_bytes}"
                )
        total = sum(info.file_size for info in images)
        if total > limits.max_uncompressed_bytes:
            raise AvatarTooLarge(
                f"{name} unpacks to {total} bytes, over the limit of {limits.max_uncompressed_bytes}"
            )
        images.sort(key=lambda info: natural_key(info.filename))
        frames: list[np.ndarray] = []
        budget = _PixelBudget(limits, name)
        scale = 1.0
        # Members are read here (one zip handle) and decoded on threads (OpenCV releases the GIL), a few per
        # thread at a time so the pixel budget is charged before many more frames decode. The first frame
        # decodes alone: all frames have one size, so it prices the whole set before the rest decode.
        threads = prepare_threads()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="avatar-decode") as pool:
            start = 0
            while start < len(images):
                chunk = images[start : start + (1 if start == 0 else threads * 2)]
                payloads = [(_read_member(archive, info), info.filename) for info in chunk]
                decoded = list(
                    pool.map(lambda item: _decode_image_scaled(item[0], item[1], limits), payloads)
                )
                del payloads
                for frame, frame_scale in decoded:
                    if not frames:
                        budget.check_total(len(images), frame.shape[1], frame.shape[0])
                    budget.charge(frame)
                    frames.append(frame)
                    scale = frame_scale
                start += len(chunk)
        names = [info.filename for info in images]
        boxes = _read_manifest(archive, manifest_info, names) if manifest_info is not None else []
        if scale != 1.0:  # the manifest's boxes are in the stored frames' pixels: scale them with the frames
            boxes = [
                None
                if box is None
                else (
                    round(box[0] * scale),
                    round(box[1] * scale),
                    round(box[2] * scale),
                    round(box[3] * scale),
                )
                for box in boxes
            ]
    return DecodedAvatar("frames_zip", frames, names, boxes)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
        raise AvatarUnreadableImage(f"{info.filename} cannot be read from the zip ({exc})") from exc


def _read_manifest(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, names: list[str]
) -> list[tuple[int, int, int, int] | None]:
    try:
        manifest = json.loads(archive.read(info).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise AvatarManifestInvalid(f"{info.filename} is not valid JSON ({exc})") from exc
    raw = manifest.get("face_boxes") if isinstance(manifest, dict) else None
    if raw is None:
        raise AvatarManifestInvalid(f'{info.filename} needs a "face_boxes" list or object')
    if isinstance(raw, dict):
        by_name = {n.rsplit("/", 1)[-1]: v for n, v in raw.items()}
        entries = [raw.get(n, by_name.get(n.rsplit("/", 1)[-1])) for n in names]
    elif isinstance(raw, list):
        if len(raw) != len(names):
            raise AvatarManifestInvalid(
                f"{info.filename} lists {len(raw)} face boxes for {len(names)} frames"
            )
        entries = raw
    else:
        raise AvatarManifestInvalid(f'{info.filename}: "face_boxes" must be a list or an object')
    boxes: list[tuple[int, int, int, int] | None] = []
    for frame_name, entry in zip(names, entries, strict=True):
        if entry is None:
            boxes.append(None)
            continue
        if not (
            isinstance(entry, list) and len(entry) == 4 and all(isinstance(v, int | float) for v in entry)
        ):
            raise AvatarManifestInvalid(f"{info.filename}: box for {frame_name} must be [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (round(v) for v in entry)
        if x2 <= x1 or y2 <= y1:
            raise AvatarManifestInvalid(f"{info.filename}: box for {frame_name} is empty: {entry}")
        boxes.append((x1, y1, x2, y2))
    return boxes


def _decode_video(data: bytes, limits: SourceLimits, name: str) -> DecodedAvatar:
    import av  # noqa: PLC0415 (heavy native library: loaded on first use)

    try:
        container: Any = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AvatarUnsupported(
            f"{name} is neither a zip, an image nor a video PyAV can open ({exc})"
        ) from exc
    with container:
        if not container.streams.video:
            raise AvatarNoVideoStream(f"{name} has no video stream")
        stream = container.streams.video[0]
        frames: list[np.ndarray] = []
        budget = _PixelBudget(limits, name)
        try:
            for frame in container.decode(stream):
                if len(frames) >= limits.max_frames:
                    raise AvatarTooLarge(f"{name} has more than {limits.max_frames} frames")
                if frame.width * frame.height > limits.max_frame_pixels:
                    raise AvatarTooLarge(f"{name} frames are {frame.width}x{frame.height} px, over the limit")
                fitted = _fit(frame.to_ndarray(format="rgb24"), limits)
                budget.charge(fitted)
                frames.append(fitted)
        except av.error.FFmpegError as exc:
            raise AvatarUnreadableVideo(
                f"{name}: decoding failed after {len(frames)} frames ({exc})"
            ) from exc
    if not frames:
        raise AvatarUnreadableVideo(f"{name}: the video stream holds no decodable frames")
    return DecodedAvatar("idle_video", frames, [f"{name}#{i}" for i in range(len(frames))])


def _check_sizes(decoded: DecodedAvatar) -> None:
    first = decoded.frames[0].shape[:2]
    for frame, frame_name in zip(decoded.frames, decoded.names, strict=True):
        if frame.shape[:2] != first:
            raise AvatarMixedSizes(
                f"{frame_name} is {frame.shape[1]}x{frame.shape[0]} px but {decoded.names[0]} is "
                f"{first[1]}x{first[0]} px: all frames must have one size"
            )
    height, width = first
    if min(height, width) < MIN_SIDE_PX:
        raise AvatarUnsupported(
            f"frames are {width}x{height} px; at least {MIN_SIDE_PX} px per side is needed"
        )
    even_h, even_w = height - height % 2, width - width % 2
    if (even_h, even_w) != (height, width):
        for index, frame in enumerate(decoded.frames):  # one frame at a time: never two copies of the set
            decoded.frames[index] = np.ascontiguousarray(frame[:even_h, :even_w])


def read_source(path: Path, limits: SourceLimits | None = None) -> tuple[bytes, DecodedAvatar]:
    data = Path(path).read_bytes()
    return data, decode_source(data, limits, name=Path(path).name)
