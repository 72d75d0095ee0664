"""Overlap benchmark: where a large render batch waits, and what running work side by side would buy.

    python -m bench.overlap --json PATH [--batches 64,128] [--iters 8] [--model full-size-random]

One compiled engine (variant `compile` of bench.engine, buckets 32/64/128) on the astronaut
avatar. Per batch size B, each figure the median of `--iters` timed rounds after two untimed:

* serial_ms — `render(B requests)` called back to back, each returning its frames: what the
  render lane does today (the host assembles a batch's frames while the GPU idles);
* models_ms — UNet + VAE of B frames (graph replays), enqueued back to back with one sync at the
  end: the GPU-bound cost of the models alone;
* paste_gpu_ms — the compositor's device work and copy of B faces (`paste_async`, waited for);
* host_finish_ms — `Compositor.finish` on a completed copy (the host side of a batch), and the
  same frame assembly spread over a thread pool (`host_finish_ms_threads`);
* two_streams_ms — the compiled UNet of batch k+1 on one CUDA stream while the compiled VAE of
  batch k runs on another (no graphs: compiled kernels launched from Python), per batch, against
  `one_stream_ms`, the same calls on one stream.

Nothing here changes the engine; it says which of these is worth building.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine import astronaut_zip, device_name, speech_like
from realtime.engine.accel import AccelConfig
from realtime.engine.device import choose_device
from realtime.engine.musetalk.composite import PasteJob, assemble_frame
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.musetalk.weights.random import random_models
from realtime.engine.protocol import EngineConfig, RenderRequest

logger = logging.getLogger("bench.overlap")


def _median_ms(fn: Callable[[], object], sync: Callable[[], None], iters: int, per: int = 1) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(iters):
        sync()
        tick = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - tick) * 1000 / per)
    return round(statistics.median(times), 3)


def assemble(pending: Any, pool: ThreadPoolExecutor) -> list[np.ndarray]:
    """`Compositor.finish`'s host work (`assemble_frame`), one task per frame on `pool`."""
    host = pending.host.numpy()
    return list(pool.map(functools.partial(assemble_frame, pending, host), range(len(pending.jobs))))


def measure(engine: Any, avatar: Any, features: list[Any], batch: int, iters: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415 (heavy: torch)

    sync = engine.synchronize
    requests = [
        RenderRequest(avatar, k, features[(k * 7) % len(features)].features, 1.0) for k in range(batch)
    ]
    row: dict[str, Any] = {"batch": batch}
    rounds = 3
    row["serial_ms"] = _median_ms(
        lambda: [engine.render(requests) for _ in range(rounds)], sync, iters, rounds
    )
    device = torch.device(engine.info.device)
    dtype = engine.models.device.torch_dtype()
    latents = torch.randn((batch, 8, 32, 32), device=device).to(dtype)
    feats = torch.randn((batch, 50, 384), device=device).to(dtype)
    with torch.inference_mode():

        def models() -> None:
            for _ in range(rounds):
                engine._faces(latents, feats, None)

        row["models_ms"] = _median_ms(models, sync, iters, rounds)
        faces = engine._faces(latents, feats, None).clone()
        compositor = engine._compositor
        jobs = [PasteJob(avatar, k % avatar.frame_count, k, 1.0) for k in range(batch)]

        def paste() -> None:
            pending = compositor.paste_async(faces, jobs)
            if pending.event is not None:
                pending.event.synchronize()

        row["paste_gpu_ms"] = _median_ms(paste, sync, iters)
        pending = compositor.paste_async(faces, jobs)
        sync()
        row["host_finish_ms"] = _median_ms(lambda: compositor.finish(pending), sync, iters)
        threads: dict[str, float] = {}
        for workers in (2, 4, 8):
            with ThreadPoolExecutor(workers) as pool:
                threads[str(workers)] = _median_ms(functools.partial(assemble, pending, pool), sync, iters)
        row["host_finish_ms_threads"] = threads
        unet, vae = engine._unet_compiled, engine._vae_compiled
        if unet is not None and vae is not None:
            row.update(_streams(unet, vae, (latents, feats), sync, iters))
    row["serial_fps"] = round(batch * 1000 / row["serial_ms"], 1)
    row["models_fps"] = round(batch * 1000 / row["models_ms"], 1)
    logger.info("batch %d: %s", batch, json.dumps(row))
    return row


def _streams(
    unet: Any, vae: Any, inputs: tuple[Any, Any], sync: Callable[[], None], iters: int
) -> dict[str, Any]:
    """Per-batch ms of UNet(k+1) ∥ VAE(k) on two streams, and of the same calls on one stream."""
    import torch  # noqa: PLC0415 (heavy: torch)

    latents, feats = inputs
    count = 4
    main = torch.cuda.current_stream()
    unet_stream, vae_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def one_stream() -> None:
        for _ in range(count):
            vae(unet(latents, feats))

    def two_streams() -> None:
        keep = []  # outputs live until the end: no allocator reuse across streams to reason about
        unet_stream.wait_stream(main)
        vae_stream.wait_stream(main)
        with torch.cuda.stream(unet_stream):
            predicted = unet(latents, feats)
        ready = unet_stream.record_event()
        for k in range(count):
            vae_stream.wait_event(ready)
            with torch.cuda.stream(vae_stream):
                keep.append(vae(predicted))
            keep.append(predicted)
            if k + 1 < count:
                with torch.cuda.stream(unet_stream):
                    predicted = unet(latents, feats)
                ready = unet_stream.record_event()
        main.wait_stream(vae_stream)
        main.wait_stream(unet_stream)

    return {
        "one_stream_ms": _median_ms(one_stream, sync, iters, count),
        "two_streams_ms": _median_ms(two_streams, sync, iters, count),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[64, 128])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--model", choices=("tiny", "full-size-random"), default="full-size-random")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (cpu: a smoke run of this script)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch  # noqa: PLC0415 (heavy: torch)

    device = choose_device(args.device, "float16" if args.device.startswith("cuda") else "float32")
    models = random_models("full" if args.model == "full-size-random" else "tiny", device)
    buckets = tuple(sorted({32, 64, *args.batches}))
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        config = EngineConfig(
            engine="musetalk",
            device=device.device,
            cache_dir=Path(tmp),
            max_batch_size=max(buckets),
            accel=AccelConfig(batch_buckets=buckets, compile_mode="default"),
        )
        engine = MuseTalkEngine(models, config, None)
        avatar = engine.prepare_avatar(astronaut_zip())
        started = time.perf_counter()
        engine.warm_up(list(buckets))
        warm_up_s = time.perf_counter() - started
        logger.info("warm-up %.1f s", warm_up_s)
        features = engine.offline_frames(speech_like(4.0))
        rows = []
        for batch in args.batches:
            try:
                rows.append(measure(engine, avatar, features, batch, args.iters))
            except Exception as exc:  # one failing size must not lose the others
                logger.exception("batch %d failed", batch)
                rows.append({"batch": batch, "error": f"{type(exc).__name__}: {exc}"})
            args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    document = {
        "benchmark": "overlap",
        "device": device_name(str(device.device)),
        "torch": torch.__version__,
        "settings": {
            "model": args.model,
            "dtype": device.dtype_name,
            "variant": "compile",
            "buckets": list(buckets),
        },
        "summary": {"warm_up_s": round(warm_up_s, 1)},
        "results": rows,
    }
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
