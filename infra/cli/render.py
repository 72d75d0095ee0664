"""`lipsync render`: offline lip-sync of an audio file onto an avatar, original audio muxed in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.audio.framing import SAMPLE_RATE_HZ, SAMPLES_PER_FRAME
from realtime.engine.audio.io import from_engine_rate
from realtime.engine.musetalk.weights.layout import DEFAULT_MODEL_DIR
from realtime.engine.registry import choices_help, engine_choices

MP4_AUDIO_RATE_HZ = 48_000

if TYPE_CHECKING:
    from realtime.engine.avatar.prepared import PrepareProgress


def register(subparsers: Any) -> None:
    render = subparsers.add_parser("render", help="render an MP4 of an avatar speaking an audio file")
    render.add_argument("--avatar", type=Path, required=True, help="frames zip, idle video or image")
    render.add_argument("--audio", type=Path, required=True, help="any audio file PyAV reads (WAV, MP3, ...)")
    render.add_argument("--out", type=Path, required=True, help="output .mp4")
    render.add_argument("--engine", choices=engine_choices(), default="auto", help=choices_help())
    render.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    render.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    render.add_argument("--cache-dir", type=Path, default=None, help="avatar cache root")
    render.add_argument("--batch-size", type=int, default=8)
    render.add_argument(
        "--dump", type=Path, default=None, help="write intermediates (.npy) to this directory"
    )
    render.set_defaults(handler=_render)


def _show_progress(progress: PrepareProgress) -> None:
    sys.stderr.write(f"\rpreparing avatar: {progress.frames_done}/{progress.frames_total}")


def _render(args: argparse.Namespace) -> int:
    from realtime.engine import EngineConfig, EngineError, create_engine  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.audio.io import load_audio_file  # noqa: PLC0415 (lipsync --help stays fast)
    from realtime.engine.offline import dump_intermediates, render_clip  # noqa: PLC0415 (lipsync --help stays fast)

    try:
        selection = create_engine(
            EngineConfig(
                engine=args.engine, model_dir=args.model_dir, device=args.device, cache_dir=args.cache_dir
            )
        )
        sys.stderr.write(f"engine: {selection.name}: {selection.reason}\n")
        engine = selection.engine
        avatar = engine.prepare_avatar(args.avatar, on_progress=_show_progress)
        sys.stderr.write(
            f"\navatar: {avatar.frame_count} frames {avatar.width_px}x{avatar.height_px}"
            f"{' (cache hit)' if avatar.cache_hit else ''}\n"
        )
        audio = load_audio_file(args.audio)
        result = render_clip(engine, avatar, audio, batch_size=args.batch_size)
        if args.dump is not None:
            written = dump_intermediates(engine, avatar, audio, result, args.dump)
            sys.stderr.write(f"dumped {len(written)} arrays to {args.dump}\n")
        path = write_mp4(args.out, result.frames, audio)
    except EngineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"wrote {path}: {len(result.frames)} frames at 25 fps with the original audio\n")
    return 0


def write_mp4(path: Path, frames: list[np.ndarray], audio: np.ndarray) -> Path:
    """H.264 + AAC MP4 of `frames` at 25 fps with `audio` (16 kHz) muxed in, written atomically."""
    from realtime.outputs.encoder import EncoderSettings  # noqa: PLC0415 (heavy: PyAV)
    from realtime.outputs.mp4 import Mp4Recorder  # noqa: PLC0415 (heavy: PyAV)

    if not frames:
        raise ValueError("no frames to write")
    height, width = frames[0].shape[:2]
    audio_48k = from_engine_rate(audio, MP4_AUDIO_RATE_HZ)
    recorder = Mp4Recorder(path, EncoderSettings(width_px=width, height_px=height))
    per_frame = MP4_AUDIO_RATE_HZ * SAMPLES_PER_FRAME // SAMPLE_RATE_HZ
    try:
        for index, frame in enumerate(frames):
            chunk = audio_48k[index * per_frame : (index + 1) * per_frame]
            if len(chunk) < per_frame:
                chunk = np.pad(chunk, (0, per_frame - len(chunk)))
            recorder.write(frame, index, chunk, index * per_frame)
    except BaseException:
        recorder.abandon()
        raise
    return recorder.close()
