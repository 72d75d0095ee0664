"""Device, dtype and CPU-thread choices. Nothing here runs at import time."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda", "cuda:1", "cpu"
    dtype_name: str  # "float16" on CUDA, "float32" on CPU
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_device(self) -> torch.device:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        dtype: torch.dtype = getattr(torch, self.dtype_name)
        return dtype


def choose_device(requested: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """`requested`: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; `dtype`: "auto", "float16",
    "float32".

    fp16 on CUDA (as MuseTalk runs), fp32 on CPU (fp16 convolutions on CPU are slow or unsupported).
    """
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    if requested == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reason = "CUDA is available" if device == "cuda" else "no CUDA device is visible"
    else:
        device = requested
        reason = "requested"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was requested but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    return DeviceChoice(device=device, dtype_name=dtype, reason=reason)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (host) on `device` without waiting for the work queued there: from page-locked memory, copied
    asynchronously in stream order. A pageable copy would block the host until the stream drained, so a render
    lane could not prepare the next batch while the device still computes this one."""
    if device.type != "cuda":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)


def host_staging(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty 1-D host tensor to fill, then `upload` without another copy (page-locked when `device` is
    CUDA)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    return torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")


class StagingPool:
    """Host byte buffers kept for reuse (page-locking a fresh one on CUDA costs milliseconds): `take` hands
    out the smallest free buffer that fits, or a new one with headroom; `give_back` returns one for reuse
    and keeps at most `max_free`, dropping the smallest."""

    def __init__(self, device: torch.device, *, max_free: int, headroom: float = 1.25) -> None:
        self._device = device
        self._max_free = max_free
        self._headroom = headroom  # a new buffer's slack: batches of slightly more frames still fit it
        self._free: list[torch.Tensor] = []

    def take(self, numel: int) -> torch.Tensor:
        fitting = [k for k, buffer in enumerate(self._free) if buffer.numel() >= numel]
        if fitting:
            return self._free.pop(min(fitting, key=lambda k: self._free[k].numel()))
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        return host_staging(int(numel * self._headroom) + 1, torch.uint8, self._device)

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)
        if len(self._free) > self._max_free:
            # By position: `list.remove` would compare tensors with `==` (elementwise), which raises for
            # unequal sizes (bench/results/engine-accel-notes.md).
            del self._free[min(range(len(self._free)), key=lambda k: self._free[k].numel())]

    @property
    def free_numels(self) -> list[int]:
        return sorted(buffer.numel() for buffer in self._free)


def configure_cpu_threads(threads: int | None = None) -> int:
    """Bound torch's intra-op threads (default: the cores this process may use) and return the count.

    torch defaults to every core of the host, which oversubscribes a shared machine; the
    scheduler affinity is what this process may actually use.
    """
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch cpu threads set", extra={"threads": threads})
    return threads
