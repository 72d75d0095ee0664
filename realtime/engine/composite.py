"""Pasting generated 256² faces back into avatar frames through the lower-face mask.

All arithmetic is torch on the engine's device: on CUDA the crop-box regions of the avatar
frames live on the GPU, the face is resized and blended there, and only the blended regions
(a fraction of each frame) cross to the host in one transfer; the host copies the idle frame
and drops the region in. On CPU the same code runs on views of the cached frames.

Blend per request: `out = roi + (face - roi) · mask · speech_weight` inside the v1.5 crop box.
With pinned staging buffers and a copy stream (CUDA), `paste_async` returns while the copy
runs; `finish` waits for it, so the engine can enqueue the next chunk in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


@dataclass
class PendingPaste:
    """Blended crop regions on their way to the host; `Compositor.finish` assembles the frames."""

    jobs: list[PasteJob]
    host: Any  # torch.Tensor uint8 on the host (pinned when enabled), valid once `event` completed
    event: Any  # torch.cuda.Event recorded after the copy, or None (CPU: already complete)
    keep_alive: Any = None  # the device tensor being copied, held until the copy is done


class Compositor:
    def __init__(self, device: torch.device, *, pinned: bool = False, copy_stream: bool = False) -> None:
        """`pinned`: stage device -> host copies in page-locked memory; `copy_stream`: copy on a side stream
        (both CUDA only), so the host-side frame assembly of one chunk overlaps the next chunk's compute."""
        import torch

        self._device = device
        self._cuda = device.type == "cuda"
        self._mask = torch.from_numpy(lower_face_mask()).to(device)[None, None]  # [1,1,256,256]
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # mask resized to a crop box size
        self._rois: dict[str, list[torch.Tensor]] = {}  # avatar key -> crop-box region per frame, uint8 [h,w,3]
        self._pinned = pinned and self._cuda
        self._staging: list[torch.Tensor] = []  # pinned buffers, reused round-robin (two chunks in flight)
        self._staging_next = 0
        self._copy_stream = torch.cuda.Stream(device) if copy_stream and self._cuda else None

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

    def _mask_for(self, height: int, width: int) -> torch.Tensor:
        import torch.nn.functional as F

        mask = self._masks.get((height, width))
        if mask is None:
            mask = F.interpolate(self._mask, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            self._masks[(height, width)] = mask
        return mask

    def _staging_buffer(self, size: int) -> torch.Tensor:
        import torch

        if len(self._staging) < 2:
            self._staging.append(torch.empty(0, dtype=torch.uint8))
        index = self._staging_next
        self._staging_next = (index + 1) % 2
        if self._staging[index].numel() < size:
            self._staging[index] = torch.empty(int(size * 1.25) + 1, dtype=torch.uint8, pin_memory=True)
        return self._staging[index][:size]

    def paste(self, faces: torch.Tensor, jobs: Sequence[PasteJob]) -> list[np.ndarray]:
        """`faces`: [B, 3, 256, 256] float in [0, 1] on the device. Returns full RGB uint8 frames, one per job."""
        return self.finish(self.paste_async(faces, jobs))

    def paste_async(self, faces: torch.Tensor, jobs: Sequence[PasteJob]) -> PendingPaste:
        """Blend on the device and start the copy of the blended regions to the host (asynchronous on CUDA)."""
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
                mask = self._mask_for(height, width)
                base = roi.float()
                out = base + (face * 255.0 - base) * (mask * job.weight)[..., None]
                blended.append(out.round_().clamp_(0, 255).to(torch.uint8).reshape(-1))
            if not blended:
                return PendingPaste(list(jobs), torch.zeros(0, dtype=torch.uint8), None)
            device_bytes = torch.cat(blended)
            if not self._cuda:
                return PendingPaste(list(jobs), device_bytes, None)
            host = (
                self._staging_buffer(device_bytes.numel())
                if self._pinned
                else torch.empty(device_bytes.numel(), dtype=torch.uint8)
            )
            event = torch.cuda.Event()
            if self._copy_stream is not None:
                # The copy waits for the blend, then runs beside whatever is enqueued next on the compute stream.
                self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(self._copy_stream):
                    host.copy_(device_bytes, non_blocking=self._pinned)
                    event.record(self._copy_stream)
            else:
                host.copy_(device_bytes, non_blocking=self._pinned)
                event.record()
            return PendingPaste(list(jobs), host, event, keep_alive=device_bytes)

    def finish(self, pending: PendingPaste) -> list[np.ndarray]:
        """Wait for the copy and drop each blended region into a copy of its idle frame."""
        if pending.event is not None:
            pending.event.synchronize()
        host = pending.host.numpy()
        frames = []
        offset = 0
        for job in pending.jobs:
            x1, y1, x2, y2 = (int(v) for v in job.avatar.crop_boxes[job.frame])
            size = (y2 - y1) * (x2 - x1) * 3
            frame = np.array(job.avatar.frames[job.frame])  # writable copy of the idle frame
            frame[y1:y2, x1:x2] = host[offset : offset + size].reshape(y2 - y1, x2 - x1, 3)
            offset += size
            frames.append(frame)
        return frames
