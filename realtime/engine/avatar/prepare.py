"""Preparing an avatar once, caching it on disk by content digest + engine version.

Steps: decode (zip / video / image; zip frames on threads) → face box per frame (manifest
boxes win, else upstream's landmark box (`landmarks`, smoothed), else the cascade mapping; misses
borrow a neighbour's box within `max_gap_frames`, else the frame is left to the idle path) →
v1.5 crop boxes (+10 px bottom) → for MuseTalk, masked + reference latents of the 256² crops via
the engine's `encode_latents` → with a face parser (`parse_faces`), each
frame's parsed blend mask over its crop box (`blend_mask`: upstream's jaw rule); without one the
compositor uses its fixed ellipse. Progress goes to `on_progress` in frame-steps (detection,
then encoding, then parsing), so `frames_total` is frames × steps; each progress report names
the face box source. meta.json keeps each stage's wall time (`stage_ms`).

The cache entry is a directory of .npy files plus meta.json, written to a temporary name and
renamed into place, so a crash never leaves a half entry and two concurrent prepares of the
same bytes both end with one valid entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from realtime.disk_budget import evict_lru, touch
from realtime.engine.avatar.blend_mask import (
    BlendMaskSettings,
    face_box_mask,
    parse_crops,
    region_from_labels,
)
from realtime.engine.avatar.face import (
    CROP_SIZE_PX,
    Box,
    DetectorConfig,
    FaceDetector,
    crop_box_v15,
    detect_faces,
    detection_workers,
    fill_missing,
    musetalk_box_from_landmarks,
    smooth_boxes,
)
from realtime.engine.avatar.landmarks import (
    LANDMARK_MODEL_NAME,
    FaceLandmarker,
    LandmarkSettings,
    TrackStats,
    landmark_availability,
    track_landmarks,
)
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.avatar.source import SourceLimits, decode_source
from realtime.engine.errors import AvatarManifestInvalid, AvatarNoFace

logger = logging.getLogger(__name__)

PREPARE_FORMAT_VERSION = 3  # 2: parsed blend masks; 3: landmark face boxes
LATENT_BATCH = 16
PARSE_BATCH = 16
BLEND_MASK_PARSED = "parsed"  # meta's `blend_mask`: "parsed:<mode>" or "ellipse"
BLEND_MASK_ELLIPSE = "ellipse"
# meta's `face_box_source`: where the face boxes came from.
FACE_BOX_MANIFEST = "manifest"
FACE_BOX_LANDMARKS = f"landmarks:{LANDMARK_MODEL_NAME}"
FACE_BOX_CASCADE = "cascade"
FACE_BOX_MODES = ("auto", "cascade")

LatentEncoder = Callable[[np.ndarray], np.ndarray]  # crops [B,256,256,3] uint8 RGB -> [B,8,32,32] float16
FaceParse = Callable[
    [list[np.ndarray]], np.ndarray
]  # RGB uint8 crops (any sizes) -> [B,512,512] uint8 labels
ProgressCallback = Callable[[PrepareProgress], None]


@dataclass(frozen=True)
class PrepareSettings:
    extra_margin_px: int = 10
    max_gap_frames: int = 3
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    limits: SourceLimits = field(default_factory=SourceLimits)
    blend: BlendMaskSettings = field(default_factory=BlendMaskSettings)
    # "auto": upstream's landmark box where the landmark model is installed, else the cascade mapping;
    # "cascade": never the landmark model (e.g. where its licence rules it out, see `landmarks`).
    face_box: str = "auto"
    landmarks: LandmarkSettings = field(default_factory=LandmarkSettings)
    box_smooth_window_frames: int = 5
    box_smooth_max_shift_px: int = 2

    def __post_init__(self) -> None:
        if self.face_box not in FACE_BOX_MODES:
            raise ValueError(f"face_box {self.face_box!r}: choose one of {', '.join(FACE_BOX_MODES)}")


def default_cache_root() -> Path:
    configured = os.environ.get("LIPSYNC_CACHE_DIR")
    return Path(configured) / "avatars" if configured else Path.home() / ".cache" / "lipsync-live" / "avatars"


def planned_face_box_source(settings: PrepareSettings) -> str:
    """The face box source preparation uses for avatars without manifest boxes, given what is installed."""
    if settings.face_box == "auto" and landmark_availability().usable:
        return FACE_BOX_LANDMARKS
    return FACE_BOX_CASCADE


def load_face_box_models(settings: PrepareSettings) -> float:
    """Load the landmark model where preparation will use it (once per process; a warm sidecar's first avatar
    then does not wait for it); returns the ms it took."""
    started = time.perf_counter()
    availability = landmark_availability()
    if settings.face_box == "auto" and availability.model_file is not None:
        FaceLandmarker(availability.model_file, settings.landmarks)
    return (time.perf_counter() - started) * 1000


def cache_key(
    digest: str, engine: str, engine_version: str, model_fingerprint: str, settings: PrepareSettings
) -> str:
    material = json.dumps(
        [PREPARE_FORMAT_VERSION, digest, engine, engine_version, model_fingerprint, asdict(settings)],
        sort_keys=True,
    )
    return f"{engine}-{digest[:16]}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """The v1.5 crop resized to 256×256 with Lanczos, as upstream."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE_PX, CROP_SIZE_PX), interpolation=cv2.INTER_LANCZOS4)


