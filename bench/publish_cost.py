"""Publishing cost: what each idle session's LiveKit output costs the host, per thread, and the event loop.

    python -m bench.publish_cost --json PATH [--sessions 4,8] [--frame-px 512] [--duration-s 8]
        [--handoff thread,loop]

Each level starts n sessions (the preview engine, idle: the avatar's idle cycle and silence at 25 fps, the
state every session is in between utterances and most of the time) publishing through the real
`LiveKitPublisher` to a livekit-server started for the run, one room each, lets them settle, then measures
for `--duration-s`:

* cores per session by thread: libwebrtc's video and audio encoder queues, the Python threads (the event loop
  and the video hand-off threads; CPython threads carry the process's name), the SDK's tokio workers, the
  network thread and the rest, read from /proc/<pid>/task before and after;
* `loop_ms_per_frame`: event-loop time per video frame handed to the output (`_capture_video`: conversion
  and hand-over), and `sdk_capture_ms_per_frame`: how long the SDK's `capture_frame` held its caller (wall)
  and how much of that was CPU;
* the event loop's lag (how late a 10 ms sleep wakes, p50/p99/max).

`--handoff loop` measures the same outputs with each frame handed to the SDK on the event loop itself (the
output's hand-off replaced by a direct call on these instances): what the loop paid per frame before the
hand-off thread. Both modes run in one process against one server, so the rows compare.

Imports livekit (and the project); no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import cpu_name
from bench.proc_cpu import thread_cpu_s
from bench.sessions import LiveKitRun, avatar_zip, frame_px, pct
from realtime.engine.protocol import EngineConfig
from realtime.host import AvatarAsset
from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.engine_adapter import EngineAdapter
from realtime.sidecar.render_lane import RenderLane
from realtime.sidecar.runtime import SessionRuntime

logger = logging.getLogger("bench.publish_cost")

SETTLE_S = 3.0  # after the last session joined: encoders ramp up, the rooms settle
HANDOFFS = ("thread", "loop")
# /proc comm names (15 characters) -> the groups reported
THREAD_GROUPS = {
    "VideoEncoderQue": "video_encoder",
    "AudioEncoderQue": "audio_encoder",
    "python": "python",
    "tokio-rt-worker": "sdk_tokio",
    "network_thread": "webrtc_network",
    "worker_thread 0": "webrtc_worker",
    "AudioSourceCapt": "audio_source_pull",
    "livekit-audio": "audio_source_pull",
}


class _Timed:
    """Counts calls of a callable and their wall and thread-CPU time."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wall_started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.calls += 1
            self.wall_s += time.perf_counter() - wall_started
            self.cpu_s += time.thread_time() - cpu_started

    def reset(self) -> None:
        self.calls, self.wall_s, self.cpu_s = 0, 0.0, 0.0


