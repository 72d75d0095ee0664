"""Lane policy bench: TTFF and dropped frames of many sessions on one render lane, on the CPU, with a GPU's
batch times.

    python -m bench.lane_policy --json bench/results/lane-policy-cpu-<yyyymmdd>.json \
        [--sessions 8,16,20] [--client-start lockstep,staggered] [--seeds 1,2,3]

It runs the real `SessionRuntime`s and `RenderLane` of a sidecar against an engine whose batches only take a
known time per bucket (`tests/support/lane_sim.py`), with `bench.sessions`' client: each session streams
`--utterance-s` utterances at real-time pace, the first `--burst-s` of each at once, `--gap-s` apart, all
sessions together (`lockstep`) or each at its own phase (`staggered`). What it measures is the sidecar's
planning and batching (how long a lead each utterance gets, which frames ride which batch), not a device:
a change to those rules can be judged here before a GPU run confirms it.

Each row has two TTFFs: `ttff_ms_*` over every utterance, and `turn_ttff_ms_*` over those that started a
turn (their session idle when they were planned), the delay a caller hears. With `--gap-s` shorter than the
burst plus a lead, each utterance arrives while the last one still plays and waits for its end (sentences
of one answer, as the earlier rows ran); with `--gap-s 1.5` every utterance starts a turn.

The batch times default to an H200's at 512x512 (`bench/results/sessions-512-h200-20261205.json`, the
20-session level that held: the lane's measured wall time per bucket), scaled by `--cost-scale`. Those are
whole batch times, host work included, which a pipelined lane partly overlaps with the next batch's device
time; at 0.8 the simulation reproduces that level (TTFF p50 / p99 296 / 372 ms against 346 / 393 measured,
0 dropped frames in both, mean batch 55.6 against 54.9 frames), while at 1.0 it drops hundreds of frames
that the GPU did not. So 0.8 is the default.

`--engine-heap full-size` builds the full-size models on the CPU first and holds them through the run: a
sidecar's heap (about 480,000 Python objects), whose full collections stop the event loop for 0.2-0.35 s on
this 2-core machine unless it is frozen (`realtime.heap`, as the sidecar does after its warm-up;
`--no-gc-freeze` leaves it unfrozen). Each row then has the collector's long pauses and the sessions' clock
resyncs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import cpu_name
from bench.sessions import GAP_S, UTTERANCE_S, client_cycle_s, client_start_delays_s, pct
from realtime.heap import GcPauses, freeze_long_lived
from realtime.sidecar.config import RuntimeConfig
from tests.support.lane_sim import simulate

# bench/results/sessions-512-h200-20261205.json, earlier_runs[0] ("call 5"), 20 sessions: 0 dropped frames.
H200_512_BATCH_MS = {1: 8.77, 2: 12.59, 4: 17.35, 8: 25.29, 16: 40.46, 32: 68.67, 48: 99.94, 64: 136.77}
DEFAULT_COST_SCALE = 0.8  # see the module docstring
BURST_S = 0.6


async def run_one(
    sessions: int, client_start: str, seed: int, cost_ms: dict[int, float], args: argparse.Namespace
) -> dict[str, Any]:
    delays_s = client_start_delays_s(
        client_start,
        sessions,
        random.Random(seed),
        cycle_s=client_cycle_s(args.burst_s, args.gap_s, args.utterance_s),
    )
    started = time.monotonic()
    with GcPauses() as gc_pauses:
        result = await simulate(
            sessions,
            cost_ms,
            RuntimeConfig(first_frame_wait_ticks=args.first_frame_wait_ticks),
            duration_s=args.duration_s,
            utterance_s=args.utterance_s,
            gap_s=args.gap_s,
            max_batch_frames=args.max_batch_frames,
            seed=seed,
            pipelined=True,
            burst_s=args.burst_s,
            client_delays_s=delays_s,
            device_jitter=args.jitter,
        )
    return {
        "sessions": sessions,
        "client_start": client_start,
        "seed": seed,
        "ttff_ms": [round(v, 1) for v in result.ttff_ms],
        "ttff_ms_p50": pct(result.ttff_ms, 50),
        "ttff_ms_p99": pct(result.ttff_ms, 99),
        "turn_ttff_ms": [round(v, 1) for v in result.turn_ttff_ms],
        "turn_ttff_ms_p50": pct(result.turn_ttff_ms, 50),
        "turn_ttff_ms_p99": pct(result.turn_ttff_ms, 99),
        "first_leads_ms": [round(v, 1) for v in result.planned_budget_ms],
        "dropped_frames": result.dropped_frames,
        "dropped_frame_indices": sorted(result.miss_frame_indices),
        "speech_frames": result.speech_frames,
        "utterance_start_deferred_ticks": result.deferred_ticks,
        "first_frame_wait_ticks": result.first_frame_wait_ticks,
        "lane_batches": result.lane_batches,
        "lane_mean_batch_frames": round(result.lane_mean_batch_frames, 2),
        "first_frames_jumped": result.first_frames_jumped,
        "clock_resyncs": result.clock_resyncs,
        # (s from the run's start, generation, ms) of each collection of 10 ms or more
        "gc_long_pauses": [pause.as_row(started) for pause in gc_pauses.stats().long_pauses],
        "wall_s": round(time.monotonic() - started, 1),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per client start and session count, over the seeds: TTFF percentiles of every utterance, drops."""
    summary: dict[str, Any] = {}
    for row in rows:
        key = f"{row['client_start']}_{row['sessions']}"
        entry = summary.setdefault(
            key,
            {
                "ttff_ms": [],
                "turn_ttff_ms": [],
                "dropped_frames": 0,
                "deferred_ticks": 0,
                "wait_ticks": 0,
                "runs": 0,
                "resyncs": 0,
                "gc_ms": [],
            },
        )
        entry["wait_ticks"] += row.get("first_frame_wait_ticks", 0)
        entry["ttff_ms"].extend(row["ttff_ms"])
        entry["turn_ttff_ms"].extend(row["turn_ttff_ms"])
        entry["resyncs"] += row["clock_resyncs"]
        entry["gc_ms"].extend(pause[2] for pause in row["gc_long_pauses"])
        entry["dropped_frames"] += row["dropped_frames"]
        entry["deferred_ticks"] += row["utterance_start_deferred_ticks"]
        entry["runs"] += 1
    return {
        key: {
            "ttff_ms_p50": pct(entry["ttff_ms"], 50),
            "ttff_ms_p99": pct(entry["ttff_ms"], 99),
            "utterances": len(entry["ttff_ms"]),
            # the TTFF a caller hears: utterances that started a turn (see bench.sessions' turn_ttff_ms_*)
            "turn_ttff_ms_p50": pct(entry["turn_ttff_ms"], 50),
            "turn_ttff_ms_p99": pct(entry["turn_ttff_ms"], 99),
            "turn_utterances": len(entry["turn_ttff_ms"]),
            "dropped_frames": entry["dropped_frames"],
            "utterance_start_deferred_ticks": entry["deferred_ticks"],
            "first_frame_wait_ticks": entry["wait_ticks"],
            "clock_resyncs": entry["resyncs"],
            "gc_long_pauses": len(entry["gc_ms"]),
            "gc_pause_ms_max": max(entry["gc_ms"], default=0.0),
            "runs": entry["runs"],
        }
        for key, entry in summary.items()
    }


