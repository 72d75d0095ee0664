"""Placement benchmark: session starts/ends against the real Temporal dev server, simulated sidecars.

    python -m bench.placement --json bench/results/placement-cpu-<yyyymmdd>.json
        [--sidecars 10 100 1000] [--rates 5 10 20 40 80 160 320] [--shards 1] [--level-s 10]

Deployment (all on 127.0.0.1, free ports, a temp dir, stopped at the end): a Temporal dev
server (in-memory), one registry worker in its own process (the production PlacementWorkflow
on a control queue, as `lipsync worker` runs it) and this driver process, which holds:

- N simulated sidecars: each refreshes its registration every `--registration-interval-s`
  exactly as `activities.sidecar_worker` does (signal-with-start of `heartbeat` to its
  registry), with `--slots` slots; no engine and no task-queue worker behind them, since
  placement never calls a sidecar;
- session traffic: for each offered rate of the ramp, starts at that rate for `--level-s`
  seconds; each start acquires a slot the way the `place_session` activity does (the same
  `activities.placement_client.Placer`), holds it `--hold-s`, then releases it as `release_slot` does.
  The starts are spread over `--control-workers` Placers, one per simulated control worker: each
  batches only its own requests (per registry, one operation in flight), as a `lipsync worker`
  replica does.

Per level: acquire latency p50/p99 (request sent -> placement returned), failures (any
acquire or release that raised, `no_capacity` included: the fleet has room for the offered
load by construction), achieved starts/s and updates/s (acquires + releases completed per
second of the level: the acquire is an update, the release an update before the registries
were sharded and a signal since), and each process role's CPU (server, registry workers,
driver) with the server's CPU per operation (acquire, release or heartbeat). A level is
sustained when acquire p99 <= `--p99-limit-ms` and nothing failed; the ramp stops after the
first level that is not. `updates_per_s_max` is the
achieved update rate of the best sustained level, counted in requests (acquires + releases);
the operations that carried them are `acquire_updates_per_s` and `release_signals_per_s`, and
`acquires_per_update` / `releases_per_signal` are the mean batch sizes. Heartbeats are reported
separately (`heartbeat_signals_per_s`), since they are signals, not updates. With
`--profile-histories`, the registries' histories are read after the ramp: events and workflow
tasks per request (`history_profile`).

The machine's load matters (the dev server, the registry worker and this driver share its
cores): the JSON records the load average before each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from activities.placement_client import Placer
from bench.machine import cpu_name
from bench.proc_cpu import pid_cpu_s
from infra import temporal
from infra.process import stop_process_group
from workflows.placement import PlacementWorkflow

logger = logging.getLogger("bench.placement")

DEFAULT_RATES = [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
ACQUIRE_TIMEOUT_S = 10.0


def _pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated between the closest ranks (numpy's default); stdlib only."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 1)


@dataclass
class LevelResult:
    offered_starts_per_s: float
    sidecars: int
    acquires_ok: int = 0
    releases_ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, str] = field(default_factory=dict)  # the first error of each kind
    acquire_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    heartbeats_sent: int = 0
    heartbeat_failures: int = 0
    placement_reasons: dict[str, int] = field(default_factory=dict)
    load_avg_1m_after: float = 0.0
    # operations the placers sent during the level and the requests they carried (Placer.batching)
    batching: dict[str, int] = field(default_factory=dict)
    # CPU seconds used during the level, per process role
    cpu_s: dict[str, float] = field(default_factory=dict)

    def fail(self, code: str, error: BaseException | None = None) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1
        if error is not None and code not in self.failure_examples:
            self.failure_examples[code] = f"{error.__class__.__name__}: {error}"[:300]

    def row(self, p99_limit_ms: float) -> dict[str, Any]:
        p99 = _pct(self.acquire_ms, 99)
        per_s = 1.0 / self.elapsed_s if self.elapsed_s else 0.0
        operations = self.acquires_ok + self.releases_ok + self.heartbeats_sent
        failed = sum(self.failures.values())
        return {
            "sidecars": self.sidecars,
            "offered_starts_per_s": self.offered_starts_per_s,
            "starts_per_s": round(self.acquires_ok * per_s, 1),
            "updates_per_s": round((self.acquires_ok + self.releases_ok) * per_s, 1),
            "acquire_ms_p50": _pct(self.acquire_ms, 50),
            "acquire_ms_p99": p99,
            "acquire_ms_max": round(max(self.acquire_ms), 1) if self.acquire_ms else None,
            "acquires_ok": self.acquires_ok,
            "releases_ok": self.releases_ok,
            "failures": dict(self.failures),
            "failure_examples": dict(self.failure_examples),
            "heartbeat_signals_per_s": round(self.heartbeats_sent * per_s, 1),
            "acquire_updates_per_s": round(self.batching.get("acquire_updates", 0) * per_s, 1),
            "release_signals_per_s": round(self.batching.get("release_signals", 0) * per_s, 1),
            "acquires_per_update": round(
                self.batching.get("acquire_requests", 0) / max(1, self.batching.get("acquire_updates", 0)), 2
            ),
            "releases_per_signal": round(
                self.batching.get("release_requests", 0) / max(1, self.batching.get("release_signals", 0)), 2
            ),
            # acquire updates sent again: same id after an unanswered attempt, or after a retryable refusal
            "update_rpc_resends": self.batching.get("update_rpc_resends", 0),
            "update_retries": self.batching.get("update_retries", 0),
            "heartbeat_failures": self.heartbeat_failures,
            "placement_reasons": dict(self.placement_reasons),
            "load_avg_1m_after": round(self.load_avg_1m_after, 2),
            "cpu_cores": {role: round(seconds * per_s, 3) for role, seconds in self.cpu_s.items()},
            # Server CPU per operation it handled (acquire updates, release and heartbeat signals).
            "server_cpu_ms_per_op": round(1000.0 * self.cpu_s.get("server", 0.0) / max(1, operations), 2),
            "sustained": failed == 0 and p99 is not None and p99 <= p99_limit_ms,
        }


class SimulatedFleet:
    """N sidecars' registrations, refreshed on the production schedule, from one event loop."""

    def __init__(self, placer: Any, count: int, *, slots: int, interval_s: float, lease_s: float) -> None:
        self._placer = placer
        self.count = count
        self.slots = slots
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.run_tag = uuid.uuid4().hex[:6]
        self.sent = 0
        self.failed = 0
        self._tasks: list[asyncio.Task[None]] = []

    def sidecar_id(self, index: int) -> str:
        return f"sim-{self.run_tag}-{index:04d}"

    async def start(self) -> None:
        """Register every sidecar once (spread over one interval), then keep refreshing in the background."""
        registered = asyncio.Event()
        remaining = [self.count]

        async def one(index: int) -> None:
            sidecar_id = self.sidecar_id(index)
            incarnation = uuid.uuid4().hex
            await asyncio.sleep(self.interval_s * index / self.count)
            first = True
            while True:
                try:
                    await self._placer.heartbeat(sidecar_id, incarnation, self.slots, self.lease_s)
                    self.sent += 1
                except Exception as exc:
                    self.failed += 1
                    logger.warning("heartbeat failed", extra={"sidecar": sidecar_id, "error": str(exc)})
                if first:
                    first = False
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        registered.set()
                await asyncio.sleep(self.interval_s)

        self._tasks = [asyncio.create_task(one(i)) for i in range(self.count)]
        await asyncio.wait_for(registered.wait(), timeout=self.interval_s + 120.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) each role's processes have used so far, from /proc (Linux)."""
    return {role: pid_cpu_s(role_pids) for role, role_pids in pids.items()}


