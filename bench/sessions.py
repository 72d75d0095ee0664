"""Sessions benchmark: how many concurrent 25-fps sessions one sidecar process sustains.

    python -m bench.sessions --sessions N --engine preview|musetalk --json PATH
        [--duration-s 10] [--device auto] [--model tiny|full-size-random] [--frame-px 256|512x512|1280x720]
        [--publisher counting|livekit] [--notes TEXT] [--levels 1,4,8] [--max-render-budget-ms 240]
        [--client-burst-s 0.6] [--client-start lockstep,staggered] [--no-first-frame-priority]

For each level n in 1, 2, 4, ... N (and N), n sessions run concurrently for `--duration-s`
on one event loop and one render lane, exactly as in the sidecar (`SessionRuntime`,
`RenderLane`, the engine adapter). Each session has a simulated TTS client that pushes
16 kHz s16le PCM in 20 ms messages at real-time pace through the same `AudioInput` the
WS endpoint uses: a 3 s utterance, end_of_utterance, 0.6 s of nothing, again. Output goes
to a counting publisher (no network: this measures the sidecar), or with `--publisher livekit` each
session publishes its video (`--frame-px`, W×H) and audio through the LiveKit SDK to a real
livekit-server started for the run: `cpu_cores_per_session` is this process's CPU time per
session-second over the level (render/composite + I420 conversion + encode + send; the server's own
CPU is not counted), measured with either publisher, so their difference is what publishing costs.

Per level: TTFF (first PCM byte of an utterance -> its first speech frame published),
tick lateness (publish time - the tick's deadline on the session clock), dropped frames
(speech ticks whose frame was not rendered in time), client underruns, render slack (how
long before its tick a batch was ready), the render lane's batch sizes, and the planning
budget the sessions' utterances got (`RenderLane.planning_budget_ms`: it grows with the load
up to `--max-render-budget-ms`; set that to `RuntimeConfig.render_budget_ms`, 40, for the
fixed budget). One render lane cost model spans the levels, as one sidecar process's lane
does across its sessions: a level starts from what the levels before it measured.
`max_sessions_ok` = the largest n with lateness p99 <= 40 ms and 0 dropped frames.

Imports: numpy, soxr (ingest) and the engine (torch only for musetalk); no livekit, no av.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine import VARIANTS, astronaut_zip, speech_like
from bench.machine import cpu_name
from infra.livekit import LiveKitServerConfig, server_process
from realtime.engine.accel import AccelConfig
from realtime.engine.device import choose_device, configure_cpu_threads
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.musetalk.weights.loader import load_musetalk
from realtime.engine.musetalk.weights.random import random_models, write_checkpoint
from realtime.engine.protocol import EngineConfig
from realtime.heap import GcPauses, freeze_long_lived
from realtime.host import AvatarAsset
from realtime.ingest.input import AudioInput
from realtime.outputs.base import PublisherStats
from realtime.outputs.registry import LiveKitTarget
from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.engine_adapter import EngineAdapter
from realtime.sidecar.render_lane import BatchCostModel, RenderLane
from realtime.sidecar.runtime import SessionRuntime

logger = logging.getLogger("bench.sessions")

UTTERANCE_S = 3.0
GAP_S = 0.6
CHUNK_MS = 20
LATENESS_OK_MS = 40.0


class CountingPublisher:
    """A `Publisher` that only counts: the benchmark measures the sidecar, not the network."""

    def __init__(self) -> None:
        self.name = "counting"
        self._stats = PublisherStats(name=self.name, connected=True)

    async def start(self) -> None:
        return None

    async def publish(self, tick: Any) -> None:
        self._stats.frames_published += 1
        self._stats.audio_samples_published += tick.speech_samples

    def interrupt(self, idle_frame: Any) -> None:
        return None

    async def close(self) -> None:
        return None

    def stats(self) -> Any:
        return self._stats


def frame_px(text: str) -> tuple[int, int]:
    """`--frame-px`: "512" (square) or "WxH" ("1280x720"); even sizes of at least 16 px (what video encoders
    take)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"frame size {text!r} must be N or WxH, e.g. 512 or 1280x720"
        ) from None
    if len(parts) > 2 or width < 16 or height < 16 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(
            f"frame size {text!r} must be N or WxH with even sizes of at least 16 px"
        )
    return width, height


