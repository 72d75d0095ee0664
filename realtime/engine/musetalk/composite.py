"""Pasting generated 256² faces back into avatar frames through each avatar's blend mask.

The mask is the avatar's parsed per-frame mask where preparation made one (`Avatar.blend_masks`,
upstream v1.5's jaw rule over BiSeNet labels, already at each frame's crop-box size), else the
fixed feathered ellipse of `face.lower_face_mask`, resized to the crop box.

All arithmetic is torch on the engine's device, batched over a render call's jobs: on CUDA each
avatar's crop-box regions live on the GPU (padded to its largest box), every face is resized
and blended there in a few batched kernels whatever the batch size, and only the blended
regions (a fraction of each frame) cross to the host in one transfer; the host copies the idle
frame and drops the region in. On CPU the same code runs.

Blend per request: `out = roi + (face - roi) · mask · speech_weight` inside the v1.5 crop box.
The resizes are separable linear maps, so each runs as two matrix products with per-size
matrices: `face_box = R_rows · face · R_colsᵀ`. The matrices are F.interpolate's own (applied to
an identity), so the result is the per-face `F.interpolate` up to float rounding: the face with
antialiased bilinear, the ellipse mask with plain bilinear. (Upstream resizes the decoded face
to the crop box with `cv2.resize`'s default, bilinear without antialiasing, and uses PIL only
to paste; for crop boxes under 256 px, the usual case, the antialiased resize here averages
over more source pixels than upstream's, which samples the nearest two.)
With pinned staging buffers (CUDA), `paste_async` returns while the device still computes
and copies: nothing it does waits for the device (its small index uploads are asynchronous
too), and `finish` waits for the copy. The engine enqueues the next batch in between. With a
copy stream the copy also runs beside whatever is enqueued after it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.avatar.face import lower_face_mask
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.device import StagingPool, upload

if TYPE_CHECKING:
    import torch

# a render lane keeps one batch in flight while it starts the next (of a few chunks)
MAX_FREE_STAGING_BUFFERS = 4


@dataclass(frozen=True)
class PasteJob:
    avatar: Avatar
    frame: int  # avatar frame number (not cycle index)
    face_row: int  # row of the faces tensor
    weight: float


@dataclass
class PendingPaste:
    """Blended crop regions on their way to the host; `Compositor.finish` assembles the frames."""

    jobs: list[PasteJob]  # in the order of the regions' rows (grouped by avatar)
    positions: list[int]  # positions[row] = index of that row's job in the caller's order
    sizes_px: list[tuple[int, int]]  # (height, width) of each row's region
    # torch.Tensor uint8 [B, rows_px, cols_px, 3] on the host (pinned when enabled), once `event` is done
    host: Any
    event: Any  # torch.cuda.Event recorded after the copy, or None (CPU: already complete)
    keep_alive: Any = None  # the device tensor being copied, held until the copy is done
    staging: Any = None  # the pinned buffer `host` views, handed back to the compositor by `finish`


@functools.lru_cache(maxsize=128)  # bounded: a long-lived sidecar meets ever new crop sizes (each ~1 KB/px)
def resize_matrix(src_px: int, dst_px: int, antialias: bool) -> np.ndarray:
    """`[dst_px, src_px]` float32 M with `M @ v` = F.interpolate(v, dst_px, bilinear, align_corners=False)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    import torch.nn.functional as F  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    # Rows resized, columns kept (an identity map along them): the result is the matrix itself. (A basis of
    # one-pixel-wide images gave other weights: measured, F.interpolate skips antialias there.)
    basis = torch.eye(src_px, dtype=torch.float32)[None, None]
    with torch.inference_mode():
        resized = F.interpolate(
            basis, size=(dst_px, src_px), mode="bilinear", align_corners=False, antialias=antialias
        )
    return resized[0, 0].contiguous().numpy()


