"""`lipsync engine build|list`: prebuilt engine artifacts (compiled kernels) that a sidecar's warm-up loads.

`build` warms a MuseTalk engine up from nothing on this node's GPU and saves torch's portable compile cache
(run it with the sidecar's engine flags: `--compile` as `--compile-mode`, `--no-kernel-tuning`,
`--no-cuda-graphs`), keyed by GPU, torch/CUDA/Triton versions, model architecture, dtype, compile mode and
settings and batch buckets (`realtime.engine.artifacts`); `list` shows the artifacts under a root and their
keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from realtime.engine.musetalk.weights.layout import DEFAULT_MODEL_DIR


def register(subparsers: Any) -> None:
    engine = subparsers.add_parser(
        "engine", help="build and list prebuilt engine artifacts (compiled kernels)"
    )
    sub = engine.add_subparsers(dest="engine_command", metavar="ACTION")

    build = sub.add_parser(
        "build", help="compile the MuseTalk engine from nothing here and save its artifact"
    )
    build.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="default ./models")
    build.add_argument("--device", default="cuda", help="cuda | cuda:N (compiled kernels exist only on CUDA)")
    build.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA) | float16 | bfloat16")
    build.add_argument("--compile-mode", default="default", help="default | max-autotune-no-cudagraphs")
    build.add_argument(
        "--no-kernel-tuning",
        dest="kernel_tuning",
        action="store_false",
        help="as the sidecar's --no-kernel-tuning: the artifact must be built with the sidecar's settings",
    )
    build.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="as the sidecar's")
    build.add_argument("--buckets", type=lambda s: tuple(int(v) for v in s.split(",")), default=None)
    build.add_argument(
        "--artifacts-dir", type=Path, default=None, help="default $LIPSYNC_CACHE_DIR/engine-artifacts"
    )
    build.add_argument("--json", action="store_true", help="print one JSON document")
    build.set_defaults(handler=_build)

    listing = sub.add_parser("list", help="the artifacts under a root, with their keys")
    listing.add_argument(
        "--artifacts-dir", type=Path, default=None, help="default $LIPSYNC_CACHE_DIR/engine-artifacts"
    )
    listing.set_defaults(handler=_list)
    engine.set_defaults(handler=lambda args: (engine.print_help(), 2)[1])


def _build(args: argparse.Namespace) -> int:
    from realtime.engine.accel import DEFAULT_BATCH_BUCKETS, AccelConfig  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.artifacts import default_artifacts_root  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.errors import EngineError  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.protocol import EngineConfig  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.registry import create_engine  # noqa: PLC0415 (lipsync --help stays fast)

    started = time.perf_counter()
    root = args.artifacts_dir or default_artifacts_root()
    # A cold build: compiled kernels from an inductor cache of earlier runs on this node must not stand in.
    with tempfile.TemporaryDirectory(prefix="lipsync-engine-build-") as scratch:
        try:
            accel = AccelConfig(
                compile_mode=args.compile_mode,
                cuda_graphs=args.cuda_graphs,
                compile_tuned_stages=AccelConfig.compile_tuned_stages if args.kernel_tuning else (),
                batch_buckets=args.buckets or DEFAULT_BATCH_BUCKETS,
                compile_cache_dir=Path(scratch),
            )
            config = EngineConfig(
                engine="musetalk",
                model_dir=args.model_dir,
                device=args.device,
                dtype=args.dtype,
                accel=accel,
                artifacts_dir=root,
            )
            engine: Any = create_engine(config).engine
        except (EngineError, ValueError) as exc:
            return _fail(args, exc.code if isinstance(exc, EngineError) else "invalid_argument", str(exc))
        if engine.artifact_key() is None:
            return _fail(
                args,
                "engine_artifact_nothing_to_build",
                f"the engine on {engine.info.device} compiles nothing (compiled kernels exist only on CUDA "
                "with a "
                f"compile mode other than off): there is no artifact to build",
            )
        report = engine.warm_up_prebuilt(root, rebuild=True)
    document = {
        "ok": report.path is not None,
        "path": str(report.path) if report.path else None,
        "key": engine.artifact_key().to_json(),
        "key_digest": engine.artifact_key().digest(),
        "warm_up_ms": round(report.warm_up_ms, 1),
        "save_ms": round(report.save_ms, 1),
        "build_ms_cold": round((time.perf_counter() - started) * 1000.0, 1),
    }
    if args.json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(f"engine artifact {document['key_digest']} written to {document['path']}\n")
        sys.stdout.write(
            f"  built in {document['build_ms_cold'] / 1000:.1f} s (warm-up {report.warm_up_ms / 1000:.1f} "
            "s)\n"
        )
    return 0 if document["ok"] else 1


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    if args.json:
        sys.stdout.write(json.dumps({"ok": False, "code": code, "message": message}) + "\n")
    else:
        sys.stderr.write(f"error [{code}]: {message}\n")
    return 2


def _list(args: argparse.Namespace) -> int:
    from realtime.engine.artifacts import MANIFEST_NAME, default_artifacts_root  # noqa: PLC0415 (lipsync --help stays fast)

    root = args.artifacts_dir or default_artifacts_root()
    entries = sorted(p for p in root.glob(f"*/{MANIFEST_NAME}")) if root.is_dir() else []
    if not entries:
        sys.stdout.write(f"no engine artifacts under {root}\n")
        return 0
    for manifest_path in entries:
        try:
            manifest = json.loads(manifest_path.read_text())
            key = manifest["key"]
            summary = (
                f"{key['gpu_name']} (sm {key['gpu_capability']}), torch {key['torch_version']}, "
                f"cuda {key['cuda_version']}, {key['dtype']}, compile {key['compile_mode']}, "
                f"buckets {key['batch_buckets']}, {manifest['blob_bytes'] / 1e6:.1f} MB"
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            summary = f"unreadable manifest: {exc}"
        sys.stdout.write(f"{manifest_path.parent.name}  {summary}\n")
    return 0
