"""Temporal outage at a real LiveKit subscriber: how long a live session survives with Temporal down.

    python -m bench.outage --outage-s 300 [--json bench/results/chaos-outage-cpu-<yyyymmdd>.json]

A real Temporal dev server on a database file, the production control worker (in this process),
one real `lipsync sidecar` process (preview engine) publishing to a real livekit-server, and a
subscriber (tests/support/avcheck.RoomRecorder) that records every frame's arrival. With the
session live, Temporal is stopped for `--outage-s`, then started again on the same database.
Reported: the longest gap between two frames at the subscriber from the outage on, next to the
same figure over the 20 s before it (the machine's own baseline), whether the workflow
reconciled with the sidecar and carried on (no loss, same sidecar), and how it ended on stop.

The session speaks all along (`--speech`, on by default): a client streams espeak-ng speech into
the sidecar's audio WebSocket in real time (bench.chaos's utterance, a pause, the next), as the
API's relay would. Reported for the outage: the utterances that played out (`playback_finished`)
and the speech the subscriber heard (seconds of audio above a speech level), each next to the same
rate over the baseline, the longest gap between two audio chunks at the subscriber, and whether
the client's socket stayed open.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from temporalio.client import Client

from api.policy_file import load_policies
from bench.chaos import PAUSE_S, SPEECH_RATE_HZ, SPEECH_TEXT, speak_until_closed, speech_pcm
from bench.machine import cpu_name
from infra import livekit, temporal
from infra.demo import avatar_zip_bytes, serve_directory
from realtime.outputs.registry import LiveKitParams
from tests.support.outputs import output_request
from tests.support.restartable_temporal import RestartableTemporal
from workflows.client import stop_session
from workflows.contracts import Phase
from workflows.session import SessionWorkflow

# A 10 ms chunk at the subscriber counts as speech above this RMS (int16 full scale 32768): silence and the
# idle avatar's audio are far below, espeak-ng's voice well above.
SPEECH_RMS = 500.0
BASELINE_S = 20.0  # the subscriber's figures with Temporal up, before the outage


class Speaker:
    """Streams speech into the session's audio socket until stopped; counts what played out, and
    reconnects."""

    def __init__(self, url: str, speech: bytes) -> None:
        self.url = url
        self.speech = speech
        self.finished_at_s: list[float] = []  # monotonic, one per playback_finished
        self.connects = 0
        self.closes: list[str] = []  # close codes and reasons seen, with the time

    async def run(self) -> None:
        while True:
            try:
                async with websockets.connect(self.url, open_timeout=30) as ws:
                    self.connects += 1
                    await speak_until_closed(
                        ws, self.speech, lambda: self.finished_at_s.append(time.monotonic())
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the session's socket closed: say so, and come back
                self.closes.append(f"{time.monotonic():.1f}: {exc!r}")
            await asyncio.sleep(1.0)


LOOP_PROBE_S = 0.05  # how often this process's event loop is checked for stalls
GAP_REPORT_MS = 200.0  # frame gaps at the subscriber longer than this are reported one by one


def frame_gaps(
    frames: list[Any], down_at: float, loop_lags: list[tuple[float, float]]
) -> list[dict[str, Any]]:
    """The subscriber's frame gaps over GAP_REPORT_MS from a second before the outage on (see the caller)."""
    kept = [frame for frame in frames if frame.arrival_s >= down_at - 1.0]
    gaps = []
    for before, after in itertools.pairwise(kept):
        gap_s = after.arrival_s - before.arrival_s
        if gap_s * 1000 < GAP_REPORT_MS:
            continue
        stalled = [lag for at_s, lag in loop_lags if before.arrival_s - 0.5 <= at_s <= after.arrival_s]
        gaps.append(
            {
                "at_s_from_outage": round(before.arrival_s - down_at, 2),
                "gap_ms": round(gap_s * 1000, 1),
                "frame_ids_skipped": after.frame_id - before.frame_id - 1,
                "latency_ms_after": round((after.arrival_wall_us - after.user_timestamp_us) / 1000, 1),
                "latency_ms_before": round((before.arrival_wall_us - before.user_timestamp_us) / 1000, 1),
                "subscriber_loop_lag_ms": round(max(stalled, default=0.0) * 1000, 1),
            }
        )
    return gaps


async def session_counters(sidecars: Any, session_id: str) -> dict[str, float]:
    """The sidecar's own counters for the session that tell a stall on its side (its /healthz)."""
    stats = (await sidecars.healthz("a"))["sessions"].get(session_id) or {}
    extra = stats.get("extra") or {}
    return {
        "frames_published": float(stats.get("frames_published", 0)),
        "dropped_frames": float(stats.get("dropped_frames", 0)),
        "clock_resyncs": float(extra.get("clock_resyncs", 0.0)),
        "livekit_frames_dropped": float(extra.get("livekit_frames_dropped", 0.0)),
    }