def avatar_zip(width: int, height: int, count: int = 16) -> bytes:
    """The astronaut avatar (bench.engine's, a real face) at `width`×`height`: the square photo at the smaller
    side, its borders reflected out to the other (a wide frame keeps the face unstretched)."""
    import cv2  # noqa: PLC0415 (heavy: OpenCV)

    side = min(width, height)
    square = astronaut_zip(size=side, count=count)
    if width == height:
        return square
    source, buffer = zipfile.ZipFile(io.BytesIO(square)), io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w") as archive:
        for name in source.namelist():
            frame = cv2.imdecode(np.frombuffer(source.read(name), np.uint8), cv2.IMREAD_COLOR)
            if frame is None:
                raise RuntimeError(f"could not decode avatar frame {name}")
            left, top = (width - side) // 2, (height - side) // 2
            padded = cv2.copyMakeBorder(
                frame, top, height - side - top, left, width - side - left, cv2.BORDER_REFLECT
            )
            ok, png = cv2.imencode(".png", padded)
            if not ok:
                raise RuntimeError(f"could not encode avatar frame {name}")
            archive.writestr(name, png.tobytes())
    return buffer.getvalue()


class LiveKitRun:
    """A real livekit-server for the run, and a publisher per session into its own room."""

    def __init__(self, workdir: Path) -> None:
        self.config = LiveKitServerConfig().with_free_ports()
        self.process = server_process(self.config, workdir)
        self._rooms = 0

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    async def publisher(self, width_px: int, height_px: int) -> Any:
        from livekit import api  # noqa: PLC0415 (heavy: livekit)

        from realtime.outputs.livekit import LiveKitPublisher, LiveKitPublisherOptions  # noqa: PLC0415 (heavy: livekit)

        self._rooms += 1
        room, identity = f"bench-{self._rooms}", "avatar"
        token = (
            api.AccessToken(self.config.api_key, self.config.api_secret)
            .with_identity(identity)
            .with_grants(api.VideoGrants(room_join=True, room=room))
            .to_jwt()
        )
        publisher = LiveKitPublisher(
            LiveKitTarget(self.config.ws_url, room, identity, token),
            LiveKitPublisherOptions(width_px=width_px, height_px=height_px),
        )
        await publisher.start()
        return publisher


def build_engine(args: argparse.Namespace, cache_dir: Path) -> tuple[Any, str, str]:
    """The engine adapter, the device description, the torch version (or None)."""
    if args.engine == "preview":
        config = EngineConfig(engine="preview", cache_dir=cache_dir)
        return EngineAdapter(config), cpu_name(), ""
    import torch  # noqa: PLC0415 (heavy: torch)

    device = choose_device(args.device, "auto")
    if not device.is_cuda:
        configure_cpu_threads(None)
    accel = {k: v for k, v in VARIANTS[args.variant].items() if k != "dtype"}
    config = EngineConfig(
        engine="musetalk",
        device=device.device,
        cache_dir=cache_dir,
        # one lane batch is one device batch (no chunking inside render)
        max_batch_size=args.max_batch_frames,
        accel=AccelConfig(**accel),
        artifacts_dir=args.artifacts_dir,
    )
    if args.model == "tiny":
        write_checkpoint(cache_dir / "models", "tiny")
        models = load_musetalk(cache_dir / "models", device)
    else:
        models = random_models("full", device)
    engine = MuseTalkEngine(models, config, None)
    name = str(torch.cuda.get_device_name(torch.device(device.device))) if device.is_cuda else cpu_name()
    return EngineAdapter(config, engine=engine, reason=f"musetalk {args.model}"), name, str(torch.__version__)


async def client(
    audio_input: Any,
    pcm: bytes,
    stop_at: float,
    *,
    burst_s: float = 0.0,
    start_delay_s: float = 0.0,
    gap_s: float = GAP_S,
) -> None:
    """A TTS client: utterances at real-time pace in 20 ms messages, with gaps, until `stop_at`; `burst_s`:
    each utterance's first `burst_s` is sent at once (a TTS that synthesises faster than real time), the rest
    at real-time pace from then on; `start_delay_s`: silence before the first utterance (the call's phase);
    `gap_s`: from the last message of one utterance to the first of the next. The audio sent ahead
    (`burst_s`) and the session's lead still play after the last message, so with a gap shorter than both
    the next utterance queues behind the one playing (sentences of one answer); longer, it starts a turn."""
    chunk = 16_000 * CHUNK_MS // 1000 * 2
    burst_chunks = round(burst_s * 1000 / CHUNK_MS)
    await asyncio.sleep(start_delay_s)
    while time.monotonic() < stop_at:
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), chunk)):
            delay = started + (index - burst_chunks) * CHUNK_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            audio_input.push(pcm[offset : offset + chunk])
        audio_input.end_utterance()
        await asyncio.sleep(gap_s)