@dataclass
class _AvatarRegions:
    """One avatar's paste data on the device, padded to its largest crop box."""

    rois: torch.Tensor  # uint8 [N, rows_px, cols_px, 3]: each frame's crop-box region, zero beyond it
    sizes_px: list[tuple[int, int]]  # (height, width) of each frame's region; (0, 0) without a face
    row_size: torch.Tensor  # long [N]: each frame's row in the row tables
    col_size: torch.Tensor  # long [N]: each frame's row in the column tables
    face_rows: torch.Tensor  # float32 [sizes, rows_px, 256]: the face's resize along rows, zero past the size
    face_cols: torch.Tensor  # float32 [sizes, cols_px, 256]
    mask_rows: torch.Tensor  # the ellipse mask's resize (plain bilinear), same shapes
    mask_cols: torch.Tensor
    # float32 [N, rows_px, cols_px] parsed masks in [0, 1]; None: the ellipse
    masks: torch.Tensor | None = None


def _size_tables(
    sizes: Sequence[int], padded_px: int, src_px: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index per frame, antialiased tables, plain tables) for the distinct `sizes`, zero-padded to
    `padded_px`."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    distinct = sorted(set(sizes))
    where = {size: row for row, size in enumerate(distinct)}
    face = np.zeros((len(distinct), padded_px, src_px), np.float32)
    mask = np.zeros_like(face)
    for row, size in enumerate(distinct):
        if size > 0:
            face[row, :size] = resize_matrix(src_px, size, True)
            mask[row, :size] = resize_matrix(src_px, size, False)
    index = torch.tensor([where[size] for size in sizes], dtype=torch.long, device=device)
    return index, torch.from_numpy(face).to(device), torch.from_numpy(mask).to(device)


