"""API benchmark: N sessions started concurrently through the HTTP API on a real local deployment.

    python -m bench.api --sessions 50 --json bench/results/api-cpu-<yyyymmdd>.json
        [--sidecars 2] [--slots 4] [--engine preview] [--place-timeout-s 20] [--settle-timeout-s 120]

Deployment (all on 127.0.0.1, free ports, a temp dir, stopped at the end): the embedded stack
(Temporal dev server, livekit-server, nginx-rtmp), one `lipsync worker`, `--sidecars` ×
`lipsync sidecar --slots S` and one `lipsync api`, as separate processes (so the API's latency
is its own, not shared with the engine's event loop). The avatar (the demo's astronaut) is
served by a loopback server that the policy allow-lists.

Measured:
- `start_*_ms`: latency of each `POST /v1/sessions` while N are sent at once (p50/p99/max);
- every session is then followed (GET /v1/sessions/{id}, whose latency is also reported) until
  it is `live` or has ended with an error code — "a clear failure". Sessions beyond the
  sidecars' total slots wait for a slot (place_session retries) up to `--place-timeout-s`
  and then fail: `no_capacity` when the last retry says so, `activity_timeout` when
  place_session's schedule-to-close ends the wait first (the workflow's classification);
- `time_to_live_*_ms`: POST sent -> status first seen `live` (each client polls once a second);
- then every session is stopped (`POST .../stop`, latency reported) and followed to its end.

`sessions_unsettled` (neither live nor failed with a code within `--settle-timeout-s`) must be 0.

Start -> live (`--start-live 1 20 --rounds 5`), with a cached avatar: one session first brings the
avatar into every cache it has (fetch store, sidecar avatar cache), then for each concurrency C,
`--rounds` times: C sessions are started at once, each client opens its `audio_ws_url` right after
the 201 and waits for the sidecar's `ready` message (the moment a caller may stream: what "live"
means to a client), then all are stopped and followed to their end before the next round.
Reported per C: `start_to_ready_*_ms` (POST sent -> `ready` received, p50/p99/max) and the
lifecycle's steps from each session's Temporal history (`steps`): for each activity, the time
from the previous step's end to its completion (`total_ms`: the step's cost on the critical
path), split into `gap_ms` (previous end -> scheduled: the workflow task between), `queue_ms`
(scheduled -> started: worker pickup) and `run_ms` (started -> completed; a local activity has no
split); `api_to_workflow_ms` (POST sent -> workflow started), `to_run_scheduled_ms` (last
bring-up step done -> run_session scheduled, i.e. phase live), `run_pickup_ms` (run_session
scheduled -> started on the sidecar), `relay_ms` (run_session started -> `ready` at the client;
negative when `ready` came first) and `ready_after_bring_up_ms` (last bring-up step done -> `ready`).
Who burns the cores (`cpu`): each process group's CPU seconds (/proc) per start during the rounds'
bring-up, its cores per live idle session (sampled `LIVE_SAMPLE_S` after each round's last `ready`),
and what a start costs beyond the live sessions' share (`start_cpu_s_per_start`: the CPU floor of a
start); `workflow_task_troubles` counts workflow tasks that timed out or failed, by the step before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets
from temporalio.api.enums.v1 import EventType, TaskQueueKind, TimeoutType, WorkflowTaskFailedCause
from temporalio.client import Client

from bench.machine import cpu_name
from bench.proc_cpu import cpu_delta_s, group_cpu_s, thread_cpu_s
from infra import stack
from infra.demo import avatar_zip_bytes, demo_policies, serve_directory
from infra.paths import PROJECT_ROOT
from infra.process import ManagedProcess, free_port, http_ok, wait_until
from realtime.engine.registry import engine_choices
from workflows.client import session_workflow_id

logger = logging.getLogger("bench.api")

SIDECAR_PREFIX = "bench-sidecar-"  # the sidecars' process names (Deployment)
# After the last `ready` of a round, how long its live sessions are sampled for their idle CPU cost.
LIVE_SAMPLE_S = 2.0
POLL_S = 1.0  # how often each simulated client polls its session (a realistic client, not a load test)
TERMINAL = {"completed", "failed", "cancelled"}
# The bring-up steps in lifecycle order; a step missing from a history (e.g. skipped) costs nothing.
BRING_UP_STEPS = (
    "fetch_assets",
    "validate_assets",
    "place_session",
    "prepare_avatar",
    "warm_up",
    "open_output",
)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class Deployment:
    """The processes of a local deployment on free ports (what `lipsync demo` runs, with N sidecars)."""

    def __init__(
        self, work_dir: Path, sidecars: int, slots: int, engine: str, place_timeout_s: float
    ) -> None:
        self.work_dir = work_dir
        self.sidecar_count = sidecars
        self.slots = slots
        self.engine = engine
        self.place_timeout_s = place_timeout_s
        self.ports = stack.StackPorts.free()
        self.stack_dir = work_dir / "stack"
        self.api_port = free_port()
        self.sidecar_ports = {f"{SIDECAR_PREFIX}{i}": free_port() for i in range(sidecars)}
        self.sidecar_secret = secrets.token_hex(32)  # shared by this deployment's API and sidecars
        self.api_key = "bench-" + secrets.token_hex(8)
        self.admin_key = "bench-admin-" + secrets.token_hex(8)  # /metrics is admin-only
        self.processes: list[Any] = []
        self.stack_up = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        policies = demo_policies(
            self.work_dir,
            {
                # Waiting for a slot ends after this long with no_capacity (the "clear failure").
                "activities.place_session.schedule_to_close_s": self.place_timeout_s,
                "activities.place_session.start_to_close_s": min(5.0, self.place_timeout_s),
                "activities.place_session.retry.maximum_interval_s": 2.0,
            },
        )
        return {
            **stack.service_env(self.ports),
            "LIPSYNC_API_KEYS": self.api_key,
            "LIPSYNC_ADMIN_KEYS": self.admin_key,
            "LIPSYNC_SIDECAR_URLS": ",".join(
                f"{sid}=http://127.0.0.1:{port}" for sid, port in self.sidecar_ports.items()
            ),
            "LIPSYNC_SIDECAR_SECRET": self.sidecar_secret,
            "LIPSYNC_POLICIES": str(policies),
            "LIPSYNC_PUBLIC_BASE_URL": self.api_url,
            "LIPSYNC_TRACE_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        stack.up(self.ports, self.stack_dir)
        self.stack_up = True
        env = self.env()
        lipsync = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING"]
        temporal = f"127.0.0.1:{self.ports.temporal}"

        def launch(name: str, argv: list[str], health: Any, timeout_s: float = 90.0) -> None:
            process = ManagedProcess(
                name=name,
                argv=argv,
                log_path=self.work_dir / "logs" / f"{name}.log",
                health=health,
                cwd=PROJECT_ROOT,
                env=env,
                startup_timeout_s=timeout_s,
            )
            self.processes.append(process)
            process.start()

        started = time.monotonic()
        launch(
            "worker",
            [
                *lipsync,
                "worker",
                "--temporal-address",
                temporal,
                "--asset-dir",
                str(self.work_dir / "worker-assets"),
            ],
            lambda: time.monotonic() - started > 2.0,
        )
        for sidecar_id, port in self.sidecar_ports.items():
            launch(
                sidecar_id,
                [
                    *lipsync,
                    "sidecar",
                    "--port",
                    str(port),
                    "--engine",
                    self.engine,
                    "--sidecar-id",
                    sidecar_id,
                    "--slots",
                    str(self.slots),
                    "--temporal-address",
                    temporal,
                    "--asset-dir",
                    str(self.work_dir / f"{sidecar_id}-assets"),
                    "--cache-dir",
                    str(self.work_dir / f"{sidecar_id}-cache"),
                ],
                lambda port=port: http_ok(f"http://127.0.0.1:{port}/healthz"),
            )
        launch(
            "api", [*lipsync, "api", "--port", str(self.api_port)], lambda: http_ok(f"{self.api_url}/healthz")
        )
        if not wait_until(lambda: http_ok(f"{self.api_url}/readyz", timeout_s=6.0), 120.0, 0.5):
            raise RuntimeError(f"the API never became ready; logs in {self.work_dir / 'logs'}")

    def process_groups(self) -> dict[str, int]:
        """Each service's process group (`name -> pgid`), for CPU accounting: the stack's and ours."""
        state = stack.StackState.load(self.stack_dir)
        groups = dict(state.pids) if state is not None else {}
        groups.update({process.name: process.pid for process in self.processes if process.pid is not None})
        return groups

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as exc:  # keep stopping the others
                logger.warning("stop failed: %s", exc)
        if self.stack_up:
            stack.down(self.stack_dir)


async def run_sessions(
    deployment: Deployment, sessions: int, settle_timeout_s: float, avatar_url: str
) -> dict[str, Any]:
    headers = {"X-API-Key": deployment.api_key}
    limits = httpx.Limits(max_connections=sessions + 10, max_keepalive_connections=sessions + 10)
    status_ms: list[float] = []
    async with httpx.AsyncClient(
        base_url=deployment.api_url, headers=headers, timeout=60, limits=limits
    ) as http:

        async def start(index: int) -> dict[str, Any]:
            body = {
                "session_id": f"bench-{index:03d}-{secrets.token_hex(3)}",
                "avatar": {"frames_zip_url": avatar_url},
                "output": {"livekit": {"room": f"bench-room-{index:03d}"}},
            }
            sent = time.perf_counter()
            response = await http.post("/v1/sessions", json=body)
            latency_ms = (time.perf_counter() - sent) * 1000
            return {
                "id": body["session_id"],
                "sent": sent,
                "start_ms": latency_ms,
                "http": response.status_code,
                "body": response.json(),
            }

        wall = time.perf_counter()
        started = await asyncio.gather(*(start(i) for i in range(sessions)))
        start_wall_ms = (time.perf_counter() - wall) * 1000

        async def follow(entry: dict[str, Any]) -> None:
            if entry["http"] != 201:
                entry["outcome"] = f"http_{entry['http']}:{entry['body'].get('code')}"
                return
            deadline = time.monotonic() + settle_timeout_s
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                status = (await http.get(f"/v1/sessions/{entry['id']}")).json()
                status_ms.append((time.perf_counter() - t0) * 1000)
                if status["phase"] == "live":
                    entry["outcome"] = "live"
                    entry["live_ms"] = (time.perf_counter() - entry["sent"]) * 1000
                    return
                if status["phase"] in TERMINAL:
                    error = status.get("error") or {}
                    entry["outcome"] = f"failed:{error.get('code', 'no_code')}" if error else status["phase"]
                    return
                await asyncio.sleep(POLL_S)
            entry["outcome"] = "unsettled"

        await asyncio.gather(*(follow(entry) for entry in started))

        stop_ms: list[float] = []

        async def stop(entry: dict[str, Any]) -> None:
            if entry.get("outcome") != "live":
                return
            t0 = time.perf_counter()
            response = await http.post(f"/v1/sessions/{entry['id']}/stop", json={"reason": "bench"})
            stop_ms.append((time.perf_counter() - t0) * 1000)
            entry["stop_http"] = response.status_code
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = (await http.get(f"/v1/sessions/{entry['id']}")).json()
                if status["phase"] in TERMINAL:
                    entry["final"] = status["phase"]
                    return
                await asyncio.sleep(POLL_S)
            entry["final"] = "unsettled"

        await asyncio.gather(*(stop(entry) for entry in started))
        metrics_text = (await http.get("/metrics", headers={"X-API-Key": deployment.admin_key})).text
    outcomes = Counter(entry["outcome"] for entry in started)
    start_ms = [entry["start_ms"] for entry in started]
    live_ms = [entry["live_ms"] for entry in started if "live_ms" in entry]
    return {
        "start_ms": start_ms,
        "start_wall_ms": start_wall_ms,
        "status_ms": status_ms,
        "stop_ms": stop_ms,
        "live_ms": live_ms,
        "outcomes": dict(outcomes),
        "finals": dict(
            Counter(entry.get("final", "-") for entry in started if entry.get("outcome") == "live")
        ),
        "http_codes": dict(Counter(str(entry["http"]) for entry in started)),
        "metrics_ok": "lipsync_sessions_ended_total" in metrics_text,
    }


@dataclass(frozen=True)
class ActivitySpan:
    """One activity of a session's history, as wall-clock seconds (the server's event times)."""

    name: str
    scheduled_s: float
    started_s: float | None
    completed_s: float | None


def activity_spans(events: list[Any]) -> tuple[float | None, list[ActivitySpan]]:
    """The workflow's start time and its activities (regular and local), in history order."""
    started_at: float | None = None
    scheduled: dict[int, tuple[str, float]] = {}
    started: dict[int, float] = {}
    spans: list[ActivitySpan] = []
    for event in events:
        at = event.event_time.ToMicroseconds() / 1e6
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            started_at = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = (
                event.activity_task_scheduled_event_attributes.activity_type.name,
                at,
            )
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[event.activity_task_started_event_attributes.scheduled_event_id] = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            scheduled_id = event.activity_task_completed_event_attributes.scheduled_event_id
            name, scheduled_at = scheduled.pop(scheduled_id)
            spans.append(ActivitySpan(name, scheduled_at, started.get(scheduled_id), at))
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            span = _local_activity_span(event.marker_recorded_event_attributes, at)
            if span is not None:
                spans.append(span)
    # Still open (run_session of a live session) or ended without completing: no completion time.
    spans.extend(ActivitySpan(name, at, started.get(sid), None) for sid, (name, at) in scheduled.items())
    spans.sort(key=lambda span: span.scheduled_s)
    return started_at, spans


