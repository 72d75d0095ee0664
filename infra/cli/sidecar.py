"""`lipsync sidecar`: run the realtime sidecar (audio ingest, engine, LiveKit publishing) in the foreground.

With its Temporal worker (activities/sidecar_worker.py) on the sidecar's own task queue, registered
with placement, unless --no-temporal (then it serves sessions only through its dev HTTP control API).
The command line is defined here only; the library packages take the typed settings it builds
(`realtime.sidecar.config.SidecarSettings`, `activities.sidecar_worker.SidecarTemporalOptions`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from activities.placement_client import check_pool, check_shards
from activities.sidecar_worker import (
    DEFAULT_LEASE_S,
    DEFAULT_REGISTRATION_INTERVAL_S,
    SidecarTemporalOptions,
    sidecar_worker_service,
)
from infra.cli.temporal_options import (
    ASSET_DIR_ENV,
    add_connection_arguments,
    add_placement_shards_argument,
    asset_dir,
)
from infra.paths import cache_dir
from realtime.engine.accel import COMPILE_MODES
from realtime.engine.registry import choices_help, engine_choices
from realtime.sidecar.auth import SecretError, load_secret
from realtime.sidecar.config import (
    DEFAULT_AVATAR_CACHE_MAX_BYTES,
    DEFAULT_PORT,
    HostConfig,
    RuntimeConfig,
    ServerConfig,
    SidecarSettings,
)
from workflows.contracts import CONTROL_TASK_QUEUE, DEFAULT_POOL, PLACEMENT_WORKFLOW_ID


def register(subparsers: Any) -> None:
    sidecar = subparsers.add_parser(
        "sidecar",
        help="run the realtime sidecar: Temporal worker on its own queue, WS audio ingest, engine, "
        "publishing",
        description="Run the sidecar until Ctrl-C. Endpoints: WS /v1/sessions/{id}/audio (and "
        "/audio?session_id=), "
        "GET /healthz, GET /v1/sessions/{id}/stats, dev control POST/DELETE /v1/sessions/{id} (with "
        "--dev-api). "
        "Every route but the bare /healthz needs the secret shared with the API ($LIPSYNC_SIDECAR_SECRET).",
    )
    add_sidecar_arguments(sidecar)
    add_temporal_arguments(sidecar)
    sidecar.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # The engine's models, livekit and OpenTelemetry load only when a sidecar starts (`lipsync --help` stays
    # fast).
    from infra.telemetry import TelemetryConfigError, configure_tracing  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.sidecar.process import run  # noqa: PLC0415 (lipsync --help stays fast)

    try:
        options = temporal_options_from_args(args, cache_dir() / "assets")
        settings = settings_from_args(args)
    except (ValueError, SecretError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if options is None:
        return run(settings)
    try:
        configure_tracing("lipsync-sidecar")
    except TelemetryConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return run(settings, services=[sidecar_worker_service(options)])


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    """The sidecar process's own options: bind address, engine, avatar cache, host and server settings."""

    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--engine",
        choices=engine_choices(),
        default="auto",
        help=choices_help(),
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="MuseTalk layout (default ./models)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=None, help="avatar cache root")
    parser.add_argument(
        "--cache-max-bytes",
        type=_positive_int,
        default=DEFAULT_AVATAR_CACHE_MAX_BYTES,
        help="avatar cache cap; least recently used entries are evicted past it (default 8 GiB)",
    )
    parser.add_argument("--slots", type=int, default=4, help="concurrent sessions this sidecar accepts")
    parser.add_argument("--sidecar-id", default=None, help="this sidecar's name (default: the hostname)")
    parser.add_argument(
        "--task-queue", default=None, help="its own Temporal task queue (default: the sidecar id)"
    )
    parser.add_argument(
        "--video-delay-ms",
        type=float,
        default=10.0,
        help="how long after its audio each frame is handed to WebRTC (docs/audio-protocol.md section 4)",
    )
    parser.add_argument(
        "--renew-audio-after-stall-ms",
        type=float,
        default=0.0,
        help="renew the LiveKit audio track in the next silence after a stall this long, so receivers' "
        "jitter buffers start afresh (make before break; 0 = off, the default; docs/audio-protocol.md "
        "section 4)",
    )
    parser.add_argument(
        "--idle-audio-reserve-ms",
        type=_pull_blocks_ms,
        default=0,
        help="silence kept queued in the LiveKit audio source while idle, so that a stall in silence up "
        "to this long sends receivers no late audio (a multiple of 10; 0 = off, the default; "
        "docs/audio-protocol.md section 4)",
    )
    parser.add_argument(
        "--buffer-limit-ms", type=int, default=60_000, help="audio queued per session, at most"
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=1024 * 1024, help="largest binary WS message"
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        help="file holding the secret shared with the API (default: $LIPSYNC_SIDECAR_SECRET_FILE, "
        "else $LIPSYNC_SIDECAR_SECRET)",
    )
    parser.add_argument(
        "--dev-api",
        action="store_true",
        help="enable the dev control API (POST/DELETE /v1/sessions/{id}; service credential required)",
    )
    parser.add_argument(
        "--dev-avatar-dir",
        type=Path,
        default=None,
        help="with --dev-api: the only directory it opens avatars from",
    )
    parser.add_argument(
        "--dev-livekit-url",
        action="append",
        default=[],
        help="with --dev-api: a LiveKit URL it may publish to (repeatable; none: no LiveKit output)",
    )
    parser.add_argument(
        "--no-warm-up", action="store_true", help="load the engine on first use, not at start"
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile the UNet and VAE (CUDA; cached under $LIPSYNC_CACHE_DIR/compile)",
    )
    parser.add_argument(
        "--no-kernel-tuning",
        action="store_true",
        help="with --compile: skip tuning the VAE's kernels (a first start minutes shorter, ~5 %% fewer "
        "frames/s)",
    )
    parser.add_argument(
        "--serve-before-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile: serve on CUDA graphs of the eager models at once and swap the compiled ones in "
        "when built (default: a new node serves within seconds, at a lower batch rate until the swap; "
        "--no-serve-before-compile waits for the compiled graphs)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the models eagerly (CUDA)")
    parser.add_argument(
        "--max-batch-frames", type=_positive_int, default=64, help="frames per cross-session render batch"
    )
    parser.add_argument(
        "--speech-duty",
        type=_duty,
        default=1.0,
        help="share of time a session speaks, for admission control (default 1: all speak at once)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _pull_blocks_ms(text: str) -> int:
    """Milliseconds of audio in whole 10 ms blocks (what the audio source hands WebRTC per pull)."""
    value = int(text)
    if value < 0 or value % 10:
        raise argparse.ArgumentTypeError(f"a non-negative multiple of 10 ms, got {text}")
    return value


def _duty(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share of time in (0, 1], got {text}")
    return value


def settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    """Settings from the command line; raises realtime.sidecar.auth.SecretError without a usable secret."""
    secret = load_secret(args.secret_file)
    sidecar_id = args.sidecar_id or f"sidecar-{socket.gethostname()}"
    return SidecarSettings(
        bind_host=args.host,
        port=args.port,
        engine=args.engine,
        model_dir=args.model_dir,
        device=args.device,
        cache_dir=args.cache_dir,
        cache_max_bytes=args.cache_max_bytes,
        warm_up_at_start=not args.no_warm_up,
        compile_mode=args.compile,
        kernel_tuning=not args.no_kernel_tuning,
        cuda_graphs=not args.no_cuda_graphs,
        serve_before_compile=args.serve_before_compile,
        host=HostConfig(
            sidecar_id=sidecar_id,
            task_queue=args.task_queue or sidecar_id,
            slots_total=args.slots,
            runtime=RuntimeConfig(buffer_limit_ms=args.buffer_limit_ms),
            video_delay_ms=args.video_delay_ms,
            renew_audio_after_stall_ms=args.renew_audio_after_stall_ms,
            idle_audio_reserve_ms=args.idle_audio_reserve_ms,
            max_batch_frames=args.max_batch_frames,
            speech_duty=args.speech_duty,
        ),
        server=ServerConfig(
            service_secret=secret,
            max_message_bytes=args.max_message_bytes,
            dev_api=args.dev_api,
            dev_avatar_dir=args.dev_avatar_dir.resolve() if args.dev_avatar_dir else None,
            dev_livekit_urls=tuple(args.dev_livekit_url),
        ),
    )


def add_temporal_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the sidecar's Temporal worker connects and how it registers with placement."""
    group = parser.add_argument_group(
        "Temporal",
        "the sidecar's worker on its own task queue (LiveKit credentials: $LIVEKIT_API_KEY/_SECRET)",
    )
    add_connection_arguments(group)
    group.add_argument(
        "--no-temporal",
        action="store_true",
        help="serve without the Temporal worker (standalone: sessions only through the dev HTTP control)",
    )
    group.add_argument(
        "--asset-dir",
        type=Path,
        default=None,
        help=f"local copies of avatar assets (default ${ASSET_DIR_ENV} or <cache dir>/assets)",
    )
    group.add_argument(
        "--recordings-dir", type=Path, default=None, help="MP4 recordings of sessions that ask for one"
    )
    group.add_argument(
        "--control-task-queue",
        default=CONTROL_TASK_QUEUE,
        help="where PlacementWorkflow runs (lipsync worker's)",
    )
    group.add_argument("--placement-id", default=PLACEMENT_WORKFLOW_ID, help="PlacementWorkflow id")
    add_placement_shards_argument(group)
    group.add_argument(
        "--pool",
        default=os.environ.get("LIPSYNC_POOL", DEFAULT_POOL),
        help="the pool this sidecar serves, e.g. GPU type and region `h200.eu-west` (sessions ask for pools "
        "by "
        f"policy: placement.pools; default $LIPSYNC_POOL or {DEFAULT_POOL})",
    )
    group.add_argument(
        "--lease-s",
        type=float,
        default=DEFAULT_LEASE_S,
        help="placement drops this sidecar (and reclaims its slots) this long after its last registration",
    )
    group.add_argument(
        "--registration-interval-s",
        type=float,
        default=DEFAULT_REGISTRATION_INTERVAL_S,
        help="how often the registration is refreshed (keep it a few times shorter than --lease-s)",
    )


def temporal_options_from_args(
    args: argparse.Namespace, default_asset_dir: Path
) -> SidecarTemporalOptions | None:
    """None with --no-temporal. Raises ValueError for a lease the registration cannot keep alive."""
    if args.no_temporal:
        return None
    if not 0 < args.registration_interval_s < args.lease_s:
        raise ValueError(
            f"--registration-interval-s ({args.registration_interval_s}) must be > 0 and shorter than "
            f"--lease-s ({args.lease_s}), or the sidecar's registration lapses between refreshes"
        )
    check_shards(args.placement_shards)
    check_pool(args.pool)
    assets = asset_dir(args.asset_dir, default_asset_dir)
    return SidecarTemporalOptions(
        address=args.temporal_address,
        namespace=args.namespace,
        asset_dir=assets,
        control_task_queue=args.control_task_queue,
        placement_workflow_id=args.placement_id,
        placement_shards=args.placement_shards,
        pool=args.pool,
        lease_s=args.lease_s,
        registration_interval_s=args.registration_interval_s,
        recordings_dir=args.recordings_dir,
    )
