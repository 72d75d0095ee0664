"""`lipsync demo`: the README's main job — one real session end to end, recorded to out/demo.mp4
(infra/demo.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from realtime.engine.registry import choices_help, engine_choices


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run one real session end to end on the embedded stack and record it to out/demo.mp4",
        description="Bring up the embedded stack, the worker, a sidecar and the API; start a session with a "
        "real "
        "face through the API; stream espeak-ng speech over its audio WebSocket; stop it; write the "
        "recording. "
        "Everything it started is stopped at the end.",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo.mp4"), help="where the recording goes")
    demo.add_argument(
        "--work-dir", type=Path, default=Path("build/demo"), help="logs, assets, raw recordings"
    )
    demo.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="MuseTalk v1.5 weights (./models)"
    )
    demo.add_argument(
        "--engine",
        choices=engine_choices(),
        default="auto",
        help=choices_help(),
    )
    demo.add_argument("--text", default=None, help="what the avatar says")
    demo.add_argument(
        "--free-ports",
        action="store_true",
        help="run a private stack on free ports (when the default ports 7233/7880/8000/... are taken)",
    )
    demo.add_argument(
        "--trace-exporter", choices=("none", "console", "otlp"), default="none", help="spans of every process"
    )
    demo.add_argument(
        "--hold-s",
        type=float,
        default=0.0,
        help="keep the session live this long after the speech (for the viewer)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from infra.demo import DEMO_SENTENCE, DemoError, DemoOptions, free_ports_options, run_demo  # noqa: PLC0415 (lipsync --help stays fast)
    from infra.process import ServiceStartError  # noqa: PLC0415 (lipsync --help stays fast)
    from infra.stack import StackError  # noqa: PLC0415 (lipsync --help stays fast)

    options = DemoOptions(
        out_path=args.out,
        work_dir=args.work_dir,
        model_dir=args.model_dir,
        engine=args.engine,
        text=args.text or DEMO_SENTENCE,
        trace_exporter=args.trace_exporter,
        hold_s=args.hold_s,
    )
    if args.free_ports:
        options = free_ports_options(options)

    # One line per step is the demo's output; per-request logs would bury it.
    for noisy in ("httpx", "infra.process", "infra.stack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    say("lipsync-live demo: one real session, end to end")
    try:
        result = run_demo(options, say)
    except (DemoError, StackError, ServiceStartError, OSError) as exc:
        sys.stderr.write(f"demo failed: {exc}\n")
        return 1
    check = result.recording
    say("")
    say(
        f"recording: {result.out_path} — {check.video_frames} frames {check.width_px}x{check.height_px}, "
        f"{check.duration_s:.1f} s, audio {check.audio_rms_dbfs:.1f} dBFS RMS"
    )
    say(
        f"  lips: mouth-region change {check.mouth_change_speech:.1f} while speaking vs "
        f"{check.mouth_change_idle:.1f} idle (0-255) -> {'moving' if check.lips_move else 'NOT moving'}"
    )
    say(f"engine: {result.engine} ({result.engine_detail})")
    say(f"phases: {' -> '.join(result.phases)}")
    say(f"Temporal UI (this session): {result.temporal_ui_url}")
    say(
        "  (a stack the demo started is stopped again: `lipsync stack up` brings the UI back with this "
        "history)"
    )
    say(f"viewer (live only during the session; `lipsync demo --hold-s 60` to watch): {result.viewer_url}")
    if result.trace_id:
        say(f"trace id: {result.trace_id}")
    return 0 if check.lips_move else 1
