"""GPU speed-ups of the MuseTalk engine, each a switch in `AccelConfig` (all no-ops on CPU except buckets).

* **Batch buckets** — a render call of n frames runs at the smallest bucket ≥ n (padded with
  copies of its last frame), so only `len(batch_buckets)` shapes ever reach the models: CUDA
  graphs and compiled kernels are made once per bucket, and the sidecar's scheduler forms
  batches of these sizes (`realtime.sidecar.render_lane`).
* **CUDA graphs** (`cuda_graphs`) — the UNet and the VAE decode of each bucket are captured once
  (on first use or in `warm_up`) and replayed on static input buffers: at small batches the
  eager models are launch-bound (hundreds of kernels of microseconds each), a replay is one
  launch. The whisper encoder of the streaming path (always one 30 s segment) is graphed too.
  All graphs share one memory pool: they replay one after another on one stream.
* **torch.compile** (`compile_mode`) — inductor fuses the GroupNorm/SiLU/residual chains that
  dominate the VAE decode at large batches. Buckets ≥ 2 share one compile (the batch dimension
  is marked dynamic); bucket 1 gets its own static compile (`compile_batch1`; off: it runs
  eager, graphed). Compiled
  artifacts go to `compile_cache_dir` (default `$LIPSYNC_CACHE_DIR/compile` or
  `~/.cache/lipsync-live/compile`) and are reused across restarts: a warm start re-traces
  but skips code generation and Triton compilation (`bench.engine` reports both warm-ups).
* **Tuned kernels** (`compile_tuned_stages`) — inductor benchmarks launch configurations of
  each generated kernel of a stage's shared compile (coordinate descent) when it first runs, at
  the largest bucket; the batch-1 compiles are not tuned.
* **Serve before compile** (`serve_before_compile`) — with compile and graphs, the serving warm-up
  captures graphs of the eager modules (seconds) and the engine serves on them while a background
  thread compiles and captures the compiled graphs, which then replace them between two batches
  (`realtime.engine.hotswap`; the engine's `serving_state()` says which variant renders).
* **Channels-last maps under compile** (`compile_channels_last`) — inductor lays the conv maps
  out NHWC, the layout cuDNN's Hopper kernels use; left to itself it keeps NCHW for a dynamic
  batch, and every convolution then pays two layout transposes.
* **Channel-sum group norms** (`group_norm`) — the decoder's and UNet's GroupNorms computed from
  per-channel sums (`realtime.engine.groupnorm`), a reduction channels-last maps read at full
  bandwidth; inductor's own lowering strides across them.
* **Fused upsample convolutions** (`upsample_conv`) — the decoder's and UNet's "nearest 2×, then
  3×3 conv" layers run as one transposed convolution (or four 2×2 phase convolutions) on the
  source map: exact, 16/36 of the multiply-adds (`realtime.engine.upsample`).
* **Pinned transfers and copy/compute overlap** (`pinned_transfers`, `overlap_copy`) — the
  blended crop regions go to page-locked host memory with an asynchronous copy (optionally on
  a side stream), and the small uploads of a render are asynchronous too: `render_async`
  enqueues a batch and returns, and its frames are assembled on the host while the GPU
  computes the next batch (the render lane's pipelining).

Nothing here touches the GPU at import time; the device comes from the engine's config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from realtime.engine.groupnorm import GROUP_NORM_MODES, GroupNormMode
from realtime.engine.upsample import UPSAMPLE_CONV_MODES, UpsampleConvMode

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
MASK_FIRST_ROW_PX = 92  # first row of the 256² face where `lower_face_mask` is non-zero
# The crop must start above the mask by the paste resize's filter support (antialiased bilinear
# down to a ~200 px box: ~2 px) plus the decoder's zero-padding edge (a few rows): 10 -> row 80.
MAX_DECODE_FROM_LATENT_ROW = 10

LOWER_DECODE_NOTE = """\
Lower-half VAE decode decodes only latent rows r..31 (face rows 8r..255); the rows above are
filled with the first decoded row (the blend mask is 0 there, so they are never shown). It is
not exact: every GroupNorm of the decoder normalises with statistics over the rows it sees,
and the cropped decode does not see the upper face. The error therefore depends on the VAE
weights (tests/realtime/engine/test_accel.py measures it on the tiny random checkpoint and
records the < 1 grey level bound as an expected failure; bench/results/engine-accel-notes.md
has the speed-up and the exact alternatives tried). Keep it off (r = 0) unless real weights are
shown to stay within a grey level.
"""
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class AccelConfig:
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    cuda_graphs: bool = True  # CUDA only: replay captured graphs per bucket
    compile_mode: str = "off"  # "off" | "default" | "max-autotune-no-cudagraphs" (CUDA only)
    # default: $LIPSYNC_CACHE_DIR/compile or ~/.cache/lipsync-live/compile
    compile_cache_dir: Path | None = None
    # Pinned: `render_async` returns without waiting for the device (a pageable copy blocks the host until
    # the stream drains), which the render lane's pipelining needs. A side stream for the copies is off: the
    # regions are small and it measured slower (bench/results/engine-accel-notes.md).
    pinned_transfers: bool = True  # CUDA only: page-locked staging buffers for device -> host copies
    overlap_copy: bool = False  # CUDA only: device -> host copies on a side stream
    cudnn_benchmark: bool = True  # CUDA only: cuDNN picks the fastest kernels per shape (buckets: few shapes)
    channels_last: bool = False  # CUDA only: NHWC memory format for the UNet and VAE convolutions
    # Lower-half VAE decode: decode only latent rows [decode_from_latent_row, 32) (0: the whole face). See
    # `LOWER_DECODE_NOTE`: it is an approximation whose error depends on the VAE weights.
    decode_from_latent_row: int = 0
    # Exact rewrite of "nearest 2x upsample + 3x3 conv" (`realtime.engine.upsample`): "nearest" |
    # "transpose" | "phases" on any device, or "auto", the fastest per path
    # (bench/results/engine-accel-notes.md): "transpose" compiled channels-last, "phases" otherwise on CUDA,
    # "nearest" on CPU. Same output up to rounding.
    upsample_conv: str = "auto"
    # with compile_mode: bucket 1 gets its own static compile (else it runs eager)
    compile_batch1: bool = True
    # With compile_mode: inductor lays the convolutions' maps out channels-last (`force_layout_optimization`).
    # Its own heuristic never does for a dynamic batch, and cuDNN then wraps every conv in NCHW<->NHWC
    # transposes.
    compile_channels_last: bool = True
    # With compile_mode: the stages ("unet", "vae_decode") whose shared compile (buckets >= 2) tunes each
    # generated kernel's block sizes and warps by benchmark at its first launch (inductor's coordinate
    # descent). Only the VAE decode: its kernels gain the most for the cold compile time tuning costs once
    # (the tuned kernels are cached); the UNet and the batch-1 compiles gain little for much longer compiles
    # (bench/results/engine-accel-notes.md). `warm_up` runs the largest bucket first, so the tuning sees the
    # size that carries the load.
    compile_tuned_stages: tuple[str, ...] = ("vae_decode",)
    # With compile_mode and cuda_graphs: `warm_up_for_serving` captures graphs of the eager modules for every
    # bucket (seconds, cuDNN's heuristics instead of its benchmark) and returns, so the engine serves at once;
    # a background thread then compiles (from the prebuilt artifact when it matches), captures the compiled
    # graphs and swaps them in between two batches (`realtime.engine.hotswap`). Off: the warm-up returns only
    # once the compiled graphs are ready (minutes in a new process, even from the artifact). Opt-in until a
    # GPU
    # run has shown a capture on the build thread beside replays on the render thread to be safe.
    serve_before_compile: bool = False
    # "native" | "channel_sums" (`realtime.engine.groupnorm`: the same statistics from per-channel sums, which
    # channels-last maps read quickly), or "auto": channel_sums when compiling channels-last on CUDA, else
    # native.
    group_norm: str = "auto"

    def __post_init__(self) -> None:
        if self.upsample_conv not in ("auto", *UPSAMPLE_CONV_MODES):
            raise ValueError(
                f"upsample_conv must be auto or one of {', '.join(UPSAMPLE_CONV_MODES)}, "
                f"got {self.upsample_conv!r}"
            )
        if self.group_norm not in ("auto", *GROUP_NORM_MODES):
            raise ValueError(
                f"group_norm must be auto or one of {', '.join(GROUP_NORM_MODES)}, got {self.group_norm!r}"
            )
        if not set(self.compile_tuned_stages) <= {"unet", "vae_decode"}:
            raise ValueError(
                f"compile_tuned_stages may name unet and vae_decode, got {self.compile_tuned_stages!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {self.batch_buckets!r}")
        if tuple(sorted(set(self.batch_buckets))) != self.batch_buckets:
            raise ValueError(f"batch_buckets must be strictly increasing, got {self.batch_buckets!r}")
        if not 0 <= self.decode_from_latent_row <= MAX_DECODE_FROM_LATENT_ROW:
            raise ValueError(
                f"decode_from_latent_row must be in [0, {MAX_DECODE_FROM_LATENT_ROW}] "
                f"(the blend mask starts at face row {MASK_FIRST_ROW_PX}), got {self.decode_from_latent_row}"
            )

    @property
    def max_bucket(self) -> int:
        return self.batch_buckets[-1]

    def _compiled_channels_last(self, cuda: bool, compiled: bool | None) -> bool:
        compiled = self.compile_mode != "off" if compiled is None else compiled
        return cuda and compiled and self.compile_channels_last

    def upsample_conv_for(self, cuda: bool, compiled: bool | None = None) -> UpsampleConvMode:
        """The upsample form of the compiled path (`compiled` None: whenever `compile_mode` is on) or, with
        `compiled=False`, of the eager path (the graphs served while the compiled ones are built)."""
        if self.upsample_conv == "auto":
            if self._compiled_channels_last(cuda, compiled):
                return "transpose"  # no phase interleave pass over channels-last maps
            return "phases" if cuda else "nearest"
        return self.upsample_conv  # type: ignore[return-value]  # validated in __post_init__

    def group_norm_for(self, cuda: bool, compiled: bool | None = None) -> GroupNormMode:
        if self.group_norm == "auto":
            return "channel_sums" if self._compiled_channels_last(cuda, compiled) else "native"
        return self.group_norm  # type: ignore[return-value]  # validated in __post_init__


def bucket_for(frames: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `frames` (the largest bucket when none does: callers chunk by it)."""
    for bucket in buckets:
        if bucket >= frames:
            return bucket
    return buckets[-1]