class Compositor:
    def __init__(self, device: torch.device, *, pinned: bool = False, copy_stream: bool = False) -> None:
        """`pinned`: stage device -> host copies in page-locked memory; `copy_stream`: copy on a side stream
        (both CUDA only), so the host-side frame assembly of one chunk overlaps the next chunk's compute."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        self._device = device
        self._cuda = device.type == "cuda"
        self._mask = torch.from_numpy(lower_face_mask()).to(device)  # [256, 256]
        self._avatars: dict[str, _AvatarRegions] = {}
        self._pinned = pinned and self._cuda
        # Pinned buffers that no pending paste uses.
        self._staging = StagingPool(device, max_free=MAX_FREE_STAGING_BUFFERS) if self._pinned else None
        self._copy_stream = torch.cuda.Stream(device) if copy_stream and self._cuda else None

    def forget(self, avatar_key: str) -> None:
        self._avatars.pop(avatar_key, None)

    def warm_up(self, faces: torch.Tensor) -> None:
        """Paste `faces` into a synthetic avatar once, so the first session does not pay this path's first use
        (kernel loads, the matrix library's handles), which would otherwise make a first session's first
        batch late enough to cost it frames."""
        size_px = int(self._mask.shape[0])
        box = np.asarray([[8, 8, 8 + size_px - 40, 8 + size_px - 40]], np.int32)  # a face smaller than 256²
        avatar = Avatar(
            key="warm-up",
            digest_sha256="",
            engine="",
            kind="image",
            cache_dir=Path(),
            cache_hit=False,
            frames=np.zeros((1, size_px, size_px, 3), np.uint8),
            face_boxes=box,
            crop_boxes=box,
            has_face=np.ones(1, bool),
            latents=None,
        )
        try:
            self.paste(faces, [PasteJob(avatar, 0, row, 1.0) for row in range(int(faces.shape[0]))])
        finally:
            self.forget(avatar.key)

    def _regions(self, avatar: Avatar) -> _AvatarRegions:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        regions = self._avatars.get(avatar.key)
        if regions is not None:
            return regions
        regions_px: list[np.ndarray | None] = []  # each frame's crop-box region (a view; None without a face)
        for index in range(avatar.frame_count):
            x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[index])
            regions_px.append(avatar.frames[index, y1:y2, x1:x2] if avatar.has_face[index] else None)
        sizes: list[tuple[int, int]] = [r.shape[:2] if r is not None else (0, 0) for r in regions_px]
        rows_px = max([1] + [h for h, _ in sizes])
        cols_px = max([1] + [w for _, w in sizes])
        rois = np.zeros((avatar.frame_count, rows_px, cols_px, 3), np.uint8)
        for index, region in enumerate(regions_px):
            if region is not None:
                rois[index, : region.shape[0], : region.shape[1]] = region
        face_px = int(self._mask.shape[0])
        row_size, face_rows, mask_rows = _size_tables([h for h, _ in sizes], rows_px, face_px, self._device)
        col_size, face_cols, mask_cols = _size_tables([w for _, w in sizes], cols_px, face_px, self._device)
        masks = None
        if avatar.blend_masks is not None:
            parsed = np.zeros((avatar.frame_count, rows_px, cols_px), np.uint8)
            rows, cols = min(rows_px, avatar.blend_masks.shape[1]), min(cols_px, avatar.blend_masks.shape[2])
            parsed[:, :rows, :cols] = avatar.blend_masks[:, :rows, :cols]
            masks = torch.from_numpy(parsed).to(self._device).float().div_(255.0)
        regions = _AvatarRegions(
            torch.from_numpy(rois).to(self._device),
            sizes,
            row_size,
            col_size,
            face_rows,
            face_cols,
            mask_rows,
            mask_cols,
            masks,
        )
        self._avatars[avatar.key] = regions
        return regions

    def paste(self, faces: torch.Tensor, jobs: Sequence[PasteJob]) -> list[np.ndarray]:
        """`faces`: [B, 3, 256, 256] float in [0, 1] on the device. Returns full RGB uint8 frames, one per
        job."""
        return self.finish(self.paste_async(faces, jobs))

    def paste_async(self, faces: torch.Tensor, jobs: Sequence[PasteJob]) -> PendingPaste:
        """Blend on the device and start the copy of the blended regions to the host (asynchronous on
        CUDA)."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if not jobs:
            return PendingPaste([], [], [], torch.zeros((0, 1, 1, 3), dtype=torch.uint8), None)
        by_avatar: dict[str, list[int]] = {}
        for position, job in enumerate(jobs):
            by_avatar.setdefault(job.avatar.key, []).append(position)
        with torch.inference_mode():
            # Avatars with the ellipse first: their masks come from one batched resize, the parsed ones after.
            groups = sorted(
                ((self._regions(jobs[group[0]].avatar), group) for group in by_avatar.values()),
                key=lambda item: item[0].masks is not None,
            )
            positions = [position for _, group in groups for position in group]
            ordered = [jobs[position] for position in positions]
            sizes_px = [regions.sizes_px[jobs[p].frame] for regions, group in groups for p in group]
            rows_px = max(int(regions.rois.shape[1]) for regions, _ in groups)
            cols_px = max(int(regions.rois.shape[2]) for regions, _ in groups)
            # One upload for every index of the call: avatar frame per row, face row per row.
            indices = upload(
                torch.tensor(
                    [[job.frame for job in ordered], [job.face_row for job in ordered]], dtype=torch.long
                ),
                self._device,
            )
            weights = upload(
                torch.tensor([min(1.0, job.weight) for job in ordered], dtype=torch.float32), self._device
            )
            parts: dict[str, list[torch.Tensor]] = {
                "rois": [],
                "face_rows": [],
                "face_cols": [],
                "mask_rows": [],
                "mask_cols": [],
                "parsed": [],
            }
            start = 0
            for regions, group in groups:
                frames = indices[0, start : start + len(group)]
                start += len(group)
                row_size, col_size = regions.row_size[frames], regions.col_size[frames]
                pad_rows = rows_px - int(regions.rois.shape[1])
                pad_cols = cols_px - int(regions.rois.shape[2])
                parts["rois"].append(_pad(regions.rois[frames], (0, 0, 0, pad_cols, 0, pad_rows)))
                parts["face_rows"].append(_pad(regions.face_rows[row_size], (0, 0, 0, pad_rows)))
                parts["face_cols"].append(_pad(regions.face_cols[col_size], (0, 0, 0, pad_cols)))
                if regions.masks is not None:
                    parts["parsed"].append(_pad(regions.masks[frames], (0, pad_cols, 0, pad_rows)))
                else:
                    parts["mask_rows"].append(_pad(regions.mask_rows[row_size], (0, 0, 0, pad_rows)))
                    parts["mask_cols"].append(_pad(regions.mask_cols[col_size], (0, 0, 0, pad_cols)))
            joined = {name: _join(tensors) for name, tensors in parts.items() if tensors}
            picked = faces.index_select(0, indices[1]).float()  # [B, 3, 256, 256]
            # [B, 1, rows, 256] @ [B, 3, 256, 256] @ [B, 1, 256, cols] -> [B, 3, rows, cols]
            face = joined["face_rows"][:, None] @ picked @ joined["face_cols"][:, None].transpose(-1, -2)
            masks = []  # [B, rows, cols]: the ellipse rows' resized masks, then the parsed rows' own
            if "mask_rows" in joined:
                masks.append(joined["mask_rows"] @ self._mask @ joined["mask_cols"].transpose(-1, -2))
            if "parsed" in joined:
                masks.append(joined["parsed"])
            mask = _join(masks)
            base = joined["rois"].float()
            alpha = (mask * weights[:, None, None])[..., None]
            blended = base + (face.permute(0, 2, 3, 1) * 255.0 - base) * alpha
            device_bytes = blended.round_().clamp_(0, 255).to(torch.uint8)
            if not self._cuda:
                return PendingPaste(ordered, positions, sizes_px, device_bytes, None)
            staging = self._staging.take(device_bytes.numel()) if self._staging is not None else None
            host = (
                staging[: device_bytes.numel()].view(device_bytes.shape)
                if staging is not None
                else torch.empty(device_bytes.shape, dtype=torch.uint8)
            )
            event = torch.cuda.Event()
            if self._copy_stream is not None:
                # The copy waits for the blend, then runs beside whatever is enqueued next on the compute
                # stream.
                self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(self._copy_stream):
                    host.copy_(device_bytes, non_blocking=self._pinned)
                    event.record(self._copy_stream)
            else:
                host.copy_(device_bytes, non_blocking=self._pinned)
                event.record()
            return PendingPaste(
                ordered, positions, sizes_px, host, event, keep_alive=device_bytes, staging=staging
            )

    def finish(self, pending: PendingPaste) -> list[np.ndarray]:
        """Wait for the copy and drop each blended region into a copy of its idle frame (in the callers'
        order)."""
        try:
            if pending.event is not None:
                pending.event.synchronize()
            host = pending.host.numpy()
            frames: list[np.ndarray] = [np.empty(0, np.uint8)] * len(pending.jobs)
            for row, position in enumerate(pending.positions):
                frames[position] = assemble_frame(pending, host, row)
        finally:
            if pending.staging is not None and self._staging is not None:  # copied out (or failed): reusable
                self._staging.give_back(pending.staging)
                pending.staging = None
        return frames


def assemble_frame(pending: PendingPaste, host: np.ndarray, row: int) -> np.ndarray:
    """Row `row` of a completed paste (`host`: its regions as numpy) dropped into a writable copy of its
    idle frame."""
    job, (height, width) = pending.jobs[row], pending.sizes_px[row]
    x1, y1 = int(job.avatar.crop_boxes[job.frame][0]), int(job.avatar.crop_boxes[job.frame][1])
    frame = np.array(job.avatar.frames[job.frame])
    frame[y1 : y1 + height, x1 : x1 + width] = host[row, :height, :width]
    return frame


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _pad(tensor: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """`tensor` zero-padded at the end of its last dims (`F.pad` order); itself when nothing is missing."""
    import torch.nn.functional as F  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    return F.pad(tensor, pad) if any(pad) else tensor
