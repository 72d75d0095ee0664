"""Engine benchmark: frames/s per batch size and per stage (features, UNet, VAE decode, blend).

    python -m bench.engine --json PATH [--device auto|cpu|cuda] [--model tiny|full-size-random]

`tiny` writes a tiny random checkpoint and loads it through the real loader (CPU smoke);
`full-size-random` builds MuseTalk v1.5's full architecture (UNet 320/640/1280/1280, sd-vae,
whisper-tiny) with random weights directly on the device — the same cost as real weights.
The avatar is the astronaut photo (a real face) at 512×512 with small motion, prepared by the
engine (face detection, crops, latents). Stages:

* features — one stream pull of B frames (whisper encode of the utterance's 30 s segment,
  window gather, positional encoding), as a session pulling every B frames pays it;
* unet, vae_decode, blend — one `render` call of B speaking requests, each stage
  device-synchronised (the profiled pass; the unprofiled pass gives the end-to-end figure).

fps(B) = B / (features + render) wall time: one batch at a time, the host idle while the device
works and the reverse. fps_pipelined(B) = B / the wall time per batch of batches run back to
back as the render lane runs them under load (`render_async`: the next batch's features and
start overlap the device work of the one before, its frames are assembled during the next);
the aggregate rate one GPU serves. `--variants` measures several engine settings on
the same models in one process (each a `realtime.engine.accel.AccelConfig`, see VARIANTS):
`eager` (no graphs, no cuDNN autotuning, plain upsampling), `graphs` (CUDA graphs per batch
bucket, cuDNN benchmark, fused upsample convolutions as 2×2 phases), `graphs-nearest` and
`graphs-tconv` (the other upsample forms), `graphs-pinned` (+ pinned, side-stream copies),
`graphs-cl` (+ channels-last), `lower` (+ lower-half decode), `compile` (inductor, default
mode, channels-last conv maps, channel-sum group norms and tuned kernels, + graphs, every
bucket; warm-up time = compile time, cold or warm from the on-disk cache), `compile-untuned`
(without the kernel tuning), `compile-blocking` (the serving warm-up waits for the compiled
graphs instead of serving eager graphs while a background thread compiles), `compile-pageable`
(device -> host copies to pageable memory: `render_async` then waits for the device, nothing
pipelines), `compile-nchw` (inductor's own
layout choice: NCHW for a dynamic batch), `compile-cl-native` (channels-last with torch's
group norm), `compile-nearest` (the same with plain upsampling), `compile-mat`
(max-autotune-no-cudagraphs), `bf16` (graphs with the models cast to bfloat16: run it last).
The summary is the variant with the best peak; every variant's rows are kept.
The preview engine is measured too (512×512, one CPU thread). Imports only torch, numpy,
transformers, opencv (and diffusers for the models, scikit-image for the face detector).

    python -m bench.engine --json PATH --prep-frames 250 --prep-px 512 [--device ...] [--model ...]

measures avatar preparation instead (nothing else): a frames zip of the astronaut at
`--prep-px`² with `--prep-frames` frames, prepared cold (decode, face detection, crops, VAE
latents, BiSeNet parsing and the jaw masks, cache write) and then again from the cache. It builds
only what preparation runs: the VAE (tiny, or sd-vae's full architecture, random weights) and
the BiSeNet face parser (random weights, the real architecture): no UNet, no whisper.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import cpu_name
from realtime.engine.accel import AccelConfig
from realtime.engine.avatar.prepare import (
    FACE_BOX_MODES,
    PrepareSettings,
    load_face_box_models,
    prepare_avatar,
)
from realtime.engine.avatar.workers import prepare_threads
from realtime.engine.device import choose_device, configure_cpu_threads
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.musetalk.latents import encode_crop_latents
from realtime.engine.musetalk.weights.face_parse import FaceParser, build_bisenet
from realtime.engine.musetalk.weights.loader import load_musetalk
from realtime.engine.musetalk.weights.random import configs, random_models, write_checkpoint
from realtime.engine.preview import PreviewEngine
from realtime.engine.protocol import EngineConfig, RenderRequest, StageProfile

logger = logging.getLogger("bench.engine")

FRAME_PX = 512
AVATAR_FRAMES = 16


def device_name(device: str) -> str:
    import torch  # noqa: PLC0415 (heavy: torch)

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return cpu_name()


def astronaut_zip(size: int = FRAME_PX, count: int = AVATAR_FRAMES) -> bytes:
    """The astronaut photo moving by a few pixels per frame, as a frames zip."""
    import cv2  # noqa: PLC0415 (heavy: OpenCV)
    from skimage.data import astronaut  # noqa: PLC0415 (heavy: scikit-image)

    image = cv2.resize(astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(count):
            phase = 2 * np.pi * k / count
            shift = np.array([[1, 0, 3.0 * np.sin(phase)], [0, 1, 2.0 * np.cos(phase)]], dtype=np.float32)
            frame = cv2.warpAffine(image, shift, (size, size), borderMode=cv2.BORDER_REFLECT)
            ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            assert ok
            archive.writestr(f"frame_{k}.png", png.tobytes())
    return buffer.getvalue()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated signal at 16 kHz (timing does not depend on what is said)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16_000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
    return (0.15 * voiced * envelope + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"cuda_graphs": False, "cudnn_benchmark": False, "upsample_conv": "nearest"},
    "graphs": {"cuda_graphs": True},  # upsample_conv "auto": the 2x2 phase convolutions on CUDA
    "graphs-nearest": {"cuda_graphs": True, "upsample_conv": "nearest"},
    "graphs-tconv": {"cuda_graphs": True, "upsample_conv": "transpose"},
    "graphs-pinned": {"cuda_graphs": True, "pinned_transfers": True, "overlap_copy": True},
    "graphs-nocudnnbench": {"cuda_graphs": True, "cudnn_benchmark": False},
    "graphs-cl": {"cuda_graphs": True, "channels_last": True},
    "compile-cl": {"cuda_graphs": True, "compile_mode": "default", "channels_last": True},
    # channels-last, channel-sum norms, tuned VAE
    "compile": {"cuda_graphs": True, "compile_mode": "default"},
    "compile-untuned": {"cuda_graphs": True, "compile_mode": "default", "compile_tuned_stages": ()},
    # eager graphs served at once while the compiled ones build in the background (`--serve-before-compile`)
    "compile-serve-first": {"cuda_graphs": True, "compile_mode": "default", "serve_before_compile": True},
    "compile-untuned-serve-first": {
        "cuda_graphs": True,
        "compile_mode": "default",
        "compile_tuned_stages": (),
        "serve_before_compile": True,
    },
    "compile-pageable": {"cuda_graphs": True, "compile_mode": "default", "pinned_transfers": False},
    "compile-nchw": {"cuda_graphs": True, "compile_mode": "default", "compile_channels_last": False},
    "compile-cl-native": {"cuda_graphs": True, "compile_mode": "default", "group_norm": "native"},
    "compile-nearest": {"cuda_graphs": True, "compile_mode": "default", "upsample_conv": "nearest"},
    "compile-eager": {"cuda_graphs": False, "compile_mode": "default"},
    "compile-mat": {"cuda_graphs": True, "compile_mode": "max-autotune-no-cudagraphs"},
    "lower": {"cuda_graphs": True, "decode_from_latent_row": 10},
    "compile-lower": {"cuda_graphs": True, "compile_mode": "default", "decode_from_latent_row": 10},
    "bf16": {"cuda_graphs": True, "dtype": "bfloat16"},
}


def build_models(args: argparse.Namespace, cache_dir: Path) -> Any:
    device = choose_device(args.device, args.dtype)
    if not device.is_cuda:
        configure_cpu_threads(args.threads)
    if args.model == "tiny":
        model_dir = cache_dir / "models"
        write_checkpoint(model_dir, "tiny")
        return load_musetalk(model_dir, device)
    return random_models("full", device)


def build_engine(
    args: argparse.Namespace, cache_dir: Path, models: Any, variant_config: dict[str, Any]
) -> Any:
    """An engine over `models` with the variant's accel settings (`dtype` casts the shared models in
    place)."""

    import torch  # noqa: PLC0415 (heavy: torch)

    settings = dict(variant_config)
    dtype = settings.pop("dtype", None)
    if dtype is not None and dtype != models.device.dtype_name:
        for module in (models.unet, models.vae, models.whisper_encoder):
            module.to(dtype=getattr(torch, dtype))
        models.device = dataclasses.replace(models.device, dtype_name=dtype)
    if args.buckets:
        settings["batch_buckets"] = tuple(args.buckets)
    if args.compile_cache_dir is not None:
        settings["compile_cache_dir"] = args.compile_cache_dir
    config = EngineConfig(
        engine="musetalk",
        device=models.device.device,
        cache_dir=cache_dir,
        max_batch_size=max(args.batches),
        accel=AccelConfig(**settings),
    )
    return MuseTalkEngine(models, config, None)


def percentile_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def bench_musetalk(
    args: argparse.Namespace, cache_dir: Path, models: Any, variant: str, settings: dict[str, Any]
) -> dict[str, Any]:
    import torch  # noqa: PLC0415 (heavy: torch)

    engine = build_engine(args, cache_dir, models, settings)
    sync = engine.synchronize
    started = time.perf_counter()
    avatar = engine.prepare_avatar(astronaut_zip())
    prepare_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    engine.warm_up_buckets(max(args.batches))  # graph captures and compiles happen here, not in the rows
    warm_up_ms = (time.perf_counter() - started) * 1000
    print(f"[{variant}] warm-up (captures/compiles) {warm_up_ms:.0f} ms", flush=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    audio = speech_like(40.0)
    reference = engine.offline_frames(audio[: 16_000 * 4])  # features for render requests
    stream = engine.open_stream()
    cursor = 0

    def pull(count: int, *, synchronized: bool = True) -> tuple[list[Any], float]:
        nonlocal stream, cursor
        if cursor + count * 640 > len(audio) - 4 * 640:
            stream, cursor = engine.open_stream(), 0
            stream.push(audio[: 2 * 640])
            cursor = 2 * 640
        if synchronized:
            sync()
        t0 = time.perf_counter()
        stream.push(audio[cursor : cursor + count * 640])
        frames = stream.pull()
        if synchronized:
            sync()
        cursor += count * 640
        return frames, (time.perf_counter() - t0) * 1000

    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        try:
            rows.append(
                measure_batch(
                    engine, avatar, reference=reference, pull=pull, batch=batch, args=args, variant=variant
                )
            )
        except Exception as exc:  # a failing batch size (e.g. out of memory) must not lose the others
            logger.exception("batch %d failed", batch)
            rows.append({"batch": batch, "error": f"{type(exc).__name__}: {exc}"})
    ok_rows = [r for r in rows if "error" not in r]
    if not ok_rows:
        raise RuntimeError(f"every batch size failed: {rows}")
    peak = max(ok_rows, key=lambda r: r["fps"])
    peak_pipelined = max(ok_rows, key=lambda r: r["fps_pipelined"])
    first = next((r for r in ok_rows if r["batch"] == 1), ok_rows[0])
    memory = torch.cuda.max_memory_allocated() / 2**30 if engine.info.device.startswith("cuda") else None
    return {
        "summary": {
            "fps_batch1": first["fps"],
            "latency_ms_batch1": first["latency_ms"],
            "render_ms_batch1": first["render_ms"],
            "fps_peak": peak["fps"],
            "batch_at_peak": peak["batch"],
            "fps_peak_pipelined": peak_pipelined["fps_pipelined"],
            "batch_at_peak_pipelined": peak_pipelined["batch"],
            "stage_ms": peak["stage_ms"],
            "avatar_prepare_ms": round(prepare_ms, 1),
            "warm_up_ms": round(warm_up_ms, 1),
            "model_load_ms": round(engine.models.load_ms, 1),
            "gpu_max_allocated_gib": round(memory, 2) if memory is not None else None,
        },
        "results": rows,
        "engine": engine,
    }


def measure_batch(
    engine: Any,
    avatar: Any,
    *,
    reference: list[Any],
    pull: Any,
    batch: int,
    args: argparse.Namespace,
    variant: str,
) -> dict[str, Any]:
    sync = engine.synchronize
    requests = [
        RenderRequest(avatar, k, reference[(k * 7) % len(reference)].features, 1.0) for k in range(batch)
    ]
    for _ in range(args.warmup):
        pull(batch)
        engine.render(requests)
    sync()
    total_ms, feature_ms, render_only_ms = [], [], []
    for _ in range(args.iters):
        _, f_ms = pull(batch)
        t0 = time.perf_counter()
        out = engine.render(requests)
        sync()
        render_ms = (time.perf_counter() - t0) * 1000
        assert len(out) == batch
        feature_ms.append(f_ms)
        render_only_ms.append(render_ms)
        total_ms.append(f_ms + render_ms)
    stages: dict[str, list[float]] = {"unet": [], "vae_decode": [], "blend": []}
    for _ in range(max(3, args.iters // 2)):
        profile = StageProfile(sync=sync)
        engine.render(requests, profile=profile)
        for name, values in stages.items():
            values.append(profile.ms[name])
    stage_ms = {"features": percentile_ms(feature_ms)} | {k: percentile_ms(v) for k, v in stages.items()}
    latency = percentile_ms(total_ms)
    pipelined_ms = pipelined_batch_ms(engine, requests, pull, batch=batch, rounds=max(4, args.iters))
    row = {
        "batch": batch,
        "fps": round(batch * 1000 / latency, 2),
        "fps_pipelined": round(batch * 1000 / pipelined_ms, 2),
        "pipelined_batch_ms": round(pipelined_ms, 3),
        "latency_ms": latency,
        "render_ms": percentile_ms(render_only_ms),  # UNet + VAE + blend, without the feature pull
        "stage_ms": stage_ms,
        "stage_fps": {k: round(batch * 1000 / v, 1) if v > 0 else None for k, v in stage_ms.items()},
    }
    print(
        f"[{variant}] batch {batch:3d}: {row['fps']:8.2f} fps  pipelined {row['fps_pipelined']:8.2f} fps  "
        f"latency {latency:9.2f} ms  stages {stage_ms}",
        flush=True,
    )
    return row


def pipelined_batch_ms(engine: Any, requests: list[Any], pull: Any, *, batch: int, rounds: int) -> float:
    """Wall ms per batch when batches follow each other as the render lane runs them under load: each round
    pulls the next batch's features and starts its render while the previous batch is still on the device,
    then collects the previous one (`render_async`), so the host's frame assembly and feature work overlap the
    device."""
    engine.synchronize()
    started = time.perf_counter()
    previous = None
    for _ in range(rounds):
        pull(batch, synchronized=False)
        handle = engine.render_async(requests)
        if previous is not None:
            assert len(previous.result()) == batch
        previous = handle
    if previous is not None:
        previous.result()
    return (time.perf_counter() - started) * 1000 / rounds


def bench_preview(iters: int, cache_dir: Path) -> dict[str, Any]:
    """Preview engine at 512×512 on one CPU thread (cv2 and torch limited to one)."""
    import cv2  # noqa: PLC0415 (heavy: OpenCV)

    cv2.setNumThreads(1)
    engine = PreviewEngine(EngineConfig(engine="preview", cache_dir=cache_dir))
    avatar = engine.prepare_avatar(astronaut_zip())
    frames = engine.offline_frames(speech_like(8.0, seed=1))
    # Only frames whose mouth is open: the idle ones cost nothing and would flatter the figure.
    requests = [
        RenderRequest(avatar, f.index, f.features, 1.0) for f in frames if float(f.features[0]) >= 0.05
    ]
    engine.render(requests[:25])
    t0 = time.perf_counter()
    count = 0
    for _ in range(max(1, iters // 5)):
        engine.render(requests)
        count += len(requests)
    elapsed = time.perf_counter() - t0
    return {"fps": round(count / elapsed, 1), "frames": count, "frame_px": [FRAME_PX, FRAME_PX], "threads": 1}


def bench_prepare(args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """Cold and cached preparation of a `--prep-frames` × `--prep-px`² avatar (see the module docstring)."""
    import torch  # noqa: PLC0415 (heavy: torch)
    from diffusers import AutoencoderKL  # noqa: PLC0415 (heavy: torch/diffusers)

    device = choose_device(args.device, args.dtype)
    if not device.is_cuda:
        configure_cpu_threads(args.threads)
    torch_device, dtype = device.torch_device(), device.torch_dtype()
    torch.manual_seed(0)
    _, vae_config = configs("tiny" if args.model == "tiny" else "full")
    vae = AutoencoderKL.from_config(vae_config).to(torch_device, dtype).eval().requires_grad_(False)
    parser = FaceParser(build_bisenet().to(torch_device, dtype).eval(), torch_device, dtype, "random", 0.0)
    spent_s = {"vae_encode": 0.0, "parse": 0.0}

    def synced() -> None:
        if device.is_cuda:
            torch.cuda.synchronize(torch_device)

    def encode(crops: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = encode_crop_latents(vae, float(vae.config.scaling_factor), torch_device, dtype, crops)
        spent_s["vae_encode"] += time.perf_counter() - started
        return out

    def parse(crops: list[np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        out = parser.labels(crops)
        spent_s["parse"] += time.perf_counter() - started
        return out

    # The first use of each model loads its kernels: a few crops first, as a warm sidecar would have (and the
    # landmark model, which the engine's warm-up loads).
    with_models = args.prep_models == "all"
    if with_models:
        encode(np.zeros((2, 256, 256, 3), np.uint8))
        parse([np.zeros((300, 300, 3), np.uint8)])
    settings = PrepareSettings(face_box=args.face_box)
    landmark_load_ms = load_face_box_models(settings)
    synced()
    spent_s.update(vae_encode=0.0, parse=0.0)
    data = astronaut_zip(args.prep_px, args.prep_frames)
    runs = {}
    for run in ("cold", "cached"):
        started = time.perf_counter()
        avatar = prepare_avatar(
            data,
            engine="musetalk",
            engine_version="bench",
            cache_root=cache_dir / "prep-cache",
            encode_latents=encode if with_models else None,
            parse_faces=parse if with_models else None,
            settings=settings,
        )
        synced()
        runs[run] = {"s": round(time.perf_counter() - started, 3), "cache_hit": avatar.cache_hit}
        if run == "cold":
            meta = json.loads((avatar.cache_dir / "meta.json").read_text(encoding="utf-8"))
    cold = runs["cold"]["s"]
    return {
        "frames": args.prep_frames,
        "frame_px": [args.prep_px, args.prep_px],
        "frames_with_face": int(avatar.has_face.sum()),
        "blend_mask": avatar.blend_mask,
        "cold_s": cold,
        "cached_s": runs["cached"]["s"],
        "cached_hit": runs["cached"]["cache_hit"],
        "vae_encode_s": round(spent_s["vae_encode"], 3),
        "parse_s": round(spent_s["parse"], 3),
        "decode_detect_write_s": round(cold - spent_s["vae_encode"] - spent_s["parse"], 3),
        "face_box_source": avatar.face_box_source,
        "landmark_model_load_ms": round(landmark_load_ms, 1),
        # decode, face_boxes, latents (crops + VAE), parse (parser + masks); the cache write is the rest.
        "stage_ms": meta["stage_ms"],
        "stage_cpu_ms": meta["stage_cpu_ms"],  # this process's CPU time (worker processes not counted)
        "host_threads": prepare_threads(),
        "vae": ("tiny" if args.model == "tiny" else "sd-vae (full architecture, random weights)")
        if with_models
        else "none (--prep-models none: the host-side steps only)",
        "parser": "BiSeNet (random weights)" if with_models else "none",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | float16 | float32"
    )
    parser.add_argument("--model", choices=("tiny", "full-size-random"), default="tiny")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all allowed cores)"
    )
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["graphs"],
        help=f"comma-separated engine settings to measure, in order: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--buckets", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument(
        "--compile-cache-dir", type=Path, default=None, help="inductor/Triton cache (persisted)"
    )
    parser.add_argument(
        "--json-partial", action="store_true", help="also write PATH.partial.json after each variant"
    )
    parser.add_argument(
        "--prep-frames", type=int, default=0, help="measure avatar preparation of N frames instead"
    )
    parser.add_argument("--prep-px", type=int, default=FRAME_PX, help="frame side for --prep-frames")
    parser.add_argument(
        "--face-box", choices=FACE_BOX_MODES, default="auto", help="face box source for --prep-frames"
    )
    parser.add_argument(
        "--prep-models",
        choices=("all", "none"),
        default="all",
        help="none: --prep-frames without the VAE and the parser (decode, face boxes and cache write only)",
    )
    args = parser.parse_args(argv)
    if args.prep_frames < 0 or args.prep_px < 64:
        parser.error("--prep-frames must be >= 0 and --prep-px >= 64")
    if args.prep_frames:
        return _main_prepare(args)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # warm-up progress: cold compiles are long
    logging.getLogger("realtime.engine.musetalk.engine").setLevel(logging.INFO)
    import torch  # noqa: PLC0415 (heavy: torch)

    device = choose_device(args.device, args.dtype)
    if args.batches is None:
        args.batches = [1, 2, 4, 8, 16, 32, 64] if device.is_cuda else [1, 2, 4, 8]
    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        models = build_models(args, Path(tmp))
        for variant in args.variants:
            try:
                settings = dict(VARIANTS[variant])
                measured = bench_musetalk(args, Path(tmp), models, variant, settings)
            except Exception as exc:  # one broken variant must not lose the others' figures
                logger.exception("variant %s failed", variant)
                variants[variant] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            engine = measured.pop("engine")
            measured["settings"] = {"dtype": engine.info.dtype, **settings}
            variants[variant] = measured
            print(f"[{variant}] summary {json.dumps(measured['summary'])}", flush=True)
            if args.json_partial:
                _write(args.json.with_suffix(".partial.json"), {"variants": variants})
        preview = bench_preview(args.iters, Path(tmp) / "preview")
    print(f"preview engine 512x512, 1 thread: {preview['fps']} fps", flush=True)
    good = {name: v for name, v in variants.items() if "error" not in v}
    if not good:
        raise RuntimeError(f"every variant failed: {variants}")
    best_name = max(good, key=lambda name: good[name]["summary"]["fps_peak"])
    measured = good[best_name]
    measured["summary"]["preview_fps_512_1thread"] = preview["fps"]
    best_settings = measured["settings"]
    accel = AccelConfig(**{k: v for k, v in best_settings.items() if k != "dtype"})
    compiled = accel.compile_mode != "off" and models.device.is_cuda
    document = {
        "benchmark": "engine",
        "device": device_name(str(models.device.device)),
        "torch": torch.__version__,
        "settings": {
            "variant": best_name,
            "dtype": measured["settings"]["dtype"],
            "compile": best_settings.get("compile_mode", "off") != "off",
            "compile_mode": best_settings.get("compile_mode", "off"),
            "cuda_graphs": bool(best_settings.get("cuda_graphs", True)) and models.device.is_cuda,
            "pinned_transfers": accel.pinned_transfers and models.device.is_cuda,
            "overlap_copy": accel.overlap_copy and models.device.is_cuda,
            "compile_tuned_stages": list(accel.compile_tuned_stages) if compiled else [],
            "upsample_conv": accel.upsample_conv_for(models.device.is_cuda),
            "group_norm": accel.group_norm_for(models.device.is_cuda),
            "compile_channels_last": compiled and accel.compile_channels_last,
            "model": args.model,
            "engine": "musetalk",
            "frame_px": [FRAME_PX, FRAME_PX],
            "avatar_frames": AVATAR_FRAMES,
            "iters": args.iters,
            "torch_threads": torch.get_num_threads(),
            "features_stage": "one stream pull of B frames: whisper-tiny encode of the 30 s segment + gather "
            "+ PE",
            "python": sys.version.split()[0],
        },
        "summary": measured["summary"],
        "results": measured["results"],
        "variants": variants,
        "preview": preview,
    }
    _write(args.json, document)
    print(json.dumps(document["summary"], indent=2))
    return 0


def _main_prepare(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 (heavy: torch)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    device = choose_device(args.device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        prepare = bench_prepare(args, Path(tmp))
    document = {
        "benchmark": "engine_prepare",
        "device": device_name(str(device.device)),
        "dtype": device.dtype_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "prepare": prepare,
    }
    _write(args.json, document)
    print(json.dumps(document, indent=2))
    return 0


def _write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
