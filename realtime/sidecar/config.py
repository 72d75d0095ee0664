"""Sidecar configuration: one home for every knob, importable without loading livekit, torch or the engine."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, field
from pathlib import Path

from realtime.engine.accel import COMPILE_MODES

TIMELINE_SAMPLE_RATE_HZ = 16_000
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # 1 MiB: 32 s of s16le 16 kHz mono in one message
DEFAULT_PORT = 8790
DEFAULT_UTTERANCE_GAP_MS = 500  # no audio this long ends an open utterance (implicit end_of_utterance)
DEFAULT_AVATAR_CACHE_MAX_BYTES = 8 << 30  # the avatar cache's cap: least recently used entries are evicted


@dataclass(frozen=True)
class RuntimeConfig:
    buffer_limit_ms: int = 60_000  # audio queued ahead of playback, per session
    render_budget_ms: float = 40.0  # frame 0 of an utterance is due at least this long after it is planned
    # Under load the lead grows with the render lane's measured batch time (RenderLane.planning_budget_ms):
    # a streamed utterance's frames are ready only that long before their ticks. TTFF grows by the same amount.
    # The lead's upper bound (kept below render_ahead_frames ticks). 480 ms lets 16 sessions share an H200 with
    # 64-frame batches (bench/results/sessions-h200-*.json); a lightly loaded lane never gets near it.
    max_render_budget_ms: float = 480.0
    # Batches a frame may wait through: the one in flight, then its own (2), plus room for the batch-time jitter
    # of a real GPU and the lane's feature work (at 2.0 an H200 run dropped 2 of 600 frames at 4 sessions).
    render_budget_safety: float = 2.5
    render_ahead_frames: int = 16  # frames rendered ahead of the clock, at most
    # An utterance whose audio arrived ahead of real time starts with less lead than the load's planning budget;
    # its frames inside that budget jump the render lane's queue (SessionRuntime._first_tick_lead).
    first_frame_priority: bool = True

    @property
    def max_batch_ms(self) -> float:
        """The longest render batch the planning budget absorbs (admission control sizes capacity by it)."""
        return self.max_render_budget_ms / self.render_budget_safety

    render_batch_frames: int = 4  # frames per engine call, at most
    crossfade_frames: int = 2  # speech -> idle blend when an utterance ends on an open mouth
    resync_after_ms: float = 250.0  # a clock this late (event loop stalled) restarts from now
    lateness_window_ticks: int = 3000  # ticks kept for lateness percentiles

    @property
    def buffer_limit_samples(self) -> int:
        return self.buffer_limit_ms * TIMELINE_SAMPLE_RATE_HZ // 1000


@dataclass(frozen=True)
class HostConfig:
    sidecar_id: str = "sidecar-local"
    task_queue: str = "sidecar-local"
    slots_total: int = 4
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    video_delay_ms: float = 40.0  # see realtime.outputs.livekit
    max_video_bitrate_bps: int = 1_500_000
    renew_audio_after_stall_ms: float = 0.0  # 0 = off; see LiveKitPublisher._maybe_renew_audio_track
    # An output disconnected this long ends the run `output_failed`, so the workflow moves the session to the
    # policy's next output. Short on purpose: outputs report a broken transport at once (LiveKit's signal
    # connection lost = reconnecting, RTMP's ffmpeg gone), and a viewer sees nothing meanwhile.
    output_down_timeout_s: float = 2.0
    # The share of time a session is expected to speak, for admission control: 1.0 (the default) sizes capacity
    # for every session speaking at once; a voice agent that listens half the time can run with ~0.5 (more sessions
    # per GPU, with frames skipped under load if they all speak at once). In (0, 1].
    speech_duty: float = 1.0
    # Frames per cross-session render batch, at most (also the engine's device batch): an H200 held 20 sessions
    # with 64-frame batches; a lightly loaded lane runs small batches anyway.
    max_batch_frames: int = 64


@dataclass(frozen=True)
class ServerConfig:
    # The shared secret (realtime.sidecar.auth): its bearer form opens every route, audio tokens derive from it.
    # The server refuses to start without one.
    service_secret: str = field(default="", repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    utterance_gap_ms: int = DEFAULT_UTTERANCE_GAP_MS
    stats_interval_ms: int = 1000  # periodic `stats` messages on the audio WS (0: only on request)
    # The dev control API (POST/DELETE /v1/sessions/{id}) is off unless enabled, and even then opens only avatar
    # files under `dev_avatar_dir` and publishes only to the LiveKit URLs in `dev_livekit_urls`.
    dev_api: bool = False
    dev_avatar_dir: Path | None = None
    # Where the avatar cache is and its cap, for /healthz (the engine owns the cache itself).
    avatar_cache_dir: Path | None = None
    avatar_cache_max_bytes: int = DEFAULT_AVATAR_CACHE_MAX_BYTES
    dev_livekit_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class SidecarSettings:
    bind_host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    engine: str = "auto"  # auto | musetalk | preview
    model_dir: Path = Path("models")
    device: str = "auto"
    cache_dir: Path | None = None
    cache_max_bytes: int = DEFAULT_AVATAR_CACHE_MAX_BYTES
    warm_up_at_start: bool = True
    # GPU engine switches (realtime.engine.accel.AccelConfig): compile costs ~175 s at the first start without
    # kernel tuning, ~360 s with it (the VAE's kernels tuned by benchmark: ~4 % more frames/s), 80-230 s from
    # its on-disk cache afterwards; it raises an H200's sessions from 8 to 16 or more (bench/results/).
    compile_mode: str = "off"  # one of realtime.engine.accel.COMPILE_MODES
    kernel_tuning: bool = True  # with compile_mode: AccelConfig.compile_tuned_stages as its default, else none
    cuda_graphs: bool = True
    host: HostConfig = field(default_factory=HostConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument(
        "--engine",
        choices=("auto", "musetalk", "preview"),
        default="auto",
        help="auto: musetalk when weights exist under --model-dir, else the CPU preview engine",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="MuseTalk layout (default ./models)")
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
    parser.add_argument("--task-queue", default=None, help="its own Temporal task queue (default: the sidecar id)")
    parser.add_argument("--video-delay-ms", type=float, default=40.0, help="video hold for receivers' audio delay")
    parser.add_argument(
        "--renew-audio-after-stall-ms",
        type=float,
        default=0.0,
        help="renew the LiveKit audio track after a stall this long, so receivers' jitter buffers start afresh "
        "(0 = off, the default; docs/audio-protocol.md section 4)",
    )
    parser.add_argument("--buffer-limit-ms", type=int, default=60_000, help="audio queued per session, at most")
    parser.add_argument("--max-message-bytes", type=int, default=1024 * 1024, help="largest binary WS message")
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
        "--dev-avatar-dir", type=Path, default=None, help="with --dev-api: the only directory it opens avatars from"
    )
    parser.add_argument(
        "--dev-livekit-url",
        action="append",
        default=[],
        help="with --dev-api: a LiveKit URL it may publish to (repeatable; none: no LiveKit output)",
    )
    parser.add_argument("--no-warm-up", action="store_true", help="load the engine on first use, not at start")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile the UNet and VAE (CUDA; cached under $LIPSYNC_CACHE_DIR/compile)",
    )
    parser.add_argument(
        "--no-kernel-tuning",
        action="store_true",
        help="with --compile: skip tuning the VAE's kernels (a first start minutes shorter, ~5 %% fewer frames/s)",
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


def _duty(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share of time in (0, 1], got {text}")
    return value


def settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    """Settings from the command line; raises realtime.sidecar.auth.SecretError without a usable secret."""
    from realtime.sidecar.auth import load_secret

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
        host=HostConfig(
            sidecar_id=sidecar_id,
            task_queue=args.task_queue or sidecar_id,
            slots_total=args.slots,
            runtime=RuntimeConfig(buffer_limit_ms=args.buffer_limit_ms),
            video_delay_ms=args.video_delay_ms,
            renew_audio_after_stall_ms=args.renew_audio_after_stall_ms,
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