async def run_level(
    engine: Any,
    avatar: Any,
    sessions: int,
    duration_s: float,
    pcm: bytes,
    *,
    max_batch_frames: int = 32,
    runtime_config: Any = None,
    cost_model: Any = None,
    livekit: LiveKitRun | None = None,
    client_burst_s: float = 0.0,
    client_start: str = "lockstep",
    client_gap_s: float = GAP_S,
) -> dict[str, Any]:
    config = runtime_config or RuntimeConfig()
    lane = RenderLane(
        engine.render,
        start_render=engine.render_async,
        max_batch_frames=max_batch_frames,
        prepare=getattr(engine, "prepare_features", None),
        cost_model=cost_model,
    )
    runtimes = []
    for index in range(sessions):
        publisher = (
            await livekit.publisher(avatar.width_px, avatar.height_px)
            if livekit is not None
            else CountingPublisher()
        )
        runtime = SessionRuntime(f"bench-{index}", engine.open_session(avatar), [publisher], lane, config)
        runtimes.append(runtime)
    rng = random.Random(sessions)
    started = time.monotonic()
    loop_lag_ms: list[float] = []
    stalls: list[tuple[float, float]] = []
    lag_probe = asyncio.create_task(_probe_loop_lag(loop_lag_ms, stalls))
    gc_pauses = GcPauses().install()  # this level's collections: a stall's cause when they line up
    rendered: list[tuple[float, int]] = []  # (monotonic s, frames the lane rendered so far)
    rendered_probe = asyncio.create_task(_probe_rendered(lane, rendered))
    try:
        for runtime in runtimes:
            await runtime.start()
            await asyncio.sleep(rng.uniform(0.0, 0.04))  # sessions start at arbitrary phases of their clocks
        stop_at = time.monotonic() + duration_s
        inputs = [AudioInput(runtime, "bench", utterance_gap_ms=0) for runtime in runtimes]
        cpu_started_s, speech_started_s = time.process_time(), time.monotonic()
        delays_s = client_start_delays_s(
            client_start, sessions, rng, cycle_s=client_cycle_s(client_burst_s, client_gap_s)
        )
        await asyncio.gather(
            *(
                client(
                    audio_input,
                    pcm,
                    stop_at,
                    burst_s=client_burst_s,
                    start_delay_s=delay_s,
                    gap_s=client_gap_s,
                )
                for audio_input, delay_s in zip(inputs, delays_s, strict=True)
            )
        )
        cpu_s, speech_wall_s = time.process_time() - cpu_started_s, time.monotonic() - speech_started_s
        drain_until = time.monotonic() + 5.0
        # The runtime has no "drained" event; polling every 50 ms only delays the end of the level.
        while any(r.playing or r.timeline.pending_samples for r in runtimes):
            if time.monotonic() >= drain_until:
                break
            await asyncio.sleep(0.05)
    finally:
        gc_pauses.uninstall()
        lag_probe.cancel()
        rendered_probe.cancel()
        for runtime in runtimes:
            await runtime.stop()
        lane.close()
    wall_s = time.monotonic() - started
    gc_stats = gc_pauses.stats()
    ttff = [v for r in runtimes for v in r.samples.ttff_ms]
    turn_ttff = [v for r in runtimes for v in r.samples.turn_ttff_ms]
    lateness = [v for r in runtimes for v in r.samples.lateness_ms]
    slack = [v for r in runtimes for v in r.samples.render_slack_ms]
    budgets = [v for r in runtimes for v in r.samples.planned_budget_ms]
    dropped = sum(r.counters.render_misses for r in runtimes)
    stats = [r.stats() for r in runtimes]
    for s in stats:
        assert s.audio_samples_received == (
            s.audio_samples_rendered
            + s.audio_samples_pending
            + s.audio_samples_rejected
            + s.audio_samples_flushed
        ), s
    row: dict[str, Any] = {
        "sessions": sessions,
        "client_start": client_start,
        "ttff_ms_p50": pct(ttff, 50),
        "ttff_ms_p99": pct(ttff, 99),
        # Utterances that started a turn (nothing of their session playing or planned): the TTFF a caller
        # hears. The others waited for the one playing to end (`RuntimeSamples.turn_ttff_ms`).
        "turn_ttff_ms_p50": pct(turn_ttff, 50),
        "turn_ttff_ms_p99": pct(turn_ttff, 99),
        "turn_utterances": len(turn_ttff),
        "lateness_ms_p50": pct(lateness, 50),
        "lateness_ms_p99": pct(lateness, 99),
        "dropped_frames": dropped,
        "underrun_ticks": sum(r.counters.underrun_ticks for r in runtimes),
        "clock_resyncs": sum(r.counters.clock_resyncs for r in runtimes),
        "utterance_start_deferred_ticks": sum(r.counters.utterance_start_deferred_ticks for r in runtimes),
        "first_frame_wait_ticks": sum(r.counters.first_frame_wait_ticks for r in runtimes),
        "render_slack_ms_p1": pct(slack, 1),
        "planned_budget_ms_p50": pct(budgets, 50),
        "planned_budget_ms_max": pct(budgets, 100),
        "speech_frames": sum(s.speech_frames for s in stats),
        "frames_published": sum(s.frames_published for s in stats),
        "utterances": len(ttff),
        "lane_batches": lane.stats.batches,
        "lane_mean_batch_frames": round(lane.stats.frames_rendered / max(1, lane.stats.batches), 2),
        "lane_largest_batch_frames": lane.stats.largest_batch_frames,
        "lane_busy_fraction": round(lane.stats.busy_s / wall_s, 3),
        "lane_batches_cut_by_deadline": lane.stats.batches_cut_by_deadline,
        # not rendered: due before the batch could end
        "lane_frames_skipped_late": lane.stats.frames_skipped_late,
        "lane_batch_ms_by_bucket": {
            str(b): round(ms, 2) for b, ms in sorted(lane.cost_model.measured().items())
        },
        # Mean ms per batch in each part of a batch: the batched whisper encode, the per-job pulls, the
        # render.
        "lane_stage_ms_per_batch": {
            name: round(seconds * 1000 / max(1, lane.stats.batches), 2)
            for name, seconds in (
                ("prepare", lane.stats.prepare_s),
                ("pulls", lane.stats.pulls_s),
                ("render", lane.stats.render_s),
            )
        },
        # The aggregate rate the lane reached: frames rendered in the busiest second of the level.
        "lane_rendered_fps_peak_1s": _peak_rate(rendered, window_s=1.0),
        "loop_lag_ms_p99": pct(loop_lag_ms, 99),  # event-loop responsiveness: how late a 10 ms sleep wakes
        "loop_lag_ms_max": pct(loop_lag_ms, 100),
        # Each stall of the event loop (s from the level's start to its end, ms long) beside each long
        # collector pause (s from the level's start to its start, generation, ms): lined up, the collector
        # caused it.
        "loop_stalls": [[round(at_s - started, 3), round(ms, 1)] for at_s, ms in stalls],
        "gc_collections_by_generation": list(gc_stats.collections),
        "gc_pause_ms_max_by_generation": [round(ms, 2) for ms in gc_stats.pause_ms_max],
        "gc_long_pauses": [pause.as_row(started) for pause in gc_stats.long_pauses],
        "gc_frozen_objects": gc_stats.frozen_objects,
        "lane_capacity_sessions": lane.capacity_sessions(max_batch_ms=config.max_batch_ms),
        "wall_s": round(wall_s, 2),
        # This process's CPU time per session-second while the clients spoke (see the module docstring).
        "cpu_cores_per_session": round(cpu_s / speech_wall_s / sessions, 4),
        "cpu_cores_total": round(cpu_s / speech_wall_s, 3),
        # What the publishers themselves sent, and dropped (a real one drops what its queue cannot hold).
        "publisher_frames_published": sum(p.stats().frames_published for r in runtimes for p in r.publishers),
        "publisher_frames_dropped": sum(p.stats().frames_dropped for r in runtimes for p in r.publishers),
        "host_load_avg_1m": round(os.getloadavg()[0], 2),
    }
    dropped += row["publisher_frames_dropped"]
    row["dropped_frames"] = dropped
    row["ok"] = bool(
        row["lateness_ms_p99"] is not None and row["lateness_ms_p99"] <= LATENESS_OK_MS and dropped == 0
    )
    return row


