"""GroupNorm as per-channel sums: the same statistics, in a form that channels-last maps read quickly.

`nn.GroupNorm` normalises each (sample, group) over the group's channels and every pixel.
Inductor lowers it as one reduction over a `[B, G, C/G · H · W]` view; on a channels-last map
that view is not contiguous and its reduction walks memory with a stride of C elements, which
makes the VAE decode's norms a large share of its batch (figures: `bench.layout`,
bench/results/engine-accel-notes.md). Here the statistics come from per-channel sums over the
pixels (a reduction along the contiguous channel axis in channels-last, and along the pixels in
the contiguous layout),
folded into groups on tiny `[B, C]` tensors:

    mean_g = mean_c∈g mean_hw x          var_g = mean_c∈g mean_hw x² − mean_g²

in float32, then `(x − mean_g) · rsqrt(var_g + eps) · weight + bias`. It equals
`F.group_norm` up to float rounding (tests compare them); `GroupNormMode` "native" keeps the
modules' own forward.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from realtime.engine.module_swap import switch_wrapped

if TYPE_CHECKING:
    import torch

GroupNormMode = Literal["native", "channel_sums"]
GROUP_NORM_MODES: tuple[GroupNormMode, ...] = ("native", "channel_sums")


def channel_sum_group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` for `x` of shape [B, C, *spatial], via per-channel
    sums."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    batch, channels = int(x.shape[0]), int(x.shape[1])
    spatial = tuple(range(2, x.dim()))
    per_group = channels // groups
    values = x.float()
    channel_mean = values.mean(dim=spatial)  # [B, C]
    channel_square = (values * values).mean(dim=spatial)
    mean = channel_mean.view(batch, groups, per_group).mean(-1)  # [B, G]
    variance = (channel_square.view(batch, groups, per_group).mean(-1) - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(variance + eps)
    scale = rstd.repeat_interleave(per_group, dim=1)  # [B, C]
    shift = -(mean * rstd).repeat_interleave(per_group, dim=1)
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    view = (batch, channels) + (1,) * len(spatial)
    return (values * scale.view(view) + shift.view(view)).to(x.dtype)


def _make_module() -> Any:
    from torch import nn  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    class ChannelSumGroupNorm(nn.Module):
        """Stands in for an `nn.GroupNorm` (its parameters stay on the original); `mode` switches at any
        time."""

        def __init__(self, original: nn.GroupNorm, mode: GroupNormMode) -> None:
            super().__init__()
            self.original = original
            self.mode: GroupNormMode = mode

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            norm = self.original
            if self.mode == "native":
                out: torch.Tensor = norm(x)
                return out
            return channel_sum_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    return ChannelSumGroupNorm


@functools.cache
def _module_class() -> Any:
    return _make_module()  # built on first use: importing this module never imports torch


def set_group_norm_mode(root: torch.nn.Module, mode: GroupNormMode) -> int:
    """Put every `nn.GroupNorm` under `root` in `mode` (wrapping them on first use); returns how many.

    Idempotent and reversible ("native" runs the original modules); `state_dict()` keys change
    under the wrapper (`.original.`), so load weights before switching, as the engine does.
    """
    from torch import nn  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    if mode not in GROUP_NORM_MODES:
        raise ValueError(f"group norm mode must be one of {', '.join(GROUP_NORM_MODES)}, got {mode!r}")
    return switch_wrapped(
        root,
        _module_class(),
        mode,
        original_mode="native",
        wraps=lambda module: isinstance(module, nn.GroupNorm),
    )