def hold_engine_heap(kind: str) -> Any:
    """What `--engine-heap` asks for: None, or the full-size models built on the CPU (returned so the caller
    holds them)."""
    if kind == "none":
        return None
    from realtime.engine.device import choose_device  # noqa: PLC0415 (heavy: torch)
    from realtime.engine.musetalk.weights.random import random_models  # noqa: PLC0415

    return random_models("full", choose_device("cpu", "auto"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cost_ms = {bucket: ms * args.cost_scale for bucket, ms in H200_512_BATCH_MS.items()}
    _held = hold_engine_heap(args.engine_heap)  # alive (a local) until the run returns
    frozen = freeze_long_lived(collect_first=True) if args.gc_freeze else None
    rows = []
    for sessions in args.sessions:
        for client_start in args.client_start:
            for seed in args.seeds:
                row = await run_one(sessions, client_start, seed, cost_ms, args)
                print(
                    f"{client_start} {sessions} seed {seed}: TTFF p50 {row['ttff_ms_p50']} / p99 "
                    f"{row['ttff_ms_p99']} ms, {row['dropped_frames']} dropped, "
                    f"{row['clock_resyncs']} resyncs, collector pauses {row['gc_long_pauses']}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
    return {
        "benchmark": "lane_policy",
        "device": cpu_name(),
        "settings": {
            "batch_ms_by_bucket": {str(b): round(ms, 2) for b, ms in cost_ms.items()},
            "cost_source": "H200 512x512, bench/results/sessions-512-h200-20261205.json (20 sessions held)",
            "cost_scale": args.cost_scale,
            "device_jitter": args.jitter,
            "max_batch_frames": args.max_batch_frames,
            "duration_s": args.duration_s,
            "utterance_s": args.utterance_s,
            "gap_s": args.gap_s,
            "burst_s": args.burst_s,
            "pipelined": True,
            "runtime_config": "RuntimeConfig() defaults but first_frame_wait_ticks",
            "first_frame_wait_ticks": args.first_frame_wait_ticks,
            "engine_heap": args.engine_heap,
            "gc_freeze": args.gc_freeze,
            "gc_frozen_objects": frozen.frozen_objects if frozen else 0,
            "command": " ".join(["python -m bench.lane_policy", *sys.argv[1:]]),
            "notes": args.notes,
        },
        "summary": summarise(rows),
        "results": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--sessions", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 20])
    parser.add_argument(
        "--client-start", type=lambda s: s.split(","), default=["lockstep", "staggered"], help="comma list"
    )
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--cost-scale", type=float, default=DEFAULT_COST_SCALE)
    parser.add_argument("--max-batch-frames", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--utterance-s", type=float, default=UTTERANCE_S)
    parser.add_argument("--gap-s", type=float, default=GAP_S)
    parser.add_argument("--burst-s", type=float, default=BURST_S)
    parser.add_argument(
        "--first-frame-wait-ticks",
        type=int,
        default=RuntimeConfig().first_frame_wait_ticks,
        help="RuntimeConfig.first_frame_wait_ticks (0: a late frame 0 is dropped, as before it existed)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="each batch's device time varies uniformly by up to this fraction (a GPU's: 0.1-0.2)",
    )
    parser.add_argument(
        "--engine-heap",
        choices=("none", "full-size"),
        default="none",
        help="full-size: hold the full-size models built on the CPU (a sidecar's heap) through the run",
    )
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave the heap in the collector's full scans (the sidecar freezes it after warm-up)",
    )
    parser.add_argument("--notes", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    document = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