def prepare_avatar(
    source: bytes | Path,
    *,
    engine: str,
    engine_version: str,
    model_fingerprint: str = "",
    cache_root: Path | None = None,
    cache_max_bytes: int | None = None,
    encode_latents: LatentEncoder | None = None,
    on_progress: ProgressCallback | None = None,
    settings: PrepareSettings | None = None,
    detector: FaceDetector | None = None,
    parse_faces: FaceParse | None = None,
) -> Avatar:
    """`model_fingerprint` must identify every model that shapes the entry (the VAE's and, with `parse_faces`,
    the parser's weights): it is part of the cache key."""
    settings = settings or PrepareSettings()
    name = source.name if isinstance(source, Path) else "avatar"
    data = source.read_bytes() if isinstance(source, Path) else source
    digest = hashlib.sha256(data).hexdigest()
    mask_kind = f"{BLEND_MASK_PARSED}:{settings.blend.mode}" if parse_faces else BLEND_MASK_ELLIPSE
    box_plan = FACE_BOX_CASCADE if detector is not None else planned_face_box_source(settings)
    key = cache_key(digest, engine, engine_version, f"{model_fingerprint}|{mask_kind}|{box_plan}", settings)
    steps = 1 + (encode_latents is not None) + (parse_faces is not None)
    root = cache_root or default_cache_root()
    entry = root / key
    if (entry / "meta.json").is_file():
        try:
            avatar = load_cached(entry, cache_hit=True)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning(
                "avatar cache entry unreadable; preparing again",
                extra={"entry": str(entry), "error": str(exc)},
            )
        else:
            touch(entry)  # recently used: evicted last
            if on_progress:
                on_progress(
                    PrepareProgress(
                        avatar.frame_count * steps, avatar.frame_count * steps, avatar.face_box_source
                    )
                )
            logger.info("avatar cache hit", extra={"key": key})
            return avatar

    started = time.perf_counter()
    # Wall time per stage, and this process's CPU time (all threads; worker processes not counted) per stage:
    # on a shared host the CPU time says what a stage costs when the wall time is inflated by others' load.
    stage_ms: dict[str, float] = {}
    stage_cpu_ms: dict[str, float] = {}
    mark, cpu_mark = started, time.process_time()

    def lap(stage: str) -> None:
        nonlocal mark, cpu_mark
        now, cpu_now = time.perf_counter(), time.process_time()
        stage_ms[stage] = round((now - mark) * 1000, 1)
        stage_cpu_ms[stage] = round((cpu_now - cpu_mark) * 1000, 1)
        mark, cpu_mark = now, cpu_now

    decoded = decode_source(data, settings.limits, name=name)
    del data  # the asset's bytes are not needed past decoding
    # Moved into one array frame by frame (np.stack would hold the list and the array at once: twice the set).
    count = len(decoded.frames)
    height, width = decoded.frames[0].shape[:2]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        frames[index] = decoded.frames[index]
        decoded.frames[index] = frames[index]  # the decoded copy is freed; the list now views the array
    total = count * steps
    lap("decode")
    box_source = FACE_BOX_MANIFEST if decoded.manifest_boxes else box_plan

    def report(done: int) -> None:
        if on_progress:
            on_progress(PrepareProgress(done, total, box_source))

    raw_boxes: list[Box | None] = []
    landmarks: np.ndarray | None = None
    if box_source == FACE_BOX_LANDMARKS:
        raw_boxes, landmarks = _landmark_boxes(frames, settings, report)
        if all(box is None for box in raw_boxes):
            logger.warning("no landmark face box in any frame; using the cascade", extra={"source": name})
            box_source, landmarks, raw_boxes = FACE_BOX_CASCADE, None, []
        else:
            raw_boxes = _cascade_where_no_landmarks(raw_boxes, frames, settings)
    if box_source == FACE_BOX_MANIFEST:  # a frame the manifest gives no box has no face
        for index, manifest_box in enumerate(decoded.manifest_boxes):
            clipped = (
                _clip_manifest_box(manifest_box, width, height, decoded.names[index])
                if manifest_box
                else None
            )
            raw_boxes.append(clipped)
        report(count)
    elif box_source == FACE_BOX_CASCADE and detector is not None:
        for index, frame in enumerate(frames):
            raw_boxes.append(detector.detect(frame))
            report(index + 1)
    elif box_source == FACE_BOX_CASCADE:
        raw_boxes = detect_faces(frames, settings.detector, detection_workers(count), report)
    if all(box is None for box in raw_boxes):
        raise AvatarNoFace(f"no face was found in any of the {count} frames of {name}")
    lap("face_boxes")
    boxes = fill_missing(raw_boxes, settings.max_gap_frames)
    has_face = np.array([box is not None for box in boxes], dtype=bool)
    face_boxes = np.full((count, 4), -1, dtype=np.int32)
    crop_boxes = np.full((count, 4), -1, dtype=np.int32)
    for index, box in enumerate(boxes):
        if box is not None:
            face_boxes[index] = box
            crop_boxes[index] = crop_box_v15(box, height, settings.extra_margin_px)

    latents = None
    if encode_latents is not None:
        latents = np.zeros((count, 8, 32, 32), dtype=np.float16)
        with_face = np.flatnonzero(has_face)
        for start in range(0, count, LATENT_BATCH):
            batch = [i for i in with_face if start <= i < start + LATENT_BATCH]
            if batch:
                crops = np.stack([crop_face(frames[i], _box(crop_boxes[i])) for i in batch])
                latents[batch] = encode_latents(crops).astype(np.float16)
            report(count + min(start + LATENT_BATCH, count))
        lap("latents")

    blend_masks = None
    if parse_faces is not None:
        parsed_from = total - count

        def parsed(done: int) -> None:
            report(parsed_from + done)

        blend_masks = _parsed_masks(
            frames=frames,
            crop_boxes=crop_boxes,
            has_face=has_face,
            parse_faces=parse_faces,
            blend=settings.blend,
            on_frames=parsed,
        )
        report(total)
        lap("parse")

    meta = {
        "format": PREPARE_FORMAT_VERSION,
        "key": key,
        "digest_sha256": digest,
        "engine": engine,
        "engine_version": engine_version,
        "model_fingerprint": model_fingerprint,
        "kind": decoded.kind,
        "source_name": name,
        "frame_names": decoded.names,
        "frame_count": int(count),
        "width_px": int(width),
        "height_px": int(height),
        "frames_with_face": int(has_face.sum()),
        "blend_mask": mask_kind,
        # Manifest boxes where the avatar has them, else upstream's landmark box, else the cascade mapping.
        "face_box_source": box_source,
        "prepare_ms": (time.perf_counter() - started) * 1000,
        "stage_ms": stage_ms,
        "stage_cpu_ms": stage_cpu_ms,
    }
    _write_entry(
        root=root,
        key=key,
        meta=meta,
        frames=frames,
        face_boxes=face_boxes,
        crop_boxes=crop_boxes,
        has_face=has_face,
        latents=latents,
        blend_masks=blend_masks,
        landmarks=landmarks,
    )
    lap("write")
    logger.info(
        "avatar prepared",
        extra={
            k: meta[k]
            for k in ("key", "frame_count", "frames_with_face", "blend_mask", "face_box_source", "prepare_ms")
        }
        | {"stage_ms": stage_ms},
    )
    prepared = load_cached(root / key, cache_hit=False)
    if cache_max_bytes is not None:
        evict_lru(root, cache_max_bytes, keep={root / key})
    return prepared