CLIENT_STARTS = ("lockstep", "staggered")


def client_cycle_s(burst_s: float, gap_s: float, utterance_s: float = UTTERANCE_S) -> float:
    """How long a client takes from one utterance's first message to the next's (see `client`)."""
    return max(0.0, utterance_s - burst_s) + gap_s


def client_start_delays_s(mode: str, sessions: int, rng: random.Random, *, cycle_s: float) -> list[float]:
    """When each session's client starts speaking. "lockstep": all at once, so every utterance of every
    session starts within the same few milliseconds (the worst case for TTFF: all first frames compete for
    one batch). "staggered": each call at its own phase, uniform over one utterance cycle (`cycle_s`), as
    independent conversations are (their utterances then start at unrelated times)."""
    if mode == "lockstep":
        return [0.0] * sessions
    if mode == "staggered":
        return [rng.uniform(0.0, cycle_s) for _ in range(sessions)]
    raise ValueError(f"client start {mode!r}: expected one of {', '.join(CLIENT_STARTS)}")


# A wake-up this late is a stall: the sessions' clocks resync after RuntimeConfig.resync_after_ms.
STALL_MS = 100.0


async def _probe_loop_lag(
    samples_ms: list[float], stalls: list[tuple[float, float]], period_s: float = 0.01
) -> None:
    """Sleep `period_s` over and over and record how late each wake-up is (the event loop's congestion), and
    when (monotonic s at the wake-up) each stall of at least STALL_MS ended."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(period_s)
        lag_ms = (time.perf_counter() - before - period_s) * 1000.0
        samples_ms.append(lag_ms)
        if lag_ms >= STALL_MS:
            stalls.append((time.monotonic(), lag_ms))


async def _probe_rendered(lane: Any, samples: list[tuple[float, int]], period_s: float = 0.1) -> None:
    """Record the lane's rendered-frame count every `period_s`."""
    while True:
        samples.append((time.monotonic(), lane.stats.frames_rendered))
        await asyncio.sleep(period_s)