def workflow_task_troubles(events: list[Any]) -> dict[str, int]:
    """Workflow tasks that timed out or failed in a history, by kind and by the step that completed last
    before them (a timed-out task costs its whole timeout before it is retried; a worker that stalls past
    the SDK's deadlock limit fails its task)."""
    troubles: Counter[str] = Counter()
    names: dict[int, str] = {}
    last = "workflow_start"
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            last = names.get(event.activity_task_completed_event_attributes.scheduled_event_id, "?")
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            timeout = event.workflow_task_timed_out_event_attributes.timeout_type
            troubles[f"timed_out({TimeoutType.Name(timeout)}) after {last}"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            attributes = event.workflow_task_failed_event_attributes
            cause = WorkflowTaskFailedCause.Name(attributes.cause)
            troubles[f"failed({cause}: {attributes.failure.message[:80]}) after {last}"] += 1
    return dict(troubles)


def workflow_task_timeouts(events: list[Any]) -> list[dict[str, Any]]:
    """Each timed-out workflow task's times (epoch s) and queue, to line up with the worker's own logs and
    thread dumps: when it was scheduled, when a worker took it (and which), and the task that followed it."""
    found: list[dict[str, Any]] = []
    tasks: dict[int, dict[str, Any]] = {}
    for event in events:
        at = event.event_time.ToMicroseconds() / 1e6
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            attributes = event.workflow_task_scheduled_event_attributes
            tasks[event.event_id] = {
                "scheduled_s": at,
                "queue_kind": TaskQueueKind.Name(attributes.task_queue.kind),
                "attempt": attributes.attempt,
            }
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            attributes = event.workflow_task_started_event_attributes
            task = tasks.get(attributes.scheduled_event_id, {})
            task.update(started_s=at, identity=attributes.identity)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            attributes = event.workflow_task_timed_out_event_attributes
            task = dict(tasks.get(attributes.scheduled_event_id, {}))
            task.update(timed_out_s=at, timeout_type=TimeoutType.Name(attributes.timeout_type))
            found.append(task)
        elif (
            kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
            and found
            and "retry_completed_s" not in found[-1]
        ):
            attributes = event.workflow_task_completed_event_attributes
            retry = tasks.get(attributes.scheduled_event_id, {})
            if retry.get("scheduled_s", 0.0) >= found[-1]["timed_out_s"]:
                found[-1].update(retry_started_s=retry.get("started_s"), retry_completed_s=at)
    return found


def _local_activity_span(marker: Any, recorded_s: float) -> ActivitySpan | None:
    """A local activity's marker: its type and times are in the marker's `data` payload (JSON)."""
    if marker.marker_name != "core_local_activity" or "data" not in marker.details:
        return None
    payloads = marker.details["data"].payloads
    if not payloads:
        return None
    data = json.loads(payloads[0].data)
    name = data.get("activity_type", "")
    completed_s = _marker_time_s(data.get("complete_time")) or recorded_s
    # The marker's schedule time is not comparable with its completion (it can even come after it), so a
    # local activity's span is its completion only: its cost shows in `total_ms`, with no queue/run split.
    return ActivitySpan(name, completed_s, None, completed_s)


def _marker_time_s(value: Any) -> float | None:
    """A protobuf-JSON timestamp (`{"seconds": .., "nanos": ..}` or an RFC 3339 string) as epoch seconds."""
    if isinstance(value, dict):
        return int(value.get("seconds", 0)) + int(value.get("nanos", 0)) / 1e9
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def lifecycle_breakdown(
    post_sent_s: float, ready_s: float, workflow_started_s: float | None, spans: list[ActivitySpan]
) -> dict[str, float]:
    """Where one session's start -> ready went: each step's share of the critical path, in ms.

    A step's `total_ms` runs from the previous step's end (or the workflow's start) to its own end,
    so the shares add up to `start_to_ready_ms`; a step that overlaps the one before it only costs
    what it adds past that step's end."""
    out: dict[str, float] = {"start_to_ready_ms": (ready_s - post_sent_s) * 1000}
    previous_end = workflow_started_s if workflow_started_s is not None else post_sent_s
    out["api_to_workflow_ms"] = (previous_end - post_sent_s) * 1000
    for name in BRING_UP_STEPS:
        span = next((s for s in spans if s.name == name and s.completed_s is not None), None)
        if span is None or span.completed_s is None:
            continue
        out[f"{name}.total_ms"] = max(0.0, span.completed_s - previous_end) * 1000
        # Before the step was scheduled: the workflow task that scheduled it (negative: it overlaps the last).
        out[f"{name}.gap_ms"] = (span.scheduled_s - previous_end) * 1000
        if span.started_s is not None:
            out[f"{name}.queue_ms"] = (span.started_s - span.scheduled_s) * 1000
            out[f"{name}.run_ms"] = (span.completed_s - span.started_s) * 1000
        previous_end = max(previous_end, span.completed_s)
    # The last bring-up step's end (the output open on the sidecar) -> `ready` at the client: the relay's
    # share. Its early connection makes it independent of run_session (which may start after `ready`).
    out["ready_after_bring_up_ms"] = (ready_s - previous_end) * 1000
    run = next((s for s in spans if s.name == "run_session"), None)
    if run is not None:
        out["to_run_scheduled_ms"] = (run.scheduled_s - previous_end) * 1000
        if run.started_s is not None:
            out["run_pickup_ms"] = (run.started_s - run.scheduled_s) * 1000
            out["relay_ms"] = (ready_s - run.started_s) * 1000
    return {key: round(value, 1) for key, value in out.items()}


async def _wait_ready(audio_ws_url: str, timeout_s: float) -> tuple[float | None, str]:
    """Open the session's audio WebSocket and wait for the first message: (epoch time of `ready`, outcome)."""
    try:
        async with asyncio.timeout(timeout_s), websockets.connect(audio_ws_url, max_size=None) as ws:
            message = json.loads(await ws.recv())
            at = time.time()
            if message.get("type") == "ready":
                return at, "live"
            return None, f"failed:{message.get('code', message.get('type'))}"
    except TimeoutError:
        return None, "unsettled"
    except websockets.ConnectionClosed as exc:
        return None, f"closed:{exc.rcvd.code if exc.rcvd else 'no_frame'}"


async def run_start_live(
    deployment: Deployment,
    concurrency: list[int],
    rounds: int,
    settle_timeout_s: float,
    avatar_url: str,
) -> dict[str, Any]:
    """Start -> ready at each concurrency, `rounds` times, after one session has cached the avatar."""
    temporal = await Client.connect(f"127.0.0.1:{deployment.ports.temporal}")
    headers = {"X-API-Key": deployment.api_key}
    limits = httpx.Limits(
        max_connections=max(concurrency) + 10, max_keepalive_connections=max(concurrency) + 10
    )
    async with httpx.AsyncClient(
        base_url=deployment.api_url, headers=headers, timeout=60, limits=limits
    ) as http:

        async def one(index: int, tag: str) -> dict[str, Any]:
            body = {
                "session_id": f"bench-{tag}-{index:03d}-{secrets.token_hex(3)}",
                "avatar": {"frames_zip_url": avatar_url},
                "output": {"livekit": {"room": f"bench-room-{tag}-{index:03d}"}},
            }
            sent_s = time.time()
            response = await http.post("/v1/sessions", json=body)
            entry: dict[str, Any] = {"id": body["session_id"], "sent_s": sent_s, "http": response.status_code}
            if response.status_code != 201:
                entry["outcome"] = f"http_{response.status_code}:{response.json().get('code')}"
                return entry
            entry["created_ms"] = (time.time() - sent_s) * 1000
            ready_s, entry["outcome"] = await _wait_ready(response.json()["audio_ws_url"], settle_timeout_s)
            if ready_s is not None:
                entry["ready_s"] = ready_s
            return entry

        async def end(entry: dict[str, Any]) -> None:
            if entry["http"] != 201:
                return
            try:
                await http.post(f"/v1/sessions/{entry['id']}/stop", json={"reason": "bench"})
            except httpx.HTTPError as exc:  # an overloaded API; the stop may still land, so wait for the end
                entry["stop_error"] = type(exc).__name__
            handle = temporal.get_workflow_handle(session_workflow_id(entry["id"]))
            with contextlib.suppress(Exception):  # the outcome is what counts here, not how it ended
                async with asyncio.timeout(60):
                    await handle.result()
            if "ready_s" in entry:
                history = await handle.fetch_history()
                events = list(history.events)
                workflow_started_s, spans = activity_spans(events)
                entry["workflow_task_troubles"] = workflow_task_troubles(events)
                if timeouts := workflow_task_timeouts(events):
                    entry["workflow_task_timeouts"] = timeouts
                entry["steps"] = lifecycle_breakdown(
                    entry["sent_s"], entry["ready_s"], workflow_started_s, spans
                )

        warm = await one(0, "cache")
        await end(warm)
        if warm.get("outcome") != "live":
            raise RuntimeError(f"the avatar-caching session did not go live: {warm.get('outcome')}")
        groups = deployment.process_groups()
        results: list[dict[str, Any]] = []
        for count in concurrency:
            entries: list[dict[str, Any]] = []
            cpu_rounds: list[dict[str, Any]] = []
            for round_index in range(rounds):
                cpu_before, round_started_s = _cpu_now(groups), time.time()
                threads_before = _sidecar_threads_now(groups)
                batch = await asyncio.gather(*(one(i, f"c{count}r{round_index}") for i in range(count)))
                cpu_up, bring_up_end_s = _cpu_now(groups), time.time()
                threads_up = _sidecar_threads_now(groups)
                # Every session that went live is still live: what they cost while nobody speaks.
                await asyncio.sleep(LIVE_SAMPLE_S)
                cpu_live = _cpu_now(groups)
                threads_live = _sidecar_threads_now(groups)
                cpu_rounds.append(
                    {
                        "bring_up_wall_s": round(bring_up_end_s - round_started_s, 2),
                        "bring_up_cpu_s": cpu_delta_s(cpu_before, cpu_up),
                        "sidecar_threads_bring_up_cpu_s": cpu_delta_s(threads_before, threads_up),
                        # Session-seconds lived inside the bring-up window (ready -> the last ready).
                        "live_session_s_in_bring_up": round(
                            sum(bring_up_end_s - entry["ready_s"] for entry in batch if "ready_s" in entry), 2
                        ),
                        "live_sessions": sum(1 for entry in batch if "ready_s" in entry),
                        "live_sample_s": LIVE_SAMPLE_S,
                        "live_sample_cpu_s": cpu_delta_s(cpu_up, cpu_live),
                        "sidecar_threads_live_sample_cpu_s": cpu_delta_s(threads_up, threads_live),
                    }
                )
                await asyncio.gather(*(end(entry) for entry in batch))
                entries.extend(batch)
            summary = _start_live_summary(count, rounds, entries)
            summary["cpu"] = cpu_summary(cpu_rounds)
            results.append(summary)
    return {"warm_up_steps": warm.get("steps", {}), "results": results}


def _cpu_now(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of every service's process group, and of this benchmark's own client."""
    times = os.times()
    return {**group_cpu_s(groups), "bench_client": times.user + times.system}


def _sidecar_threads_now(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the sidecars' threads, by thread name, summed over the sidecars."""
    total: Counter[str] = Counter()
    for name, pgid in groups.items():
        if name.startswith(SIDECAR_PREFIX):
            total.update(thread_cpu_s(pgid))
    return dict(total)


def cpu_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Who burns the cores at one concurrency, over its rounds.

    - `bring_up_cpu_s_per_start`: each process's CPU seconds from the round's POSTs to its last `ready`,
      per started session (it includes what sessions already live spend meanwhile);
    - `live_cores_per_session`: each process's CPU, in cores, per live idle session (sampled for
      `live_sample_s` after the last `ready`, before the stops): rendering and publishing nobody speaks to;
    - `start_cpu_s_per_start`: the bring-up's CPU less the live sessions' share of it (their session-seconds
      in the window times `live_cores_per_session`), per start: what a start itself costs, the floor that
      divides the cores into starts per second;
    - `bring_up_cores_used`: the bring-up's CPU over its wall time (2.0 = both cores of a 2-core machine);
    - `sidecar_thread_cpu_s_per_start`: the sidecars' bring-up CPU by thread name, per start (the Python
      main thread is GIL-bound: what it spends per start is a serial floor however many cores there are);
      `sidecar_thread_live_cores_per_session`: the same split of a live idle session's cost.
    """
    names = sorted({name for entry in rounds for name in entry["bring_up_cpu_s"]})
    sidecar_threads_live = sum(
        (Counter(entry.get("sidecar_threads_live_sample_cpu_s", {})) for entry in rounds), Counter()
    )
    starts = sum(entry["live_sessions"] for entry in rounds) or 1
    bring_up = {name: sum(entry["bring_up_cpu_s"].get(name, 0.0) for entry in rounds) for name in names}
    session_s = sum(entry["live_sessions"] * entry["live_sample_s"] for entry in rounds)
    live_cores = {
        name: (
            sum(entry["live_sample_cpu_s"].get(name, 0.0) for entry in rounds) / session_s
            if session_s
            else 0.0
        )
        for name in names
    }
    lived_in_bring_up_s = sum(entry["live_session_s_in_bring_up"] for entry in rounds)
    bring_up_total_s = sum(bring_up.values())
    live_share_s = sum(live_cores.values()) * lived_in_bring_up_s
    wall_s = sum(entry["bring_up_wall_s"] for entry in rounds)
    return {
        "bring_up_cpu_s_per_start": {name: round(used / starts, 3) for name, used in bring_up.items()},
        "bring_up_cpu_s_per_start_total": round(bring_up_total_s / starts, 3),
        "live_cores_per_session": {name: round(cores, 4) for name, cores in live_cores.items()},
        "live_cores_per_session_total": round(sum(live_cores.values()), 4),
        "start_cpu_s_per_start": round(max(0.0, bring_up_total_s - live_share_s) / starts, 3),
        "bring_up_cores_used": round(bring_up_total_s / wall_s, 2) if wall_s else None,
        "sidecar_thread_cpu_s_per_start": dict(
            sorted(
                (
                    (thread, round(used / starts, 3))
                    for thread, used in sum(
                        (Counter(entry.get("sidecar_threads_bring_up_cpu_s", {})) for entry in rounds),
                        Counter(),
                    ).items()
                ),
                key=lambda item: -item[1],
            )
        ),
        "sidecar_thread_live_cores_per_session": {
            thread: round(used / session_s, 4)
            for thread, used in sorted(sidecar_threads_live.items(), key=lambda item: -item[1])
            if session_s
        },
        "rounds": rounds,
    }


def _start_live_summary(count: int, rounds: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    ready_ms = [entry["steps"]["start_to_ready_ms"] for entry in entries if "steps" in entry]
    keys = sorted({key for entry in entries for key in entry.get("steps", {})})
    steps = {
        key: {
            "p50": _pct([entry["steps"][key] for entry in entries if key in entry.get("steps", {})], 50),
            "p99": _pct([entry["steps"][key] for entry in entries if key in entry.get("steps", {})], 99),
        }
        for key in keys
    }
    return {
        "concurrent_starts": count,
        "rounds": rounds,
        "sessions": len(entries),
        "outcomes": dict(Counter(entry["outcome"] for entry in entries)),
        "stop_errors": dict(Counter(entry["stop_error"] for entry in entries if "stop_error" in entry)),
        "workflow_task_troubles": dict(
            sum((Counter(entry.get("workflow_task_troubles", {})) for entry in entries), Counter())
        ),
        "workflow_task_timeouts": [
            {"session": entry["id"], **timeout}
            for entry in entries
            for timeout in entry.get("workflow_task_timeouts", [])
        ],
        "created_p50_ms": _pct([entry["created_ms"] for entry in entries if "created_ms" in entry], 50),
        "start_to_ready_p50_ms": _pct(ready_ms, 50),
        "start_to_ready_p99_ms": _pct(ready_ms, 99),
        "start_to_ready_max_ms": round(max(ready_ms), 1) if ready_ms else None,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--sidecars", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="sessions per sidecar")
    parser.add_argument("--engine", choices=engine_choices(), default="preview")
    parser.add_argument(
        "--place-timeout-s", type=float, default=20.0, help="how long a session waits for a slot"
    )
    parser.add_argument("--settle-timeout-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--start-live",
        type=int,
        nargs="+",
        metavar="C",
        help="measure start -> ready with a cached avatar at these concurrencies (instead of --sessions)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="--start-live: rounds at each concurrency")
    parser.add_argument(
        "--label", default="", help="--start-live: names this run in the JSON (e.g. before/after a change)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="--start-live: add this run to the JSON file's runs instead of replacing it",
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="copy every process's log here before the deployment's directory goes"
    )
    args = parser.parse_args(argv)
    if args.start_live and args.sidecars * args.slots < max(args.start_live):
        parser.error(
            f"--start-live {max(args.start_live)} needs at least that many slots (--sidecars x --slots)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "infra.process"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work_dir = Path(tmp)
        deployment = Deployment(work_dir, args.sidecars, args.slots, args.engine, args.place_timeout_s)
        assets = work_dir / "assets"
        assets.mkdir()
        (assets / "astronaut.zip").write_bytes(avatar_zip_bytes())
        try:
            deployment.start()
            what = f"{args.start_live} x {args.rounds} rounds of" if args.start_live else str(args.sessions)
            logger.info(
                "deployment ready: %d sidecars x %d slots; starting %s sessions",
                args.sidecars,
                args.slots,
                what,
            )
            with serve_directory(assets) as assets_url:
                if args.start_live:
                    measured = asyncio.run(
                        run_start_live(
                            deployment,
                            args.start_live,
                            args.rounds,
                            args.settle_timeout_s,
                            f"{assets_url}/astronaut.zip",
                        )
                    )
                else:
                    raw = asyncio.run(
                        run_sessions(
                            deployment, args.sessions, args.settle_timeout_s, f"{assets_url}/astronaut.zip"
                        )
                    )
        finally:
            deployment.stop()
            if args.keep_logs is not None:
                for logs in (work_dir / "logs", deployment.stack_dir):
                    shutil.copytree(logs, args.keep_logs / logs.name, dirs_exist_ok=True)
    if args.start_live:
        return _write_start_live(args, measured, argv)
    outcomes: dict[str, int] = raw["outcomes"]
    live = outcomes.get("live", 0)
    clear_failures = sum(
        count for outcome, count in outcomes.items() if outcome.startswith(("failed:", "http_"))
    )
    summary = {
        "sessions_requested": args.sessions,
        "sessions_started": raw["http_codes"].get("201", 0),
        "sessions_live": live,
        "sessions_failed_clearly": clear_failures,
        "sessions_unsettled": args.sessions - live - clear_failures,
        "capacity_slots": args.sidecars * args.slots,
        "start_p50_ms": _pct(raw["start_ms"], 50),
        "start_p99_ms": _pct(raw["start_ms"], 99),
        "start_max_ms": round(max(raw["start_ms"]), 1),
        "start_all_wall_ms": round(raw["start_wall_ms"], 1),
        "status_p50_ms": _pct(raw["status_ms"], 50),
        "status_p99_ms": _pct(raw["status_ms"], 99),
        "stop_p50_ms": _pct(raw["stop_ms"], 50),
        "stop_p99_ms": _pct(raw["stop_ms"], 99),
        "time_to_live_p50_ms": _pct(raw["live_ms"], 50),
        "time_to_live_p99_ms": _pct(raw["live_ms"], 99),
    }
    document = {
        "benchmark": "api",
        "device": cpu_name(),
        "torch": None,
        "settings": {
            "engine": args.engine,
            "sidecars": args.sidecars,
            "slots_per_sidecar": args.slots,
            "place_timeout_s": args.place_timeout_s,
            "output": "livekit (local livekit-server --dev)",
            "avatar": "astronaut 256x256, 8 frames (infra.demo)",
            "processes": "temporal dev server, livekit-server, nginx-rtmp, 1 worker, sidecars, 1 api",
            "notes": args.notes,
        },
        "summary": summary,
        "results": [
            {
                "sessions": args.sessions,
                "outcomes": outcomes,
                "after_stop": raw["finals"],
                "http_codes": raw["http_codes"],
                "metrics_endpoint_ok": raw["metrics_ok"],
            }
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0 if summary["sessions_unsettled"] == 0 else 1


def _write_start_live(args: argparse.Namespace, measured: dict[str, Any], argv: list[str] | None) -> int:
    run = {
        "label": args.label,
        "command": shlex.join(["python", "-m", "bench.api", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "engine": args.engine,
            "sidecars": args.sidecars,
            "slots_per_sidecar": args.slots,
            "output": "livekit (local livekit-server --dev)",
            "avatar": "astronaut 256x256, 8 frames (infra.demo), cached by one session before the rounds",
            "notes": args.notes,
        },
        "warm_up_steps": measured["warm_up_steps"],
        "results": measured["results"],
    }
    document: dict[str, Any] = {
        "benchmark": "api-start-live",
        "device": cpu_name(),
        "torch": None,
        "runs": [],
    }
    if args.append and args.json.exists():
        document = json.loads(args.json.read_text(encoding="utf-8"))
    document["runs"].append(run)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    summary = [
        {key: value for key, value in result.items() if key != "steps"} for result in measured["results"]
    ]
    print(json.dumps(summary, indent=2))
    settled = all(result["outcomes"].get("live", 0) == result["sessions"] for result in measured["results"])
    return 0 if settled else 1


if __name__ == "__main__":
    sys.exit(main())