def speech_s(chunks: list[tuple[float, np.ndarray]], since_s: float, until_s: float) -> float:
    """Seconds of audio heard between two instants whose level is speech's (see SPEECH_RMS)."""
    total_s = 0.0
    for at_s, chunk in chunks:
        loud = chunk.size and float(np.sqrt(np.mean(chunk.astype(np.float64) ** 2))) >= SPEECH_RMS
        if since_s <= at_s < until_s and loud:
            total_s += chunk.size / 48_000
    return total_s


def speech_figures(
    speaker: Speaker,
    chunks: list[tuple[float, np.ndarray]],
    baseline_from: float,
    down_at: float,
    up_at: float,
) -> dict[str, Any]:
    """What the speaking session delivered during the outage, next to the same rates over the baseline."""
    chunk_times = [at_s for at_s, _ in chunks if down_at <= at_s <= up_at]
    audio_gaps = [b - a for a, b in itertools.pairwise(chunk_times)]
    baseline_s = down_at - baseline_from
    outage_s = up_at - down_at
    during = sum(down_at <= t <= up_at for t in speaker.finished_at_s)
    before = sum(baseline_from <= t < down_at for t in speaker.finished_at_s)
    return {
        "utterances_during_outage": during,
        "utterances_per_min_during_outage": round(60 * during / outage_s, 2),
        "utterances_per_min_before": round(60 * before / baseline_s, 2),
        "speech_heard_share_during_outage": round(speech_s(chunks, down_at, up_at) / outage_s, 3),
        "speech_heard_share_before": round(speech_s(chunks, baseline_from, down_at) / baseline_s, 3),
        "max_audio_gap_ms_during_outage": round(max(audio_gaps) * 1000, 1) if audio_gaps else None,
        "audio_socket_connects": speaker.connects,
        "audio_socket_closes": speaker.closes,
    }


