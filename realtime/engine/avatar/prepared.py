"""A prepared avatar: frames, face and crop boxes, (MuseTalk) latents, and its ping-pong frame cycle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PrepareProgress:
    """Avatar preparation's progress, reported while it runs (the control plane relays it as heartbeats)."""

    frames_done: int
    frames_total: int
    # Where the face boxes come from: "landmarks:dlib-68" (upstream's rule), "cascade" or "manifest".
    face_box_source: str = ""


@dataclass
class Avatar:
    """Engine-ready avatar. Arrays are read-only (memory-mapped from the cache)."""

    key: str  # cache key: content digest + engine + engine version + model fingerprint + settings
    digest_sha256: str  # of the source bytes
    engine: str
    kind: str  # "frames_zip" | "idle_video" | "image"
    cache_dir: Path
    cache_hit: bool
    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    face_boxes: np.ndarray  # [N, 4] int32 x1,y1,x2,y2 (MuseTalk face box); -1 where no face
    crop_boxes: np.ndarray  # [N, 4] int32: face box + v1.5 extra margin; -1 where no face
    has_face: np.ndarray  # [N] bool: False = the engine never touches this frame
    latents: np.ndarray | None  # [N, 8, 32, 32] float16 masked+reference VAE latents (musetalk only)
    # [N, rows, cols] uint8: each frame's parsed blend mask over its crop box (top-left aligned, zero-padded
    # to the largest box); None: the compositor's fixed ellipse.
    blend_masks: np.ndarray | None = None
    blend_mask: str = "ellipse"  # "parsed:<mode>" | "ellipse": which mask the compositor uses
    face_box_source: str = "cascade"  # "landmarks:dlib-68" | "cascade" | "manifest"
    landmarks: np.ndarray | None = None  # [N, 68, 2] float32 frame px, NaN where a frame has none

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height_px(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width_px(self) -> int:
        return int(self.frames.shape[2])

    @property
    def cycle_length(self) -> int:
        """Length of the ping-pong cycle (frames forward, then backward), as upstream's `frame_list_cycle`."""
        return 2 * self.frame_count

    def frame_at(self, cycle_index: int) -> int:
        """Frame number shown at position `cycle_index` (any int >= 0) of the ping-pong cycle."""
        position = cycle_index % self.cycle_length
        return position if position < self.frame_count else self.cycle_length - 1 - position

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        """The unmodified avatar frame at `cycle_index` (read-only view)."""
        return self.frames[self.frame_at(cycle_index)]