def _peak_rate(samples: list[tuple[float, int]], *, window_s: float) -> float | None:
    """The highest count per second over any stretch of at least `window_s` between two samples."""
    best: float | None = None
    start = 0
    for end, (end_s, end_count) in enumerate(samples):
        while start + 1 < end and end_s - samples[start + 1][0] >= window_s:
            start += 1
        start_s, start_count = samples[start]
        if end_s - start_s >= window_s:
            rate = (end_count - start_count) / (end_s - start_s)
            best = rate if best is None else max(best, rate)
    return round(best, 1) if best is not None else None


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def ladder(maximum: int) -> list[int]:
    levels, n = [], 1
    while n < maximum:
        levels.append(n)
        n *= 2
    levels.append(maximum)
    return levels


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
        cache_dir = Path(tmp)
        engine, device, torch_version = build_engine(args, cache_dir)
        warm_started = time.perf_counter()
        engine.warm_up()
        warm_up_ms = (time.perf_counter() - warm_started) * 1000
        # A compiled variant is swapped in by a background thread: measure the variant asked for, once it
        # serves.
        serving = engine.engine.serving_state()
        if isinstance(engine.engine, MuseTalkEngine):
            serving = engine.engine.wait_for_variant(args.compiled_timeout_s)
        variant_ready_ms = (time.perf_counter() - warm_started) * 1000
        print(f"serving: {serving.describe()} after {variant_ready_ms:.0f} ms", flush=True)
        # As the sidecar does after its warm-up (SidecarHost.warm_up, realtime.heap); --no-gc-freeze measures
        # the stalls it prevents.
        frozen = freeze_long_lived(collect_first=True) if args.gc_freeze else None
        avatar_path = cache_dir / "avatar.zip"
        avatar_path.write_bytes(avatar_zip(*args.frame_px))
        _, avatar = engine.prepare_avatar(AvatarAsset(avatar_path, "frames_zip", ""), lambda _p: None)
        speech = speech_like(UTTERANCE_S, seed=3)
        pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
        runtime_config = RuntimeConfig(
            max_render_budget_ms=args.max_render_budget_ms,
            render_budget_safety=args.render_budget_safety,
            render_ahead_frames=args.render_ahead_frames,
            first_frame_priority=args.first_frame_priority,
        )
        # one sidecar process: the lane's measurements outlive each level's sessions
        cost_model = BatchCostModel()
        rows: list[dict[str, Any]] = []
        livekit = LiveKitRun(cache_dir / "livekit") if args.publisher == "livekit" else None
        if livekit is not None:
            livekit.start()
        try:
            for client_start, sessions in (
                (mode, n) for mode in args.client_start for n in (args.levels or ladder(args.sessions))
            ):
                if rows and rows[-1]["client_start"] == client_start and _ladder_turned(rows, args):
                    continue
                row = await run_level(
                    engine,
                    avatar,
                    sessions,
                    args.duration_s,
                    pcm,
                    max_batch_frames=args.max_batch_frames,
                    runtime_config=runtime_config,
                    cost_model=cost_model,
                    livekit=livekit,
                    client_burst_s=args.client_burst_s,
                    client_start=client_start,
                    client_gap_s=args.client_gap_s,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if livekit is not None:
                livekit.stop()
        info = engine.info()
    by_start = {mode: _summary([r for r in rows if r["client_start"] == mode]) for mode in args.client_start}
    return {
        "benchmark": "sessions",
        "device": device,
        "torch": torch_version or None,
        "settings": {
            "engine": info.name,
            "model": args.model if args.engine == "musetalk" else "none (preview)",
            "frame_px": list(args.frame_px),
            "publisher": args.publisher,
            "duration_s": args.duration_s,
            "utterance_s": UTTERANCE_S,
            "gap_s": args.client_gap_s,
            "client_chunk_ms": CHUNK_MS,
            "client_burst_s": args.client_burst_s,
            "client_start": args.client_start,
            "first_frame_priority": runtime_config.first_frame_priority,
            "input": "16 kHz s16le mono, real-time pace, through AudioInput (the WS path without the socket)"
            + (f"; each utterance's first {args.client_burst_s} s at once" if args.client_burst_s else ""),
            "output": "counting publisher (no network)"
            if args.publisher == "counting"
            else "LiveKit SDK publisher per session, each into its own room of a local "
            "livekit-server (--dev)",
            "warm_up_ms": round(warm_up_ms, 1),
            "variant_ready_ms": round(variant_ready_ms, 1),
            "gc_freeze": args.gc_freeze,
            "gc_frozen_objects": frozen.frozen_objects if frozen else 0,
            "gc_freeze_collect_ms": frozen.collect_ms if frozen else None,
            "serving": serving.describe(),
            "engine_variant": args.variant if args.engine == "musetalk" else None,
            "max_batch_frames": args.max_batch_frames,
            "render_budget_ms": runtime_config.render_budget_ms,
            "max_render_budget_ms": runtime_config.max_render_budget_ms,
            "render_budget_safety": runtime_config.render_budget_safety,
            "render_ahead_frames": runtime_config.render_ahead_frames,
            "adaptive_render_budget": runtime_config.max_render_budget_ms > runtime_config.render_budget_ms,
            "levels": [r["sessions"] for r in rows],
            "python": sys.version.split()[0],
        },
        "notes": args.notes,
        # The first --client-start mode's summary; every mode's in summary_by_client_start.
        "summary": by_start[args.client_start[0]],
        "summary_by_client_start": by_start,
        "results": rows,
    }


def _client_starts(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    for mode in modes:
        if mode not in CLIENT_STARTS:
            raise argparse.ArgumentTypeError(f"{mode!r}: expected {' or '.join(CLIENT_STARTS)}")
    if not modes:
        raise argparse.ArgumentTypeError("no client start mode given")
    return modes


def _ladder_turned(rows: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Whether this mode's ladder may stop: its last level failed two levels past its last good one."""
    if args.all_levels:
        return False
    mode = rows[-1]["client_start"]
    own = [r for r in rows if r["client_start"] == mode]
    last_good = max((r["sessions"] for r in own if r["ok"]), default=1)
    return not own[-1]["ok"] and own[-1]["sessions"] >= 2 * last_good


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["ok"]]
    best = max(ok, key=lambda r: r["sessions"]) if ok else None
    return {
        "max_sessions_ok": best["sessions"] if best else 0,
        "ttff_ms_p50": best["ttff_ms_p50"] if best else None,
        "ttff_ms_p99": best["ttff_ms_p99"] if best else None,
        "turn_ttff_ms_p50": best["turn_ttff_ms_p50"] if best else None,
        "turn_ttff_ms_p99": best["turn_ttff_ms_p99"] if best else None,
        "lateness_ms_p50": best["lateness_ms_p50"] if best else None,
        "lateness_ms_p99": best["lateness_ms_p99"] if best else None,
        "dropped_frames": best["dropped_frames"] if best else None,
        "criterion": f"lateness p99 <= {LATENESS_OK_MS:.0f} ms and 0 dropped frames",
        # Every level tried passed: the real limit lies above the largest N asked for.
        "max_sessions_is_lower_bound": bool(rows) and all(r["ok"] for r in rows),
        # The busiest second of the largest level that held: the aggregate rate rendered with every frame on
        # time.
        "rendered_fps_peak_1s_ok": best["lane_rendered_fps_peak_1s"] if best else None,
        # At the largest level that held: this process's CPU per session-second (see the module docstring).
        "cpu_cores_per_session": best["cpu_cores_per_session"] if best else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions", type=int, required=True, help="the largest number of concurrent sessions"
    )
    parser.add_argument("--engine", choices=("preview", "musetalk"), default="preview")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--duration-s", type=float, default=10.0, help="how long each level runs")
    parser.add_argument("--device", default="auto", help="musetalk: auto | cpu | cuda | cuda:N")
    parser.add_argument("--model", choices=("tiny", "full-size-random"), default="full-size-random")
    parser.add_argument(
        "--frame-px", type=frame_px, default=(256, 256), help="avatar/output frame size: N (square) or WxH"
    )
    parser.add_argument(
        "--publisher",
        choices=("counting", "livekit"),
        default="counting",
        help="counting (no network) or livekit (a real livekit-server started for the run)",
    )
    parser.add_argument(
        "--variant", default="graphs", help="musetalk engine settings: a bench.engine variant"
    )
    parser.add_argument("--max-batch-frames", type=int, default=32, help="render lane batch limit")
    parser.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument(
        "--max-render-budget-ms",
        type=float,
        default=RuntimeConfig().max_render_budget_ms,
        help="upper bound of the load-adaptive planning budget (40 = the fixed budget: adaptation off)",
    )
    parser.add_argument("--render-budget-safety", type=float, default=RuntimeConfig().render_budget_safety)
    parser.add_argument("--render-ahead-frames", type=int, default=RuntimeConfig().render_ahead_frames)
    parser.add_argument(
        "--client-burst-s",
        type=float,
        default=0.0,
        help="each utterance's first seconds of audio sent at once (a TTS faster than real time); 0: real "
        "time",
    )
    parser.add_argument(
        "--client-gap-s",
        type=float,
        default=GAP_S,
        help="from one utterance's last message to the next's first; shorter than --client-burst-s plus the "
        "lead, utterances queue behind the one playing (one answer's sentences), longer (e.g. 1.5) each "
        "starts a turn, whose TTFF a caller hears (turn_ttff_ms_*)",
    )
    parser.add_argument(
        "--client-start",
        type=_client_starts,
        default=["lockstep"],
        help="when the sessions' clients speak: lockstep (every utterance of every session starts together: "
        "the worst case), staggered (each call at its own phase); a comma list runs the ladder for each",
    )
    parser.add_argument(
        "--no-first-frame-priority",
        dest="first_frame_priority",
        action="store_false",
        help="plan every utterance with the load's full budget (RuntimeConfig.first_frame_priority off)",
    )
    parser.add_argument(
        "--all-levels", action="store_true", help="run every level (no stop once the curve turns)"
    )
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave the loaded heap in the collector's scans (the sidecar freezes it after warm-up)",
    )
    parser.add_argument("--notes", default="", help="free text stored in the result (machine load, caveats)")
    parser.add_argument(
        "--artifacts-dir", type=Path, default=None, help="prebuilt engine artifacts (compile variants)"
    )
    parser.add_argument(
        "--compiled-timeout-s",
        type=float,
        default=900.0,
        help="compile variants: how long to wait for the compiled graphs' swap before measuring",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # warm-up progress: cold compiles are long
    logging.getLogger("realtime.engine.musetalk.engine").setLevel(logging.INFO)
    document = asyncio.run(bench(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(document["summary"], indent=2))
    if "building" in document["settings"]["serving"]:
        # A background compile still runs (--compiled-timeout-s passed): leave without joining it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