def _batching(placers: list[Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for placer in placers:
        for key, value in placer.batching().items():
            total[key] = total.get(key, 0) + value
    return total


async def _run_level(
    placers: list[Any],
    fleet: SimulatedFleet,
    rate: float,
    *,
    level_s: float,
    hold_s: float,
    pids: dict[str, list[int]],
) -> LevelResult:
    result = LevelResult(offered_starts_per_s=rate, sidecars=fleet.count)
    tasks: list[asyncio.Task[None]] = []
    avatars = [f"avatar-{i:03d}" for i in range(50)]

    async def session(index: int) -> None:
        session_id = f"bench-{fleet.run_tag}-{rate:g}-{index}"
        # Sessions spread over the control workers as the control queue spreads place_session activities.
        placer = placers[index % len(placers)]
        started = time.perf_counter()
        try:
            placement = await asyncio.wait_for(
                placer.acquire(session_id, random.choice(avatars)), timeout=ACQUIRE_TIMEOUT_S
            )
        except Exception as exc:
            result.fail(_failure_code(exc), exc)
            return
        result.acquire_ms.append((time.perf_counter() - started) * 1000.0)
        result.acquires_ok += 1
        reason = getattr(placement, "reason", "") or "unspecified"
        result.placement_reasons[reason] = result.placement_reasons.get(reason, 0) + 1
        await asyncio.sleep(hold_s)
        try:
            await asyncio.wait_for(
                placer.release(session_id, placement.registry_id), timeout=ACQUIRE_TIMEOUT_S
            )
        except Exception as exc:
            result.fail("release_" + _failure_code(exc), exc)
            return
        result.releases_ok += 1

    sent_before, failed_before = fleet.sent, fleet.failed
    batching_before = _batching(placers)
    cpu_before = _cpu_seconds(pids)
    began = time.perf_counter()
    count = int(rate * level_s)
    for index in range(count):
        # Starts on a fixed schedule (open loop): a slow registry does not slow the offered load.
        delay = began + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(session(index)))
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - began
    result.heartbeats_sent = fleet.sent - sent_before
    result.heartbeat_failures = fleet.failed - failed_before
    result.load_avg_1m_after = os.getloadavg()[0]
    result.batching = {key: value - batching_before.get(key, 0) for key, value in _batching(placers).items()}
    cpu_after = _cpu_seconds(pids)
    result.cpu_s = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
    return result


def _failure_code(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    cause = getattr(exc, "cause", None)
    code = getattr(cause, "type", None) or getattr(exc, "type", None)
    return str(code) if code else exc.__class__.__name__


async def _bench_one(
    args: argparse.Namespace, target: str, sidecars: int, control_queue: str, pids: dict[str, list[int]]
) -> dict[str, Any]:

    client = await Client.connect(target)
    placement_id = f"bench-placement-{uuid.uuid4().hex[:6]}"
    # One Placer per simulated control worker (each batches only its own placements), and the fleet's own
    # for the sidecars' renewals (plain signals, never batched: each sidecar is its own process).
    placers = [
        Placer(client, placement_id, control_queue, shards=args.shards, max_batch=args.max_batch)
        for _ in range(args.control_workers)
    ]
    fleet = SimulatedFleet(
        Placer(client, placement_id, control_queue, shards=args.shards),
        sidecars,
        slots=args.slots,
        interval_s=args.registration_interval_s,
        lease_s=args.lease_s,
    )
    load_before = os.getloadavg()
    cpu_count = len(os.sched_getaffinity(0))
    registering = time.perf_counter()
    await fleet.start()
    register_s = time.perf_counter() - registering
    rows: list[dict[str, Any]] = []
    try:
        for rate in args.rates:
            level = await _run_level(
                placers, fleet, rate, level_s=args.level_s, hold_s=args.hold_s, pids=pids
            )
            row = level.row(args.p99_limit_ms)
            logger.info("level done", extra=row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            if not row["sustained"]:
                break
    finally:
        await fleet.stop()
        # Requests given up on by the ramp may still be in flight: let them end before the loop closes.
        await asyncio.gather(*(placer.wait_idle() for placer in placers))
    batching = _batching(placers)
    operations = {
        "acquires": batching.get("acquire_requests", 0),
        "releases": batching.get("release_requests", 0),
        "heartbeats": fleet.sent,
    }
    profile = await _history_profile(client, placement_id, operations) if args.profile_histories else None
    sustained = [row for row in rows if row["sustained"]]
    best = max(sustained, key=lambda row: row["updates_per_s"]) if sustained else None
    first_failing = next((row for row in rows if not row["sustained"]), None)
    return {
        "sidecars": sidecars,
        "shards": args.shards,
        "control_workers": args.control_workers,
        "load_avg_before": [round(value, 2) for value in load_before],
        "cpus": cpu_count,
        "register_s": round(register_s, 1),
        "starts_per_s_sustained": best["starts_per_s"] if best else 0.0,
        "updates_per_s_max": best["updates_per_s"] if best else 0.0,
        "acquire_ms_p50": best["acquire_ms_p50"] if best else None,
        "acquire_ms_p99": best["acquire_ms_p99"] if best else None,
        "breaks_at_offered_starts_per_s": first_failing["offered_starts_per_s"] if first_failing else None,
        "levels": rows,
        **({"history_profile": profile} if profile else {}),
    }


async def _history_profile(client: Client, placement_id: str, operations: dict[str, int]) -> dict[str, Any]:
    """What the registries' histories hold for the whole run: events and workflow tasks per request.

    Reads every run of every registry of `placement_id` (continue-as-new included) after the ramp.
    `operations` counts the requests the driver made (acquires, releases, heartbeats).
    """
    counts: dict[str, int] = {}
    runs = 0
    async for execution in client.list_workflows(f"WorkflowId STARTS_WITH '{placement_id}'"):
        runs += 1
        history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
        for event in history.events:
            name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
            counts[name] = counts.get(name, 0) + 1
    events = sum(counts.values())
    requests = sum(operations.values())
    workflow_tasks = counts.get("workflow_task_completed", 0)
    return {
        "registry_runs": runs,
        "events": events,
        "workflow_tasks": workflow_tasks,
        "requests": operations,
        "events_per_request": round(events / max(1, requests), 2),
        "workflow_tasks_per_request": round(workflow_tasks / max(1, requests), 3),
        "events_by_type": dict(sorted(counts.items(), key=lambda item: -item[1])),
    }


def _start_registry_worker(target: str, queue: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.placement", "--serve-registry", target, queue],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


async def _serve_registry(target: str, queue: str) -> None:
    """The registry worker process: the production PlacementWorkflow on `queue` (no sessions, no
    activities)."""

    client = await Client.connect(target)
    worker = Worker(client, task_queue=queue, workflows=[PlacementWorkflow], max_cached_workflows=10_000)
    await worker.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--sidecars", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--rates", type=float, nargs="+", default=DEFAULT_RATES, help="offered starts/s, ascending"
    )
    parser.add_argument("--level-s", type=float, default=10.0, help="seconds of traffic per rate level")
    parser.add_argument("--hold-s", type=float, default=0.5, help="how long each session holds its slot")
    parser.add_argument("--slots", type=int, default=20, help="slots per simulated sidecar")
    parser.add_argument("--shards", type=int, default=1, help="registry shards per pool")
    parser.add_argument(
        "--control-workers",
        type=int,
        default=1,
        help="simulated control workers: sessions spread over this many Placers, each batching its own",
    )
    parser.add_argument(
        "--max-batch", type=int, default=128, help="most requests per acquire update / release signal"
    )
    parser.add_argument(
        "--profile-histories",
        action="store_true",
        help="after the ramp, count the registries' history events and workflow tasks per request",
    )
    parser.add_argument(
        "--registry-workers",
        type=int,
        default=1,
        help="registry worker processes (replicas of `lipsync worker`)",
    )
    parser.add_argument("--registration-interval-s", type=float, default=5.0)
    parser.add_argument("--lease-s", type=float, default=15.0)
    parser.add_argument("--p99-limit-ms", type=float, default=500.0)
    parser.add_argument("--label", default="", help="e.g. before / after (recorded in settings)")
    parser.add_argument("--serve-registry", nargs=2, metavar=("TARGET", "QUEUE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve_registry:
        asyncio.run(_serve_registry(*args.serve_registry))
        return 0
    if args.rates != sorted(args.rates):
        parser.error("--rates must be ascending")

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server and workers

    signal.signal(signal.SIGTERM, stop_on_sigterm)

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        work = Path(tmp)
        for sidecars in args.sidecars:
            # A fresh server and worker per fleet size: one size's leftovers do not load the next.
            config = temporal.TemporalDevServerConfig().with_free_ports()
            server = temporal.dev_server_process(config, work / f"temporal-{sidecars}.log")
            server.start()
            queue = f"bench-control-{uuid.uuid4().hex[:6]}"
            workers = [
                _start_registry_worker(config.target, queue, work / f"worker-{sidecars}-{index}.log")
                for index in range(args.registry_workers)
            ]
            pids = {
                "server": [server.pid or 0],
                "registry_workers": [worker.pid for worker in workers],
                "driver": [os.getpid()],
            }
            try:
                runs.append(asyncio.run(_bench_one(args, config.target, sidecars, queue, pids)))
            finally:
                for worker in workers:
                    stop_process_group(worker.pid)
                    worker.wait(timeout=10)
                server.stop()
    largest = max(runs, key=lambda run: run["sidecars"])
    document = {
        "benchmark": "placement",
        "device": cpu_name(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {
            "label": args.label,
            "shards": args.shards,
            "registry_workers": args.registry_workers,
            "control_workers": args.control_workers,
            "max_batch": args.max_batch,
            "slots_per_sidecar": args.slots,
            "registration_interval_s": args.registration_interval_s,
            "lease_s": args.lease_s,
            "level_s": args.level_s,
            "hold_s": args.hold_s,
            "rates": args.rates,
            "p99_limit_ms": args.p99_limit_ms,
            "server": "temporal dev server (in-memory SQLite), registry worker in its own process",
        },
        "summary": {
            "sidecars": largest["sidecars"],
            "starts_per_s_sustained": largest["starts_per_s_sustained"],
            "acquire_ms_p50": largest["acquire_ms_p50"],
            "acquire_ms_p99": largest["acquire_ms_p99"],
            "updates_per_s_max": largest["updates_per_s_max"],
            "by_sidecars": {
                str(run["sidecars"]): {
                    key: run[key]
                    for key in (
                        "starts_per_s_sustained",
                        "updates_per_s_max",
                        "acquire_ms_p50",
                        "acquire_ms_p99",
                        "breaks_at_offered_starts_per_s",
                    )
                }
                for run in runs
            },
        },
        "results": runs,
    }
    text = json.dumps(document, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