def _landmark_boxes(
    frames: np.ndarray, settings: PrepareSettings, report: Callable[[int], None]
) -> tuple[list[Box | None], np.ndarray]:
    """Upstream's face box from each frame's 68 landmarks, smoothed over time (`face.smooth_boxes`), and the
    landmarks `[N, 68, 2]` float32 (NaN where a frame has none)."""
    availability = landmark_availability()
    assert availability.model_file is not None  # the plan said landmarks: the model is installed
    landmarker = FaceLandmarker(availability.model_file, settings.landmarks)
    stats = TrackStats()
    points = track_landmarks(frames, landmarker, on_frames=report, stats=stats)
    height = frames.shape[1]
    boxes = [None if p is None else musetalk_box_from_landmarks(p, height) for p in points]
    landmarks = np.full((len(frames), 68, 2), np.nan, np.float32)
    for index, p in enumerate(points):
        if p is not None:
            landmarks[index] = p
    logger.info(
        "face landmarks",
        extra={
            "frames": len(frames),
            "detections": stats.detections,
            "tracked": stats.tracked,
            "without_face": stats.without_face,
            "without_box": sum(box is None for box in boxes),
        },
    )
    return smooth_boxes(boxes, settings.box_smooth_window_frames, settings.box_smooth_max_shift_px), landmarks