class _TimedVideoSource:
    """Wraps a publisher's `rtc.VideoSource`: times `capture_frame`, passes everything else through."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.capture_frame = _Timed(source.capture_frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


async def _loop_lag(samples_ms: list[float], period_s: float = 0.01) -> None:
    while True:
        started = time.perf_counter()
        await asyncio.sleep(period_s)
        samples_ms.append((time.perf_counter() - started - period_s) * 1000.0)


async def measure_level(
    livekit: LiveKitRun, engine: EngineAdapter, avatar: Any, sessions: int, *, duration_s: float, handoff: str
) -> dict[str, Any]:
    lane = RenderLane(engine.render, start_render=engine.render_async, max_batch_frames=32)
    runtimes: list[SessionRuntime] = []
    loop_timers: list[_Timed] = []
    sdk_timers: list[_Timed] = []
    try:
        for index in range(sessions):
            publisher = await livekit.publisher(avatar.width_px, avatar.height_px)
            source = _TimedVideoSource(publisher._video_source)
            publisher._video_source = source
            sdk_timers.append(source.capture_frame)
            if handoff == "loop":
                # The call on the loop, as the output made it before its hand-off thread.
                publisher._frames.submit = lambda capture: (capture(), True)[1]
            timed = _Timed(publisher._capture_video)
            publisher._capture_video = timed
            loop_timers.append(timed)
            runtime = SessionRuntime(
                f"cost-{index}", engine.open_session(avatar), [publisher], lane, RuntimeConfig()
            )
            await runtime.start()
            runtimes.append(runtime)
        await asyncio.sleep(SETTLE_S)
        for timer in (*loop_timers, *sdk_timers):
            timer.reset()
        lag_ms: list[float] = []
        probe = asyncio.create_task(_loop_lag(lag_ms))
        pgid = os.getpgid(0)  # this process's group: the servers run in groups of their own
        before, cpu_before, started = thread_cpu_s(pgid), time.process_time(), time.monotonic()
        await asyncio.sleep(duration_s)
        after, cpu_after, wall_s = thread_cpu_s(pgid), time.process_time(), time.monotonic() - started
        probe.cancel()
    finally:
        for runtime in runtimes:
            await runtime.stop()
            for publisher in runtime.publishers:
                await publisher.close()
        lane.close()
    by_group: defaultdict[str, float] = defaultdict(float)
    for comm, cpu_s in after.items():
        by_group[THREAD_GROUPS.get(comm.strip(), "other")] += cpu_s - before.get(comm, 0.0)
    frames = sum(t.calls for t in loop_timers)
    sdk_calls = max(1, sum(t.calls for t in sdk_timers))
    sdk_wall_s, sdk_cpu_s = sum(t.wall_s for t in sdk_timers), sum(t.cpu_s for t in sdk_timers)
    return {
        "sessions": sessions,
        "handoff": handoff,
        "cores_per_session": round((cpu_after - cpu_before) / wall_s / sessions, 4),
        "cores_per_session_by_thread": {
            group: round(cpu_s / wall_s / sessions, 4)
            for group, cpu_s in sorted(by_group.items(), key=lambda item: -item[1])
        },
        "frames_per_s_per_session": round(frames / wall_s / sessions, 2),
        "loop_ms_per_frame": round(sum(t.wall_s for t in loop_timers) * 1000.0 / max(1, frames), 3),
        "loop_busy_fraction_video": round(sum(t.wall_s for t in loop_timers) / wall_s, 3),
        "sdk_capture_ms_per_frame_wall": round(sdk_wall_s * 1000.0 / sdk_calls, 3),
        "sdk_capture_ms_per_frame_cpu": round(sdk_cpu_s * 1000.0 / sdk_calls, 3),
        "loop_lag_ms_p50": pct(lag_ms, 50),
        "loop_lag_ms_p99": pct(lag_ms, 99),
        "loop_lag_ms_max": pct(lag_ms, 100),
        "frames_dropped": sum(p.stats().frames_dropped for r in runtimes for p in r.publishers),
        "host_load_avg_1m": round(os.getloadavg()[0], 2),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-publish-cost-") as tmp:
        workdir = Path(tmp)
        engine = EngineAdapter(EngineConfig(engine="preview", cache_dir=workdir))
        engine.warm_up()
        avatar_path = workdir / "avatar.zip"
        avatar_path.write_bytes(avatar_zip(*args.frame_px))
        _, avatar = engine.prepare_avatar(AvatarAsset(avatar_path, "frames_zip", ""), lambda _p: None)
        livekit = LiveKitRun(workdir / "livekit")
        livekit.start()
        try:
            for sessions in args.sessions:
                for handoff in args.handoff:
                    row = await measure_level(
                        livekit, engine, avatar, sessions, duration_s=args.duration_s, handoff=handoff
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            livekit.stop()
    return {
        "benchmark": "publish_cost",
        "device": cpu_name(),
        "settings": {
            "frame_px": list(args.frame_px),
            "duration_s": args.duration_s,
            "settle_s": SETTLE_S,
            "engine": "preview (idle sessions: idle cycle + silence)",
            "output": "LiveKitPublisher per session into its own room of a local livekit-server (--dev)",
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "command": " ".join(["python -m bench.publish_cost", *(args.argv or [])]),
        },
        "notes": args.notes,
        "results": rows,
    }


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def _handoffs(text: str) -> list[str]:
    modes = [mode for mode in text.split(",") if mode]
    for mode in modes:
        if mode not in HANDOFFS:
            raise argparse.ArgumentTypeError(f"{mode!r}: expected {' or '.join(HANDOFFS)}")
    return modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.publish_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--sessions", type=_list(int), default=[4, 8], help="levels, e.g. 4,8")
    parser.add_argument("--frame-px", type=frame_px, default=(512, 512), help="N (square) or WxH")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument(
        "--handoff",
        type=_handoffs,
        default=list(HANDOFFS),
        help="thread (the output's hand-off thread), loop (capture_frame on the event loop), or both",
    )
    parser.add_argument("--notes", default="", help="free text stored in the result")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    document = asyncio.run(bench(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