def default_compile_cache_dir() -> Path:
    configured = os.environ.get("LIPSYNC_CACHE_DIR")
    return Path(configured) / "compile" if configured else Path.home() / ".cache" / "lipsync-live" / "compile"


def configure_compile_cache(cache_dir: Path | None) -> Path:
    """Point inductor's and Triton's on-disk caches at `cache_dir` (created) so compiled kernels survive
    restarts.

    Must run before the first compile of the process: inductor reads these variables when it
    first needs its cache directory.
    """
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    root = (cache_dir or default_compile_cache_dir()).resolve()
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    inductor_config: Any = torch._inductor.config
    inductor_config.fx_graph_cache = True  # the compiled graph for a traced graph's hash, across processes
    # One compile serves every bucket >= 2 (dynamic batch); give dynamo room for the others anyway.
    dynamo_config: Any = torch._dynamo.config
    dynamo_config.cache_size_limit = max(int(dynamo_config.cache_size_limit), 16)
    logger.info("compile cache configured", extra={"cache_dir": str(root)})
    return root


def compile_fn(
    fn: Callable[..., Any], mode: str, *, channels_last: bool = False, tune_kernels: bool = False
) -> Callable[..., Any]:
    """`torch.compile(fn)` in `mode`; `channels_last` forces inductor's channels-last layout of conv maps;
    `tune_kernels` has inductor tune each generated kernel's launch configuration by benchmark."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    # The mode's inductor options, spelled out: torch.compile takes either a mode or options, not both.
    options: dict[str, Any] = {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))
    if channels_last:
        options["force_layout_optimization"] = True
    if tune_kernels:
        options["coordinate_descent_tuning"] = True
    # dynamic=None: shapes stay static except dims marked by `mark_batch_dynamic`.
    compiled: Callable[..., Any] = torch.compile(fn, options=options or None)
    return compiled


def mark_batch_dynamic(tensors: Sequence[torch.Tensor], max_batch: int) -> None:
    """Mark dim 0 dynamic so one compiled graph serves the buckets >= 2 (`maybe_`: a bucket that dynamo still
    specialises, e.g. one equal to another dimension's size, gets its own compile instead of an error)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    del max_batch  # the guard dynamo derives may exclude some sizes; they recompile rather than fail
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


@dataclass
class BucketGraphs:
    """CUDA graphs of `fn(*inputs) -> tensor`, one per input batch size, replayed on static buffers.

    The returned tensor is the graph's static output: it is overwritten by the next replay of
    the same bucket, so callers consume (or copy) it before running this stage again.
    """

    fn: Callable[..., torch.Tensor]
    device: torch.device
    pool: Any  # torch.cuda graph memory pool handle shared by all stages
    before_capture: Callable[[list[torch.Tensor]], None] | None = None  # e.g. mark dynamic dims for compile
    _graphs: dict[int, _Captured] = field(default_factory=dict)

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        size = int(inputs[0].shape[0])
        captured = self._graphs.get(size)
        if captured is None:
            captured = self._capture(inputs)
            self._graphs[size] = captured
        for static, value in zip(captured.inputs, inputs, strict=True):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        captured.graph.replay()
        return captured.output

    def _capture(self, inputs: Sequence[torch.Tensor]) -> _Captured:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        static = [value.clone() for value in inputs]
        if self.before_capture is not None:
            self.before_capture(static)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture: lazy inits, cuDNN/cuBLAS plans, compilation
                self.fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (none should run, but a stray one must not break capture).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.fn(*static)
        logger.info("cuda graph captured", extra={"batch": int(static[0].shape[0])})
        return _Captured(graph, static, output)


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` with its batch grown to `size` by repeating its last row (real data: no NaN/denormal
    paths)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    missing = size - int(tensor.shape[0])
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
