"""Pasting generated 256² faces back into avatar frames through the lower-face mask.

All arithmetic is torch on the engine's device: on CUDA the crop-box regions of the avatar
frames live on the GPU, the face is resized and blended there, and only the blended regions
(a fraction of each frame) cross to the host in one transfer; the host copies the idle frame
and drops the region in. On CPU the same code runs on views of the cached frames.

Blend per request: `out = roi + (face - roi) · mask · speech_weight` inside the v1.5 crop box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from realtime.engine.avatar.face import lower_face_mask
from realtime.engine.avatar.prepared import Avatar

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PasteJob:
    avatar: Avatar
    frame: int  # avatar frame number (not cycle index)
    face_row: int  # row of the faces tensor
    weight: float


class Compositor:
    def __init__(self, device: torch.device) -> None:
        import torch

        self._device = device
        self._mask = torch.from_numpy(lower_face_mask()).to(device)[None, None]  # [1,1,256,256]
        self._rois: dict[str, list[torch.Tensor]] = {}  # avatar key -> crop-box region per frame, uint8 [h,w,3]

    def forget(self, avatar_key: str) -> None:
        self._rois.pop(avatar_key, None)

    def _regions(self, avatar: Avatar) -> list[torch.Tensor]:
        import torch

        regions = self._rois.get(avatar.key)
        if regions is None:
            regions = []
            for index in range(avatar.frame_count):
                x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[index])
                if not avatar.has_face[index]:
                    regions.append(torch.zeros((0, 0, 3), dtype=torch.uint8, device=self._device))
                    continue
                region = np.ascontiguousarray(avatar.frames[index, y1:y2, x1:x2])
                regions.append(torch.from_numpy(region).to(self._device))
            self._rois[avatar.key] = regions
        return regions

    def paste(self, faces: torch.Tensor, jobs: Sequence[PasteJob]) -> list[np.ndarray]:
        """`faces`: [B, 3, 256, 256] float in [0, 1] on the device. Returns full RGB uint8 frames, one per job."""
        import torch
        import torch.nn.functional as F

        blended = []
        with torch.inference_mode():
            for job in jobs:
                roi = self._regions(job.avatar)[job.frame]
                height, width = roi.shape[:2]
                face = F.interpolate(
                    faces[job.face_row : job.face_row + 1].float(),
                    size=(height, width),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0].permute(1, 2, 0)
                mask = F.interpolate(self._mask, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
                base = roi.float()
                out = base + (face * 255.0 - base) * (mask * job.weight)[..., None]
                blended.append(out.round_().clamp_(0, 255).to(torch.uint8).reshape(-1))
            host = torch.cat(blended).cpu().numpy() if blended else np.zeros(0, dtype=np.uint8)
        frames = []
        offset = 0
        for job in jobs:
            x1, y1, x2, y2 = (int(v) for v in job.avatar.crop_boxes[job.frame])
            size = (y2 - y1) * (x2 - x1) * 3
            frame = np.array(job.avatar.frames[job.frame])  # writable copy of the idle frame
            frame[y1:y2, x1:x2] = host[offset : offset + size].reshape(y2 - y1, x2 - x1, 3)
            offset += size
            frames.append(frame)
        return frames