def _cascade_where_no_landmarks(
    boxes: list[Box | None], frames: np.ndarray, settings: PrepareSettings
) -> list[Box | None]:
    """Landmark boxes, with the cascade's box for each frame that has none and no neighbour's to borrow
    (within `max_gap_frames`, as `fill_missing` lends): short gaps keep the landmark geometry, longer ones
    fall back per frame as upstream falls back to its detector's box."""
    filled = fill_missing(boxes, settings.max_gap_frames)
    missing = [index for index, box in enumerate(filled) if box is None]
    if not missing:
        return boxes
    found = detect_faces(frames[missing], settings.detector, detection_workers(len(missing)))
    out = list(boxes)
    for index, box in zip(missing, found, strict=True):
        out[index] = box
    logger.info(
        "cascade boxes for frames without landmarks",
        extra={"frames": len(missing), "found": sum(box is not None for box in found)},
    )
    return out


def _parsed_masks(
    *,
    frames: np.ndarray,
    crop_boxes: np.ndarray,
    has_face: np.ndarray,
    parse_faces: FaceParse,
    blend: BlendMaskSettings,
    on_frames: Callable[[int], None],
) -> np.ndarray:
    """Each face frame's blend mask over its crop box, uint8 `[N, rows, cols]` padded to the largest box (zero
    beyond each frame's box and for frames without a face), by upstream's rule (see `blend_mask`)."""
    with_face = [int(i) for i in np.flatnonzero(has_face)]
    sizes = [
        (int(crop_boxes[i][3] - crop_boxes[i][1]), int(crop_boxes[i][2] - crop_boxes[i][0]))
        for i in with_face
    ]
    rows_px = max([1] + [h for h, _ in sizes])
    cols_px = max([1] + [w for _, w in sizes])
    masks = np.zeros((frames.shape[0], rows_px, cols_px), np.uint8)
    for start in range(0, len(with_face), PARSE_BATCH):
        batch = with_face[start : start + PARSE_BATCH]
        boxes = [_box(crop_boxes[i]) for i in batch]
        labels = parse_faces(parse_crops(frames[batch], boxes, blend))
        for index, box, label_map in zip(batch, boxes, labels, strict=True):
            mask = face_box_mask(region_from_labels(label_map, blend.mode, blend.cheek_width_px), box, blend)
            masks[index, : mask.shape[0], : mask.shape[1]] = mask
        on_frames(batch[-1] + 1)
    return masks


def _box(row: np.ndarray) -> Box:
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def _clip_manifest_box(box: Box, width: int, height: int, frame_name: str) -> Box:
    x1, y1, x2, y2 = max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])
    if x2 - x1 < 8 or y2 - y1 < 8:
        raise AvatarManifestInvalid(
            f"avatar.json: the box for {frame_name} lies outside the {width}x{height} frame"
        )
    return (x1, y1, x2, y2)


def _write_entry(
    *,
    root: Path,
    key: str,
    meta: dict[str, object],
    frames: np.ndarray,
    face_boxes: np.ndarray,
    crop_boxes: np.ndarray,
    has_face: np.ndarray,
    latents: np.ndarray | None,
    blend_masks: np.ndarray | None = None,
    landmarks: np.ndarray | None = None,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        np.save(staging / "frames.npy", frames)
        np.save(staging / "face_boxes.npy", face_boxes)
        np.save(staging / "crop_boxes.npy", crop_boxes)
        np.save(staging / "has_face.npy", has_face)
        if latents is not None:
            np.save(staging / "latents.npy", latents)
        if blend_masks is not None:
            np.save(staging / "blend_masks.npy", blend_masks)
        if landmarks is not None:
            np.save(staging / "landmarks.npy", landmarks)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.rename(staging, root / key)
        except OSError:
            if not (root / key / "meta.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cached(entry: Path, cache_hit: bool) -> Avatar:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    latents_path = entry / "latents.npy"
    masks_path = entry / "blend_masks.npy"
    landmarks_path = entry / "landmarks.npy"
    return Avatar(
        key=meta["key"],
        digest_sha256=meta["digest_sha256"],
        engine=meta["engine"],
        kind=meta["kind"],
        cache_dir=entry,
        cache_hit=cache_hit,
        frames=np.load(entry / "frames.npy", mmap_mode="r"),
        face_boxes=np.load(entry / "face_boxes.npy"),
        crop_boxes=np.load(entry / "crop_boxes.npy"),
        has_face=np.load(entry / "has_face.npy"),
        latents=np.load(latents_path) if latents_path.is_file() else None,
        blend_masks=np.load(masks_path, mmap_mode="r") if masks_path.is_file() else None,
        blend_mask=str(meta.get("blend_mask", BLEND_MASK_ELLIPSE)),
        face_box_source=str(meta.get("face_box_source", FACE_BOX_CASCADE)),
        landmarks=np.load(landmarks_path) if landmarks_path.is_file() else None,
    )
