"""Where a slow acquire's time goes: each acquire update lined up with its registry's history.

    python -m bench.placement_trace --json /tmp/placement-trace.json
        [--sidecars 1000] [--shards 4] [--control-workers 4] [--rate 20] [--level-s 20] [--slow-ms 300]

The deployment of `bench.placement` (dev server, one registry worker process, simulated sidecars renewing
every `--registration-interval-s`, session traffic through the production `Placer`), one level at one
rate. A client interceptor gives every acquire update RPC attempt an id and records when it was sent and
when it returned (and its error); after the level every run of every registry is read back and each slow
or failed attempt (> `--slow-ms`) is placed against its registry's history (`slow_update_calls`):

- `run_index` / `accepted_in_first_task_of_run`: which run accepted it, and whether in that run's first task;
- `sent_before_previous_run_closed_ms`: sent while the run before was still open, this long before it
  continued as new (0: sent after);
- `refused_tasks_in_window`: refused workflow tasks between sending and acceptance;
- `task_scheduled_after_sent_ms`, `task_schedule_to_start_ms`, `task_start_to_end_ms`: the workflow task
  that accepted it; `completed_to_returned_ms`: from its completion event to the client's answer.

Per registry (`registries`): runs, workflow tasks, refused tasks, task latencies, the continue-as-new task
and each new run's first task, and per refused task the task after it (the worker's replay of the run).
`replay_ms_by_run_events`: what replaying each run costs in this process (events, ms). Not a throughput
benchmark (`bench.placement` is): a tool to attribute the tail of one level.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowUpdateInput,
    WorkflowHistory,
    WorkflowUpdateHandle,
)
from temporalio.worker import Replayer

from activities.placement_client import Placer
from bench.machine import cpu_name
from bench.placement import SimulatedFleet, _pct, _start_registry_worker
from infra import temporal
from infra.process import stop_process_group
from workflows.placement import PlacementWorkflow

logger = logging.getLogger("bench.placement_trace")


@dataclass
class UpdateCall:
    workflow_id: str
    update_id: str
    sent_s: float  # wall clock, s since the epoch (the server's event times are on the same host clock)
    returned_s: float = 0.0
    error: str = ""


@dataclass
class Recorder:
    calls: list[UpdateCall] = field(default_factory=list)


class _RecordingOutbound(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, recorder: Recorder) -> None:
        super().__init__(next)
        self._recorder = recorder

    async def start_workflow_update(self, input: StartWorkflowUpdateInput) -> WorkflowUpdateHandle[Any]:
        input.update_id = input.update_id or uuid.uuid4().hex
        call = UpdateCall(workflow_id=input.id, update_id=input.update_id, sent_s=time.time())
        self._recorder.calls.append(call)
        try:
            return await self.next.start_workflow_update(input)
        except BaseException as exc:
            call.error = f"{exc.__class__.__name__}: {exc}"[:200]
            raise
        finally:
            call.returned_s = time.time()


class RecordingInterceptor(Interceptor):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _RecordingOutbound(next, self.recorder)


@dataclass
class RunEvents:
    run_id: str
    started_s: float
    closed_s: float | None  # continue-as-new (or other close) time
    # (scheduled_s, started_s, ended_s, outcome) per workflow task
    tasks: list[tuple[float, float, float, str]]
    accepted: dict[str, tuple[float, int]]  # update id -> (accepted event time, index of its task)
    completed: dict[str, float]


def _ms(seconds: float) -> float:
    return round(1000.0 * seconds, 1)


def _t(event: Any) -> float:
    return float(event.event_time.ToMicroseconds()) / 1e6


async def _histories(client: Client, placement_id: str) -> list[tuple[str, WorkflowHistory]]:
    """(run id, history) of every run of every registry of this placement id, read once (the attribution and
    the replay timing both use them)."""
    return [
        (
            execution.run_id,
            await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history(),
        )
        async for execution in client.list_workflows(f"WorkflowId STARTS_WITH '{placement_id}'")
    ]


def _read_runs(histories: list[tuple[str, WorkflowHistory]]) -> dict[str, list[RunEvents]]:
    runs: dict[str, list[RunEvents]] = {}
    for run_id, history in histories:
        events = history.events
        tasks: list[tuple[float, float, float, str]] = []
        scheduled_s = started_s = 0.0
        accepted: dict[str, tuple[float, int]] = {}
        completed: dict[str, float] = {}
        closed_s: float | None = None
        for event in events:
            kind = event.event_type
            if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                scheduled_s = _t(event)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                started_s = _t(event)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                tasks.append((scheduled_s, started_s, _t(event), "completed"))
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                cause = WorkflowTaskFailedCause.Name(event.workflow_task_failed_event_attributes.cause)
                tasks.append(
                    (scheduled_s, started_s, _t(event), cause.removeprefix("WORKFLOW_TASK_FAILED_CAUSE_"))
                )
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                tasks.append((scheduled_s, started_s, _t(event), "timed_out"))
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
                update_id = (
                    event.workflow_execution_update_accepted_event_attributes.accepted_request.meta.update_id
                )
                accepted[update_id] = (_t(event), len(tasks) - 1)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
                completed[event.workflow_execution_update_completed_event_attributes.meta.update_id] = _t(
                    event
                )
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                closed_s = _t(event)
        runs.setdefault(history.workflow_id, []).append(
            RunEvents(
                run_id=run_id,
                started_s=_t(events[0]),
                closed_s=closed_s,
                tasks=tasks,
                accepted=accepted,
                completed=completed,
            )
        )
    for registry_runs in runs.values():
        registry_runs.sort(key=lambda run: run.started_s)
    return runs


def _attribute(call: UpdateCall, registry_runs: list[RunEvents]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "registry": call.workflow_id,
        "update_ms": _ms(call.returned_s - call.sent_s),
        "error": call.error,
    }
    for index, run in enumerate(registry_runs):
        if call.update_id not in run.accepted:
            continue
        accepted_s, task_index = run.accepted[call.update_id]
        scheduled_s, started_s, ended_s, _ = run.tasks[task_index]
        row["run_index"] = index
        row["accepted_in_first_task_of_run"] = task_index == 0
        previous = registry_runs[index - 1] if index > 0 else None
        row["sent_before_previous_run_closed_ms"] = (
            _ms(previous.closed_s - call.sent_s)
            if previous is not None and previous.closed_s is not None and previous.closed_s > call.sent_s
            else 0.0
        )
        # Refused tasks of this run (or the previous) in the update's window.
        row["refused_tasks_in_window"] = sum(
            1
            for candidate in registry_runs[max(0, index - 1) : index + 1]
            for task in candidate.tasks
            if task[3] != "completed" and call.sent_s <= task[2] <= accepted_s
        )
        row["task_scheduled_after_sent_ms"] = _ms(scheduled_s - call.sent_s)
        row["task_schedule_to_start_ms"] = _ms(started_s - scheduled_s)
        row["task_start_to_end_ms"] = _ms(ended_s - started_s)
        row["completed_to_returned_ms"] = _ms(call.returned_s - run.completed.get(call.update_id, accepted_s))
        return row
    row["accepted"] = False
    return row


async def _replay_times(histories: list[tuple[str, WorkflowHistory]]) -> list[tuple[int, float]]:
    """(events, ms) to replay each closed registry run in this process: what a worker pays after a refused
    continue-as-new (it drops the run from its cache and replays it for the next task)."""
    replayer = Replayer(workflows=[PlacementWorkflow])
    times: list[tuple[int, float]] = []
    for _, history in histories:
        began = time.perf_counter()
        await replayer.replay_workflow(history)
        times.append((len(history.events), round(1000.0 * (time.perf_counter() - began), 1)))
    return sorted(times)


def _registry_summary(registry_runs: list[RunEvents], slow_s: float) -> dict[str, Any]:
    tasks = [task for run in registry_runs for task in run.tasks]
    schedule_to_start = [task[1] - task[0] for task in tasks]
    start_to_end = [task[2] - task[1] for task in tasks]
    gaps = [
        round(1000.0 * (nxt.tasks[0][1] - run.closed_s), 1)
        for run, nxt in itertools.pairwise(registry_runs)
        if run.closed_s is not None and nxt.tasks
    ]
    return {
        "runs": len(registry_runs),
        "workflow_tasks": len(tasks),
        "refused_tasks": sum(1 for task in tasks if task[3] != "completed"),
        "schedule_to_start_ms_p50_p99_max": [
            _pct([1000 * v for v in schedule_to_start], 50),
            _pct([1000 * v for v in schedule_to_start], 99),
            round(1000 * max(schedule_to_start, default=0.0), 1),
        ],
        "start_to_end_ms_p50_p99_max": [
            _pct([1000 * v for v in start_to_end], 50),
            _pct([1000 * v for v in start_to_end], 99),
            round(1000 * max(start_to_end, default=0.0), 1),
        ],
        "slow_tasks": sum(1 for a, b in zip(schedule_to_start, start_to_end, strict=True) if a + b > slow_s),
        "close_to_next_run_first_task_started_ms": gaps,
        # per refused task: (its start-to-end, the next task's schedule-to-start and start-to-end), ms
        "refused_then_next_task_ms": [
            [_ms(t[2] - t[1]), _ms(n[1] - n[0]), _ms(n[2] - n[1])]
            for run in registry_runs
            for t, n in itertools.pairwise(run.tasks)
            if t[3] != "completed"
        ],
        # the continue-as-new task itself (last of each closed run): schedule-to-start, start-to-end, ms
        "continue_as_new_task_ms": [
            [_ms(run.tasks[-1][1] - run.tasks[-1][0]), _ms(run.tasks[-1][2] - run.tasks[-1][1])]
            for run in registry_runs
            if run.closed_s is not None and run.tasks
        ],
        "first_task_of_run_schedule_to_start_ms": [
            round(1000.0 * (run.tasks[0][1] - run.tasks[0][0]), 1) for run in registry_runs[1:] if run.tasks
        ],
        "first_task_of_run_start_to_end_ms": [
            round(1000.0 * (run.tasks[0][2] - run.tasks[0][1]), 1) for run in registry_runs[1:] if run.tasks
        ],
    }


async def _trace(args: argparse.Namespace, target: str, queue: str) -> dict[str, Any]:
    recorder = Recorder()
    client = await Client.connect(target, interceptors=[RecordingInterceptor(recorder)])
    placement_id = f"trace-placement-{uuid.uuid4().hex[:6]}"
    placers = [Placer(client, placement_id, queue, shards=args.shards) for _ in range(args.control_workers)]
    fleet = SimulatedFleet(
        Placer(client, placement_id, queue, shards=args.shards),
        args.sidecars,
        slots=20,
        interval_s=args.registration_interval_s,
        lease_s=args.lease_s,
    )
    load_before = os.getloadavg()
    await fleet.start()
    acquires: list[dict[str, float]] = []
    began = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def session(index: int) -> None:
        session_id = f"trace-{index}"
        placer = placers[index % len(placers)]
        started_s = time.time()
        placement = await asyncio.wait_for(placer.acquire(session_id, f"avatar-{index % 50:03d}"), 10.0)
        acquires.append({"started_s": started_s, "ms": 1000.0 * (time.time() - started_s)})
        await asyncio.sleep(0.5)
        await placer.release(session_id, placement.registry_id)

    count = int(args.rate * args.level_s)
    for index in range(count):
        delay = began + index / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(session(index)))
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    load_after = os.getloadavg()
    await fleet.stop()
    await asyncio.gather(*(placer.wait_idle() for placer in placers))
    histories = await _histories(client, placement_id)
    runs = _read_runs(histories)
    replay_ms = await _replay_times(histories)
    slow_s = args.slow_ms / 1000.0
    slow_calls = [call for call in recorder.calls if call.returned_s - call.sent_s > slow_s or call.error]
    acquire_ms = [a["ms"] for a in acquires]
    return {
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in load_after],
        "acquires": len(acquires),
        "failures": [repr(o)[:200] for o in outcomes if isinstance(o, BaseException)],
        "acquire_ms_p50_p99_max": [_pct(acquire_ms, 50), _pct(acquire_ms, 99), round(max(acquire_ms), 1)],
        "slow_acquires": sum(1 for ms in acquire_ms if ms > args.slow_ms),
        "update_calls": len(recorder.calls),
        "placer_counters": {
            key: sum(placer.batching()[key] for placer in placers) for key in placers[0].batching()
        },
        "slow_update_calls": [_attribute(call, runs.get(call.workflow_id, [])) for call in slow_calls],
        "replay_ms_by_run_events": replay_ms,
        "registries": {registry: _registry_summary(rs, slow_s) for registry, rs in sorted(runs.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sidecars", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--control-workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--level-s", type=float, default=30.0)
    parser.add_argument("--registration-interval-s", type=float, default=20.0)
    parser.add_argument("--lease-s", type=float, default=60.0)
    parser.add_argument("--slow-ms", type=float, default=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-placement-trace-") as tmp:
        work = Path(tmp)
        config = temporal.TemporalDevServerConfig().with_free_ports()
        server = temporal.dev_server_process(config, work / "temporal.log")
        server.start()
        queue = f"trace-control-{uuid.uuid4().hex[:6]}"
        worker = _start_registry_worker(config.target, queue, work / "worker.log")
        try:
            result = asyncio.run(_trace(args, config.target, queue))
        finally:
            stop_process_group(worker.pid)
            worker.wait(timeout=10)
            server.stop()
    document = {
        "benchmark": "placement_trace",
        "device": cpu_name(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {key: value for key, value in vars(args).items() if key != "json"},
        "result": result,
    }
    text = json.dumps(document, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
