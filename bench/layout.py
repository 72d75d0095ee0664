"""Layout benchmark: the compiled UNet / VAE decode of one large bucket under inductor's layout choices.

    python -m bench.layout --json PATH [--configs a,b,...] [--batch 64] [--budget-s 500]

Each config runs in its own process (inductor's settings are process-wide): it builds the
full-size models with random weights on CUDA (fp16, fused upsample phases), compiles one stage
and times it at one batch size (median of CUDA-event timings), checks it against eager, and
sums its kernels by kind from one profiled call. A conv micro-benchmark gives cuDNN's rate for
the decoder's shapes in NCHW and NHWC.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from realtime.engine.device import choose_device
from realtime.engine.groupnorm import set_group_norm_mode
from realtime.engine.musetalk.engine import decode_faces, unet_step
from realtime.engine.musetalk.weights.random import random_models
from realtime.engine.upsample import set_upsample_conv_mode

logger = logging.getLogger("bench.layout")

# The engine's compiled stages (dynamic batch, channels-last, channel-sum norms; the VAE with transposed
# upsampling).
ENGINE_UNET: dict[str, Any] = {
    "stage": "unet",
    "compile": "dynamic",
    "force_layout": True,
    "group_norm": "channel_sums",
}
ENGINE_VAE: dict[str, Any] = {**ENGINE_UNET, "stage": "vae", "upsample": "transpose"}
# each Triton kernel's launch config tuned by benchmark
TUNED = {"inductor": {"coordinate_descent_tuning": True}}

CONFIGS: dict[str, dict[str, Any]] = {
    "vae-dyn": {"stage": "vae", "compile": "dynamic"},
    "vae-static": {"stage": "vae", "compile": "static"},
    "vae-dyn-force": {"stage": "vae", "compile": "dynamic", "force_layout": True},
    "vae-static-freeze": {"stage": "vae", "compile": "static", "freezing": True},
    "unet-dyn": {"stage": "unet", "compile": "dynamic"},
    "unet-static": {"stage": "unet", "compile": "static"},
    "unet-dyn-force": {"stage": "unet", "compile": "dynamic", "force_layout": True},
    "vae-static-mat": {"stage": "vae", "compile": "static", "mode": "max-autotune-no-cudagraphs"},
    "vae-force-sums": {
        "stage": "vae",
        "compile": "dynamic",
        "force_layout": True,
        "group_norm": "channel_sums",
    },
    "vae-force-sums-tconv": ENGINE_VAE,
    "vae-force-tconv": {"stage": "vae", "compile": "dynamic", "force_layout": True, "upsample": "transpose"},
    "vae-force-sums-nearest": {
        "stage": "vae",
        "compile": "dynamic",
        "force_layout": True,
        "group_norm": "channel_sums",
        "upsample": "nearest",
    },
    "vae-dyn-sums": {"stage": "vae", "compile": "dynamic", "group_norm": "channel_sums"},
    "unet-force-sums": ENGINE_UNET,
    "vae-engine-cdt": {**ENGINE_VAE, **TUNED},
    "unet-engine-cdt": {**ENGINE_UNET, **TUNED},
}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "nchwtonhwc" in lowered or "nhwctonchw" in lowered or "transpose" in lowered:
        return "layout"
    if lowered.startswith("triton") or "triton_" in lowered:
        return "triton"
    if any(k in lowered for k in ("conv", "xmma", "implicit", "fprop", "dgrad", "cudnn", "sm90_xmma")):
        return "conv"
    if any(k in lowered for k in ("gemm", "cutlass", "flash", "fmha", "attention")):
        return "gemm/attention"
    return "other"


def run_one(name: str, batch: int, out: Path) -> None:
    import torch  # noqa: PLC0415 (heavy: torch)

    config = CONFIGS[name]
    inductor: Any = torch._inductor.config
    if config.get("force_layout"):
        inductor.force_layout_optimization = True
    if config.get("freezing"):
        inductor.freezing = True
    torch.backends.cudnn.benchmark = True
    smoke = os.environ.get("LAYOUT_SMOKE") == "1"  # CPU, tiny model: checks this script, not speed
    device = choose_device("cpu", "float32") if smoke else choose_device("cuda", "float16")
    models = random_models("tiny" if smoke else "full", device)
    dtype = device.torch_dtype()
    for module in (models.unet, models.vae):
        set_upsample_conv_mode(module, config.get("upsample", "phases"))
        set_group_norm_mode(module, config.get("group_norm", "native"))
    dev = device.torch_device()
    timestep = torch.zeros(1, device=dev, dtype=torch.long)

    if config["stage"] == "vae":

        def fn(latents: torch.Tensor) -> torch.Tensor:
            return decode_faces(models, latents)

        inputs = [torch.randn(batch, 4, 32, 32, device=dev, dtype=dtype)]
    else:

        def fn(latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:  # type: ignore[misc]
            return unet_step(models, latents, features, timestep)

        inputs = [
            torch.randn(batch, 8, 32, 32, device=dev, dtype=dtype),
            torch.randn(batch, 50, 384, device=dev, dtype=dtype),
        ]

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()

    result: dict[str, Any] = {"config": name, **config, "batch": batch}
    with torch.inference_mode():
        reference = fn(*inputs).float()
        compiled = fn
        if config.get("compile"):
            options: dict[str, Any] = {"mode": config["mode"]} if config.get("mode") else {}
            if config.get("inductor"):
                options = {"options": dict(config["inductor"])}  # torch.compile takes a mode or options
            compiled = torch.compile(fn, **options)
            if config["compile"] == "dynamic":
                for tensor in inputs:
                    torch._dynamo.mark_dynamic(tensor, 0)
        started = time.perf_counter()
        output = compiled(*inputs)
        sync()
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["max_abs_diff_vs_eager"] = float((output.float() - reference).abs().max())
        for _ in range(3):
            compiled(*inputs)
        times = []
        for _ in range(12):
            sync()
            tick = time.perf_counter()
            compiled(*inputs)
            sync()
            times.append((time.perf_counter() - tick) * 1000)
        result["ms_median"] = round(statistics.median(times), 3)
        result["ms_min"] = round(min(times), 3)
        result["fps"] = round(batch / statistics.median(times) * 1000, 1)
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 (heavy: torch)

        with profile(activities=[ProfilerActivity.CPU if smoke else ProfilerActivity.CUDA]) as prof:
            compiled(*inputs)
            sync()
        kinds: dict[str, float] = {}
        kernels: list[tuple[float, str]] = []
        for event in prof.key_averages():
            device_us = float(
                getattr(event, "self_cpu_time_total" if smoke else "self_device_time_total", 0.0) or 0.0
            )
            if device_us <= 0:
                continue
            kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + device_us / 1000
            kernels.append((device_us / 1000, event.key[:90]))
        result["kernel_ms_by_kind"] = {
            k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
        }
        result["top_kernels"] = [[round(ms, 2), key] for ms, key in sorted(kernels, reverse=True)[:12]]
    out.write_text(json.dumps(result) + "\n")


def conv_rates(batch: int) -> list[dict[str, Any]]:
    import torch  # noqa: PLC0415 (heavy: torch)

    torch.backends.cudnn.benchmark = True
    rows = []
    shapes = [
        (128, 128, 256),
        (256, 128, 256),
        (256, 256, 128),
        (512, 256, 128),
        (512, 512, 64),
        (512, 512, 32),
    ]
    with torch.inference_mode():
        for c_in, c_out, size in shapes:
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).cuda().half()
            x = torch.randn(batch, c_in, size, size, device="cuda", dtype=torch.float16)
            flops = 2 * batch * size * size * c_in * c_out * 9
            for layout in ("nchw", "nhwc"):
                if layout == "nhwc":
                    conv = conv.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                for _ in range(3):
                    conv(x)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    conv(x)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / 10
                rows.append(
                    {
                        "c_in": c_in,
                        "c_out": c_out,
                        "px": size,
                        "layout": layout,
                        "ms": round(ms, 3),
                        "tflops": round(flops / ms / 1e9, 1),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=500)
    parser.add_argument("--one", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.one:
        run_one(args.one, args.batch, args.out)
        return
    started = time.perf_counter()
    import torch  # noqa: PLC0415 (heavy: torch)

    smoke = os.environ.get("LAYOUT_SMOKE") == "1"
    report: dict[str, Any] = {
        "benchmark": "layout",
        "device": "cpu (smoke: tiny model)" if smoke else str(torch.cuda.get_device_name(0)),
        "torch": torch.__version__,
        "settings": {
            "model": "tiny" if smoke else "full-size-random",
            "dtype": "float32" if smoke else "float16",
            "batch": args.batch,
            "timing": "median of 12 calls after 3, CUDA-synchronised; kernels summed by kind from one "
            "profiled call",
        },
        "summary": {},
        "conv_rates": [] if smoke else conv_rates(args.batch),
        "results": [],
    }
    for row in report["conv_rates"]:
        logger.info("conv %s", row)
    for name in args.configs.split(","):
        left = args.budget_s - (time.perf_counter() - started)
        if left < 60:
            logger.info("skipped %s: %.0f s left", name, left)
            continue
        part = args.json.with_suffix(f".{name}.json")
        command = [
            sys.executable,
            "-m",
            "bench.layout",
            "--json",
            str(args.json),
            "--one",
            name,
            "--batch",
            str(args.batch),
            "--out",
            str(part),
        ]
        try:
            subprocess.run(command, timeout=left, check=True, env=dict(os.environ))
            row = json.loads(part.read_text())
        except (subprocess.SubprocessError, OSError, ValueError) as error:
            row = {"config": name, "error": str(error)[:300]}
        logger.info("result %s", json.dumps(row))
        report["results"].append(row)
        if "ms_median" in row:
            report["summary"][f"{name}_ms"] = row["ms_median"]
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    for row in report["results"]:
        logger.info(
            "%-20s ms %s fps %s compile %s diff %s kinds %s",
            row["config"],
            row.get("ms_median"),
            row.get("fps"),
            row.get("compile_s"),
            row.get("max_abs_diff_vs_eager"),
            row.get("kernel_ms_by_kind", row.get("error")),
        )


if __name__ == "__main__":
    main()
