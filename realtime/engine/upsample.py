"""Exact, cheaper forms of the "nearest 2× upsample, then 3×3 conv" layers of the UNet and the VAE decoder.

A 3×3 convolution over a nearest-neighbour 2× upsampled map reads every source pixel four
times over: each output pixel's 3×3 window covers only 2×2 distinct source pixels, and which
taps share a source pixel depends only on the output pixel's phase (row and column parity).
Summing those taps gives, per phase, a 2×2 kernel over the source map; the four phases
together are one stride-2 transposed convolution with a 4×4 kernel. Same result (up to
floating-point rounding), 16/36 of the multiply-adds, and no upsampled map in memory. In the
sd-vae decoder these layers are ~29 % of the decode's FLOPs (the 128² and 256² ones dominate),
so the whole decode does ~16 % less work.

Per axis, with source index i and 3-tap kernel (k0, k1, k2), nearest upsampling gives

    out[2i]     = k0·src[i-1] + (k1 + k2)·src[i]
    out[2i + 1] = (k0 + k1)·src[i] + k2·src[i+1]

which is `conv_transpose(src, [k2, k1 + k2, k0 + k1, k0], stride=2, padding=1)`: the 4-tap
kernel is `TAPS @ k` (TAPS below). Zero padding of the upsampled map is zero padding of the
source, so the borders match too.

`UpsampleConvMode` picks the form: "nearest" (the modules' own forward), "transpose" (one
transposed convolution), "phases" (one 2×2 convolution producing the four phases as channel
groups, then interleaved). Which is fastest is the convolution library's business; `bench.engine`
measures them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from realtime.engine.module_swap import switch_wrapped

if TYPE_CHECKING:
    import torch

UpsampleConvMode = Literal["nearest", "transpose", "phases"]
UPSAMPLE_CONV_MODES: tuple[UpsampleConvMode, ...] = ("nearest", "transpose", "phases")

# Row k of TAPS says which of the 3×3 kernel's taps (along one axis) sum into tap k of the 4-tap
# transposed kernel: [k2, k1+k2, k0+k1, k0].
TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
# For the 2×2 "phases" form: phase 0 reads source rows (i-1, i), phase 1 reads (i, i+1).
PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def _is_plain_upsample_conv(module: Any) -> bool:
    """A diffusers `Upsample2D` doing nearest 2× then a 3×3 stride-1 conv with padding 1, and nothing else."""
    conv = getattr(module, "conv", None)
    return (
        type(module).__name__ == "Upsample2D"
        and getattr(module, "use_conv", False)
        and not getattr(module, "use_conv_transpose", True)
        and getattr(module, "interpolate", False)
        and getattr(module, "norm", None) is None
        and conv is not None
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _exact(weight: torch.Tensor) -> torch.Tensor:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    return weight.to(torch.promote_types(weight.dtype, torch.float32))  # sums of fp16 taps in fp32 at least


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """`[Cout, Cin, 3, 3]` conv weight -> `[Cin, Cout, 4, 4]` stride-2 transposed-conv weight (fp32 or
    wider)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    exact = _exact(weight)
    taps = torch.tensor(TAPS, dtype=exact.dtype, device=weight.device)
    return torch.einsum("ku,lv,oiuv->iokl", taps, taps, exact)


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """`[Cout, Cin, 3, 3]` -> `[4·Cout, Cin, 2, 2]`: phase (a, b) at channel group 2a + b (fp32 or wider)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    exact = _exact(weight)
    taps = torch.tensor(PHASE_TAPS, dtype=exact.dtype, device=weight.device)  # [phase, 2, 3]
    phases = torch.einsum("apu,bqv,oiuv->aboipq", taps, taps, exact)
    cout, cin = weight.shape[:2]
    return phases.reshape(4 * cout, cin, 2, 2)


def _make_module() -> Any:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    import torch.nn.functional as F  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from torch import nn  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    class FusedUpsampleConv(nn.Module):
        """Stands in for a diffusers `Upsample2D` (same call signature); `mode` switches the form at any
        time."""

        original: Any  # the diffusers Upsample2D (its conv holds the weights)
        out_channels: int

        def __init__(self, original: Any, mode: UpsampleConvMode) -> None:
            super().__init__()
            self.original = original
            self.mode: UpsampleConvMode = mode
            self.channels = int(original.channels)
            self.out_channels = int(original.out_channels)
            # Derived kernels are buffers, not parameters: state_dict() and the loader see the original
            # layout.
            for name in ("transpose_weight", "phase_weight", "phase_bias"):
                self.register_buffer(name, None, persistent=False)
            self.refresh()

        def forward(
            self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            doubled = output_size is None or tuple(output_size) == tuple(
                2 * s for s in hidden_states.shape[-2:]
            )
            if self.mode == "nearest" or not doubled:
                return self.original(hidden_states, output_size, *args, **kwargs)
            bias = self.original.conv.bias
            if self.mode == "transpose":
                return F.conv_transpose2d(hidden_states, self.transpose_weight, bias, stride=2, padding=1)
            height, width = hidden_states.shape[-2:]
            phases = F.conv2d(F.pad(hidden_states, (1, 1, 1, 1)), self.phase_weight, self.phase_bias)
            batch = phases.shape[0]
            grid = phases.view(batch, 2, 2, self.out_channels, height + 1, width + 1)
            # Phase (a, b) of output pixel (i, j) sits at (i + a, j + b) of its padded-input conv output.
            rows = [
                torch.stack([grid[:, a, b, :, a : a + height, b : b + width] for b in (0, 1)], dim=-1)
                for a in (0, 1)
            ]
            interleaved = torch.stack(rows, dim=3)  # [B, C, H, 2, W, 2]
            return interleaved.reshape(batch, self.out_channels, 2 * height, 2 * width)

        def refresh(self) -> None:
            """Re-derive the kernels after the original conv's weights or dtype changed."""
            conv: Any = self.original.conv
            self.transpose_weight = transposed_kernel(conv.weight).to(conv.weight.dtype)
            self.phase_weight = phase_kernel(conv.weight).to(conv.weight.dtype)
            self.phase_bias = _phase_bias(conv.bias)

    return FusedUpsampleConv


def _phase_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.repeat(4)


@functools.cache
def _module_class() -> Any:
    return _make_module()  # built on first use: importing this module never imports torch


def set_upsample_conv_mode(root: torch.nn.Module, mode: UpsampleConvMode) -> int:
    """Put every plain upsample-conv layer under `root` in `mode` (wrapping them on first use); returns how
    many.

    Idempotent and reversible: "nearest" runs the original modules. Call again after changing the
    models' dtype (the derived kernels follow the original weights' dtype at that call).
    """
    if mode not in UPSAMPLE_CONV_MODES:
        raise ValueError(f"upsample conv mode must be one of {', '.join(UPSAMPLE_CONV_MODES)}, got {mode!r}")
    return switch_wrapped(
        root,
        _module_class(),
        mode,
        original_mode="nearest",
        wraps=_is_plain_upsample_conv,
        on_switch=_follow_dtype,
    )


def _follow_dtype(wrapper: Any) -> None:
    if wrapper.transpose_weight.dtype != wrapper.original.conv.weight.dtype:
        wrapper.refresh()