async def run(outage_s: float, work_dir: Path, speech: bool = True) -> dict[str, Any]:
    from tests.support.avcheck import RoomRecorder, token  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.credentials import audio_token  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.sidecar_process import SidecarProcesses  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.temporal_harness import FAST_POLICY_OVERRIDES, Harness, wait_for_status  # noqa: PLC0415 (tests/ is not installed with the package)

    server = RestartableTemporal(
        temporal.TemporalDevServerConfig(db_file=work_dir / "temporal.db").with_free_ports(),
        work_dir / "temporal.log",
    )
    lk_config = livekit.LiveKitServerConfig().with_free_ports()
    lk = livekit.server_process(lk_config, work_dir / "livekit")
    server.start()
    lk.start()
    assets = work_dir / "assets"
    assets.mkdir()
    (assets / "astronaut.zip").write_bytes(avatar_zip_bytes())
    viewer: RoomRecorder | None = None
    try:
        client = await Client.connect(server.config.target, namespace=temporal.NAMESPACE)
        async with Harness(client, work_dir / "harness", lease_s=15.0, registration_interval_s=5.0) as world:
            sidecars = SidecarProcesses(
                server.config.target,
                world,
                work_dir,
                livekit_credentials=(lk_config.api_key, lk_config.api_secret),
                lease_s=15.0,
                registration_interval_s=5.0,
            )
            try:
                sidecar_id = await sidecars.spawn("a")
                with serve_directory(assets) as assets_url:
                    request = world.request(
                        f"{assets_url}/astronaut.zip",
                        output_request(livekit=LiveKitParams(url=lk_config.ws_url, identity="avatar-outage")),
                    )
                    # Production timeouts (infra/policies.yaml: every activity's, not the tests' short ones,
                    # which a loaded host misses during bring-up), with the loopback asset server allowed.
                    policy = load_policies(
                        overrides={
                            **{
                                key: value
                                for key, value in FAST_POLICY_OVERRIDES.items()
                                if not key.startswith("activities.")
                            },
                            "session.idle_timeout_s": 3600.0,
                            "session.max_duration_s": 7200.0,
                            "session.stats_interval_s": 2.0,
                            "session.stats_report_interval_s": 15.0,
                            "activities.run_session.heartbeat_timeout_s": 10.0,
                            "activities.run_session.reconcile_s": 15.0,
                        }
                    )
                    handle = await world.start(request, policy)
                    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE, timeout_s=120)
                viewer = RoomRecorder(mouth_box=(0, 0, 16, 16))
                await viewer.connect(lk_config.ws_url, token(lk_config, "viewer", request.room))
                await viewer.wait_for(lambda: len(viewer.frames) >= 50, 60)
                speaker: Speaker | None = None
                if speech:
                    session_id = request.session_id
                    speaker = Speaker(
                        f"ws://127.0.0.1:{sidecars.ports['a']}/v1/sessions/{session_id}/audio"
                        f"?sample_rate={SPEECH_RATE_HZ}&token={audio_token(session_id, ttl_s=7200)}",
                        await asyncio.to_thread(speech_pcm, work_dir),
                    )
                    speaking = asyncio.create_task(speaker.run())
                    await viewer.wait_for(lambda: bool(speaker.finished_at_s), 60)
                baseline_from = time.monotonic()
                await asyncio.sleep(BASELINE_S)  # a baseline: the same subscriber with Temporal up

                load_1min: list[float] = []
                loop_lags: list[tuple[float, float]] = []  # (when, how late) this process's loop woke up

                async def watch_loop() -> None:
                    while True:
                        asked_at = time.monotonic()
                        await asyncio.sleep(LOOP_PROBE_S)
                        loop_lags.append((asked_at, time.monotonic() - asked_at - LOOP_PROBE_S))

                loop_watch = asyncio.create_task(watch_loop())
                sidecar_before = await session_counters(sidecars, request.session_id)

                async def sample_load() -> None:
                    while True:
                        load_1min.append(round(os.getloadavg()[0], 2))
                        await asyncio.sleep(15.0)

                sampler = asyncio.create_task(sample_load())
                down_at = time.monotonic()
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(server.start)
                up_at = time.monotonic()
                sampler.cancel()
                back = datetime.now(UTC)
                await wait_for_status(
                    handle,
                    lambda s: (
                        bool(s.stats_reported_at) and datetime.fromisoformat(s.stats_reported_at) > back
                    ),
                    timeout_s=120,
                )
                await asyncio.sleep(30.0)  # a heartbeat timeout and a reconcile later: still live?
                status = await handle.query(SessionWorkflow.status)
                loop_watch.cancel()
                sidecar_after = await session_counters(sidecars, request.session_id)
                arrivals = [frame.arrival_s for frame in viewer.frames if frame.arrival_s >= down_at - 1.0]
                gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                before = [f.arrival_s for f in viewer.frames if down_at - BASELINE_S <= f.arrival_s < down_at]
                gaps_before = [b - a for a, b in itertools.pairwise(before)]
                during = [f for f in viewer.frames if down_at <= f.arrival_s <= up_at]
                # Before the stop below: the frames of the live session only, not of its teardown.
                gaps_seen = frame_gaps(viewer.frames, down_at, loop_lags)
                spoken: dict[str, Any] = {}
                if speaker is not None:
                    speaking.cancel()
                    await asyncio.gather(speaking, return_exceptions=True)
                    spoken = speech_figures(speaker, viewer.audio_chunks, baseline_from, down_at, up_at)
                await stop_session(client, request.session_id)
                result = await handle.result()
                return {
                    "outage_s": round(up_at - down_at, 1),
                    "frames_during_outage": len(during),
                    "fps_during_outage": round(len(during) / (up_at - down_at), 2),
                    "max_frame_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                    "max_frame_gap_ms_before_outage": round(max(gaps_before) * 1000, 1)
                    if gaps_before
                    else None,
                    # Each gap over GAP_REPORT_MS at the subscriber from the outage on, told apart: frames
                    # the sidecar never sent (frame ids skipped) or frames held up on the way (late on
                    # arrival), and whether this process's own event loop (which receives them) stalled.
                    "frame_gaps": gaps_seen,
                    "subscriber_loop_lag_ms_max": round(max(lag for _, lag in loop_lags) * 1000, 1),
                    "sidecar_counters_during": {
                        key: round(sidecar_after.get(key, 0.0) - sidecar_before.get(key, 0.0), 3)
                        for key in sorted(set(sidecar_before) | set(sidecar_after))
                    },
                    "phase_after": status.phase.value,
                    "sidecar_after": status.sidecar,
                    "same_sidecar": status.sidecar == sidecar_id,
                    "reconciles": status.reconciles,
                    "sidecar_losses": len(status.sidecar_losses),
                    "replacements": status.replacements,
                    "end_reason": result.end_reason.value,
                    # The machine's 1-min load average during the outage, sampled every 15 s.
                    "load_average_1min_during_outage": {
                        "min": min(load_1min),
                        "median": round(float(np.median(load_1min)), 2),
                        "max": max(load_1min),
                    },
                    **spoken,
                }
            finally:
                sidecars.stop_all()
    finally:
        if viewer is not None:
            await viewer.close()
        lk.stop()
        server.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--speech", action=argparse.BooleanOptionalAction, default=True, help="the session speaks all along"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        summary = asyncio.run(run(args.outage_s, Path(tmp), args.speech))
    document = {
        "benchmark": "chaos",
        "device": cpu_name(),
        "torch": None,
        "settings": {
            "engine": "preview",
            "fault": "Temporal dev server stopped, then started on the same database",
            "subscriber": "real livekit-server, RoomRecorder",
            "speech": (
                f"espeak-ng {SPEECH_TEXT!r} in a loop, {PAUSE_S:g} s pauses, into the sidecar's audio socket"
                if args.speech
                else "none: the session idles"
            ),
            "notes": args.notes,
        },
        "summary": {"temporal_outage_s_survived": summary["outage_s"], **summary},
        "results": [summary],
    }
    print(json.dumps(document["summary"], indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    ok = (
        summary["phase_after"] == "live"
        and summary["sidecar_losses"] == 0
        and summary["end_reason"] == "stopped"
        and (not args.speech or summary["utterances_during_outage"] > 0)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
