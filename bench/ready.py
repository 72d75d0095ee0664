"""Engine readiness benchmark: a cold build of the prebuilt engine artifacts, then a new process made ready by
them.

    python -m bench.ready --json PATH [--model full-size-random|tiny] [--variant compile] [--device cuda]
        [--artifacts-dir DIR] [--phases build,ready] [--notes TEXT]

Each phase runs in its own process with its own empty inductor/Triton cache (a new node), timed from the
moment
this process starts it:

* build — the engine warms up from nothing and saves its artifact
(`MuseTalkEngine.warm_up_prebuilt(rebuild=True)`,
  what `lipsync engine build` does): `build_ms_cold`;
* ready — the engine warms up as a sidecar does (`warm_up_for_serving`): `ready_ms_prebuilt` is process start
  -> every batch bucket servable without a capture or compile. With `serve_before_compile` (the default
  variant) that is the graphs of the eager modules, and the compiled graphs (from the artifact) are swapped
  in by a background thread: `compiled_ms_prebuilt` is process start -> that swap, with where the background
  compile's time went (torch's compile counters and dynamo's per-phase times).

Writes a `bench.engine` document (`benchmark: engine`) whose summary holds those two figures, each phase's
breakdown (interpreter start, imports + models, artifact load, warm-up, save) and the artifact's size.
Imports torch, numpy, diffusers and transformers (the models); no livekit, no av.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine import VARIANTS, build_engine, build_models

START_ENV = "LIPSYNC_BENCH_READY_T0"  # wall-clock time (time.time()) the parent started the child
RESULT_PREFIX = "READY-RESULT "


def _compile_diagnostics() -> dict[str, Any]:
    """torch's compile counters (cache hits and misses, recompiles) and dynamo's cumulative time per compile
    phase in this process."""
    from torch._dynamo.utils import compile_times, counters  # noqa: PLC0415 (heavy: torch)

    return {
        "counters": {group: dict(values) for group, values in counters.items() if values},
        "compile_times": str(compile_times(repr="str")),
    }


def _child(args: argparse.Namespace) -> int:
    """One phase in this (fresh) process; prints one RESULT_PREFIX line of JSON."""
    imported_at = time.time()
    t0 = float(os.environ[START_ENV])
    import torch  # noqa: PLC0415 (heavy: torch; timed apart from the models)

    torch_at = time.time()
    logging.getLogger("bench.ready").info("torch %s imported", torch.__version__)
    with tempfile.TemporaryDirectory(prefix="bench-ready-") as tmp:
        args.buckets, args.batches = None, [64]
        args.compile_cache_dir = Path(tmp) / "compile"  # empty: a new node's
        models = build_models(args, Path(tmp))
        models_at = time.time()
        engine = build_engine(args, Path(tmp), models, dict(VARIANTS[args.variant]))
        if args.child == "build":
            report = engine.warm_up_prebuilt(args.artifacts_dir, rebuild=True)
        else:
            report = engine.warm_up_for_serving(args.artifacts_dir)  # what a sidecar runs
        # No device-wide synchronize here: the warm-up synchronized its own work, and the background compile
        # may be capturing graphs now.
        done_at = time.time()
        ready_batch_ms = engine.warm_up_batch_ms
        state = engine.wait_for_variant(args.compiled_timeout_s)
        compiled_at = time.time()
        background = engine.background_report
    key = engine.artifact_key()
    artifact = background.path if background is not None else report.path
    blob_bytes = (artifact / "cache.bin").stat().st_size if artifact else None
    result = {
        "phase": args.child,
        "status": report.status,
        "total_ms": round((done_at - t0) * 1000.0, 1),
        "startup_ms": round((imported_at - t0) * 1000.0, 1),
        "imports_and_models_ms": round((models_at - imported_at) * 1000.0, 1),
        "torch_import_ms": round((torch_at - imported_at) * 1000.0, 1),
        "models_ms": round((models_at - torch_at) * 1000.0, 1),
        "artifact_load_ms": round(report.load_ms, 1),
        "warm_up_ms": round(report.warm_up_ms, 1),
        "save_ms": round(report.save_ms, 1),
        "cache_misses": report.cache_misses,
        "refused": report.refused,
        "artifact_bytes": blob_bytes,
        "key": key.to_json() if key else None,
        "warm_up_batch_ms": {str(b): round(ms, 2) for b, ms in sorted(ready_batch_ms.items())},
        "serving": state.describe(),
        "serving_variant": state.variant,
    }
    if background is not None:
        result["background"] = {
            "compiled_total_ms": round((compiled_at - t0) * 1000.0, 1),
            "swapped_at_s": state.swapped_at_s,
            "status": background.status,
            "artifact_load_ms": round(background.load_ms, 1),
            "warm_up_ms": round(background.warm_up_ms, 1),
            "save_ms": round(background.save_ms, 1),
            "cache_misses": background.cache_misses,
            "refused": background.refused,
            "compiled_batch_ms": {str(b): round(ms, 2) for b, ms in sorted(engine.warm_up_batch_ms.items())},
        }
    if key is not None:
        result["compile_diagnostics"] = _compile_diagnostics()
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    if state.building:
        # The background compile was not waited for (--compiled-timeout-s): leave without joining it (its
        # compile workers would hold the interpreter's exit).
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_phase(phase: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.ready",
        "--child",
        phase,
        "--json",
        str(args.json),
        "--model",
        args.model,
        "--variant",
        args.variant,
        "--device",
        args.device,
        "--artifacts-dir",
        str(args.artifacts_dir),
        "--compiled-timeout-s",
        str(args.compiled_timeout_s),
    ]
    started = time.time()
    completed = subprocess.run(
        command, env={**os.environ, START_ENV: repr(started)}, capture_output=True, text=True, check=False
    )
    wall_ms = (time.time() - started) * 1000.0
    sys.stderr.write(completed.stderr[-4000:])
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"phase {phase} failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_wall_ms"] = round(wall_ms, 1)
    shown = {k: v for k, v in result.items() if k not in ("key", "compile_diagnostics")}
    print(f"[{phase}] {json.dumps(shown)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ready", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--model", choices=("tiny", "full-size-random"), default="full-size-random")
    parser.add_argument(
        "--variant", default="compile-serve-first", help="a bench.engine variant (it must compile)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--artifacts-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--phases", type=lambda s: s.split(","), default=["build", "ready"])
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--compiled-timeout-s",
        type=float,
        default=900.0,
        help="ready phase: how long to wait for the background compile's swap after the engine serves",
    )
    parser.add_argument("--child", choices=("build", "ready"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for name in ("realtime.engine.musetalk.engine", "realtime.engine.artifacts", "realtime.engine.hotswap"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="bench-ready-artifacts-") as tmp:
        if args.artifacts_dir is None:
            args.artifacts_dir = Path(tmp)
        results = [_run_phase(phase, args) for phase in args.phases]
    import torch  # noqa: PLC0415 (heavy: torch)

    by_phase = {row["phase"]: row for row in results}
    build, ready = by_phase.get("build"), by_phase.get("ready")
    device = str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"
    document = {
        "benchmark": "engine",
        "device": device,
        "torch": torch.__version__,
        "settings": {
            "model": args.model,
            "variant": args.variant,
            "engine": "musetalk",
            "phases": args.phases,
            "ready_definition": "process start -> every batch bucket servable without a capture or compile "
            "(warm_up_for_serving: with serve_before_compile, graphs of the eager modules; the compiled "
            "graphs follow from a background thread: compiled_ms_prebuilt)",
            "command": "python -m bench.ready " + " ".join(argv if argv is not None else sys.argv[1:]),
            "notes": args.notes,
        },
        "summary": {
            "build_ms_cold": build["process_wall_ms"] if build else None,
            "ready_ms_prebuilt": ready["total_ms"] if ready else None,
            "ready_status": ready["status"] if ready else None,
            "ready_warm_up_ms": ready["warm_up_ms"] if ready else None,
            "ready_serving_variant": ready["serving_variant"] if ready else None,
            "compiled_ms_prebuilt": ready["background"]["compiled_total_ms"]
            if ready and "background" in ready
            else None,
            "artifact_bytes": build["artifact_bytes"] if build else None,
        },
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
