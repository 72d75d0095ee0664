"""bench.api's start -> ready breakdown, read from a session's Temporal history events."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType, TaskQueueKind, TimeoutType, WorkflowTaskFailedCause
from temporalio.api.history.v1 import HistoryEvent

from bench.api import (
    ActivitySpan,
    activity_spans,
    cpu_summary,
    lifecycle_breakdown,
    workflow_task_timeouts,
    workflow_task_troubles,
)
from bench.proc_cpu import cpu_delta_s, group_cpu_s, thread_cpu_s

T0 = 1_800_000_000.0  # POST sent (epoch s)


def at(offset_ms: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(round((T0 + offset_ms / 1000) * 1e6))
    return stamp


def started(event_id: int, offset_ms: float) -> HistoryEvent:
    return event(event_id, offset_ms, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)


def event(event_id: int, at_ms: float, event_type: EventType.ValueType) -> HistoryEvent:
    return HistoryEvent(event_id=event_id, event_time=at(at_ms), event_type=event_type)


def activity(
    first_id: int, name: str, scheduled_ms: float, started_ms: float, completed_ms: float
) -> list[HistoryEvent]:
    scheduled = event(first_id, scheduled_ms, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    scheduled.activity_task_scheduled_event_attributes.activity_type.name = name
    start = event(first_id + 1, started_ms, EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    start.activity_task_started_event_attributes.scheduled_event_id = first_id
    done = event(first_id + 2, completed_ms, EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    done.activity_task_completed_event_attributes.scheduled_event_id = first_id
    return [scheduled, start, done]


def local_activity(event_id: int, name: str, scheduled_ms: float, completed_ms: float) -> HistoryEvent:
    recorded = event(event_id, completed_ms + 5, EventType.EVENT_TYPE_MARKER_RECORDED)
    marker = recorded.marker_recorded_event_attributes
    marker.marker_name = "core_local_activity"
    data = {
        "activity_type": name,
        "original_schedule_time": _json_time(scheduled_ms),
        "complete_time": _json_time(completed_ms),
    }
    marker.details["data"].CopyFrom(Payloads(payloads=[Payload(data=json.dumps(data).encode())]))
    return recorded


def _json_time(offset_ms: float) -> dict[str, int]:
    micros = round((T0 + offset_ms / 1000) * 1e6)
    return {"seconds": micros // 1_000_000, "nanos": (micros % 1_000_000) * 1000}


def test_steps_add_up_to_start_to_ready() -> None:
    events = [
        started(1, 10),
        *activity(5, "fetch_assets", 60, 61, 100),
        local_activity(8, "validate_assets", 100, 110),
        *activity(10, "place_session", 120, 121, 200),
        *activity(13, "prepare_avatar", 230, 250, 400),
        *activity(16, "warm_up", 231, 260, 300),  # beside prepare: ends first, costs nothing on the path
        *activity(19, "open_output", 430, 440, 700),
        *activity(22, "run_session", 750, 760, 5000),
    ]
    workflow_started_s, spans = activity_spans(events)
    assert workflow_started_s is not None and abs(workflow_started_s - (T0 + 0.010)) < 1e-6
    assert [span.name for span in spans] == [
        "fetch_assets",
        "validate_assets",
        "place_session",
        "prepare_avatar",
        "warm_up",
        "open_output",
        "run_session",
    ]
    steps = lifecycle_breakdown(T0, T0 + 0.9, workflow_started_s, spans)
    assert steps["start_to_ready_ms"] == 900.0 and steps["api_to_workflow_ms"] == 10.0
    assert (steps["fetch_assets.total_ms"], steps["fetch_assets.gap_ms"], steps["fetch_assets.run_ms"]) == (
        90.0,
        50.0,
        39.0,
    )
    # A local activity: no queue/run split.
    assert steps["validate_assets.total_ms"] == 10.0 and "validate_assets.run_ms" not in steps
    assert steps["prepare_avatar.queue_ms"] == 20.0 and steps["warm_up.total_ms"] == 0.0
    assert steps["open_output.total_ms"] == 300.0
    assert (steps["to_run_scheduled_ms"], steps["run_pickup_ms"], steps["relay_ms"]) == (50.0, 10.0, 140.0)
    on_path = [key for key in steps if key.endswith(".total_ms")] + [
        "api_to_workflow_ms",
        "to_run_scheduled_ms",
        "run_pickup_ms",
        "relay_ms",
    ]
    assert abs(sum(steps[key] for key in on_path) - steps["start_to_ready_ms"]) < 0.5


def test_a_step_missing_from_the_history_costs_nothing() -> None:
    spans = [ActivitySpan("fetch_assets", T0 + 0.01, T0 + 0.01, T0 + 0.05)]
    steps = lifecycle_breakdown(T0, T0 + 1.0, T0, spans)
    assert "validate_assets.total_ms" not in steps and "relay_ms" not in steps
    assert steps["fetch_assets.total_ms"] == 50.0


def test_ready_before_run_session_shows_as_the_relays_share_after_bring_up() -> None:
    """With the relay's early connection, `ready` can reach the client before run_session starts."""
    spans = [
        ActivitySpan("open_output", T0 + 0.2, T0 + 0.21, T0 + 0.5),
        ActivitySpan("run_session", T0 + 0.6, T0 + 0.65, None),
    ]
    steps = lifecycle_breakdown(T0, T0 + 0.53, T0 + 0.01, spans)
    assert steps["ready_after_bring_up_ms"] == 30.0
    assert steps["relay_ms"] == -120.0  # ready came first


def timed_out_task(event_id: int) -> HistoryEvent:
    event = HistoryEvent(event_id=event_id, event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    event.workflow_task_timed_out_event_attributes.timeout_type = TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
    return event


def failed_task(event_id: int, message: str) -> HistoryEvent:
    event = HistoryEvent(event_id=event_id, event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    attributes = event.workflow_task_failed_event_attributes
    attributes.cause = WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
    attributes.failure.message = message
    return event


def test_workflow_task_troubles_name_the_step_before_them() -> None:
    events = [
        started(1, 0),
        timed_out_task(2),
        *activity(5, "fetch_assets", 60, 61, 100),
        *activity(10, "open_output", 430, 440, 700),
        timed_out_task(13),
        timed_out_task(14),
        failed_task(15, "Potential deadlock detected"),
    ]
    assert workflow_task_troubles(events) == {
        "timed_out(TIMEOUT_TYPE_START_TO_CLOSE) after workflow_start": 1,
        "timed_out(TIMEOUT_TYPE_START_TO_CLOSE) after open_output": 2,
        "failed(WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE: Potential deadlock detected) "
        "after open_output": 1,
    }
    assert workflow_task_troubles([started(1, 0), *activity(5, "fetch_assets", 60, 61, 100)]) == {}


def workflow_task(
    scheduled_id: int, kind: TaskQueueKind.ValueType, scheduled_ms: float, started_ms: float
) -> list[HistoryEvent]:
    scheduled = event(scheduled_id, scheduled_ms, EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED)
    scheduled.workflow_task_scheduled_event_attributes.task_queue.kind = kind
    start = event(scheduled_id + 1, started_ms, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    start.workflow_task_started_event_attributes.scheduled_event_id = scheduled_id
    start.workflow_task_started_event_attributes.identity = "1234@host"
    return [scheduled, start]


def test_workflow_task_timeouts_give_each_lost_tasks_times_and_its_retry() -> None:
    lost = timed_out_task(22)
    lost.event_time.CopyFrom(at(5270))
    lost.workflow_task_timed_out_event_attributes.scheduled_event_id = 20
    retry_done = event(25, 5630, EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    retry_done.workflow_task_completed_event_attributes.scheduled_event_id = 23
    events = [
        started(1, 0),
        *workflow_task(20, TaskQueueKind.TASK_QUEUE_KIND_STICKY, 0, 1270),
        lost,
        *workflow_task(23, TaskQueueKind.TASK_QUEUE_KIND_NORMAL, 5270, 5360),
        retry_done,
    ]
    (timeout,) = workflow_task_timeouts(events)
    assert timeout == {
        "scheduled_s": T0,
        "queue_kind": "TASK_QUEUE_KIND_STICKY",
        "attempt": 0,
        "started_s": T0 + 1.27,
        "identity": "1234@host",
        "timed_out_s": T0 + 5.27,
        "timeout_type": "TIMEOUT_TYPE_START_TO_CLOSE",
        "retry_started_s": T0 + 5.36,
        "retry_completed_s": T0 + 5.63,
    }
    assert workflow_task_timeouts(events[:3]) == []


def cpu_round(bring_up: dict[str, float], live: dict[str, float], lived_s: float) -> dict[str, Any]:
    return {
        "bring_up_wall_s": 4.0,
        "bring_up_cpu_s": bring_up,
        "live_session_s_in_bring_up": lived_s,
        "live_sessions": 4,
        "live_sample_s": 2.0,
        "live_sample_cpu_s": live,
    }


def test_cpu_summary_separates_a_start_from_the_live_sessions_around_it() -> None:
    # Two rounds of 4 starts: 8 sessions x 2 s sampled = 16 session-seconds; the sidecar used 1.6 s of CPU
    # in them (0.1 core per live session), the API 0.16 s (0.01).
    rounds = [
        cpu_round({"sidecar": 3.0, "api": 1.0}, {"sidecar": 0.8, "api": 0.08}, lived_s=5.0),
        cpu_round({"sidecar": 5.0, "api": 1.0}, {"sidecar": 0.8, "api": 0.08}, lived_s=15.0),
    ]
    summary = cpu_summary(rounds)
    assert summary["bring_up_cpu_s_per_start"] == {"api": 0.25, "sidecar": 1.0}
    assert summary["bring_up_cpu_s_per_start_total"] == 1.25
    assert summary["live_cores_per_session"] == {"api": 0.01, "sidecar": 0.1}
    # 10 s of bring-up CPU less 0.11 core x 20 session-seconds lived in the bring-ups, over 8 starts.
    assert summary["start_cpu_s_per_start"] == round((10.0 - 0.11 * 20.0) / 8, 3)
    assert summary["bring_up_cores_used"] == 1.25  # 10 CPU-s over 8 s of bring-up


def test_group_cpu_reads_every_member_of_a_process_group(tmp_path: Path) -> None:
    """A fake /proc: two members of group 100 (one with reaped children), one of another group, a
    command name with spaces and a ')', and a non-process entry."""
    ticks = os.sysconf("SC_CLK_TCK")

    def stat(pid: int, comm: str, pgrp: int, *, utime: int, stime: int, cutime: int = 0) -> None:
        (tmp_path / str(pid)).mkdir()
        fields = ["S", "1", str(pgrp), *["0"] * 8, str(utime), str(stime), str(cutime), "0", "20"]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")

    stat(100, "python", 100, utime=ticks, stime=ticks // 2)
    stat(101, "odd name) x", 100, utime=ticks, stime=0, cutime=ticks)
    stat(200, "livekit", 200, utime=3 * ticks, stime=0)
    (tmp_path / "self").mkdir()
    used = group_cpu_s({"sidecar": 100, "livekit": 200, "gone": 300}, proc=tmp_path)
    assert used == {"sidecar": 3.5, "livekit": 3.0, "gone": 0.0}
    assert cpu_delta_s({"sidecar": 1.0, "gone": 0.0}, used) == {"sidecar": 2.5, "gone": 0.0}


def test_thread_cpu_sums_a_groups_threads_by_name(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")

    def line(pid: int, comm: str, pgrp: int, utime: int) -> str:
        return f"{pid} ({comm}) " + " ".join(["S", "1", str(pgrp), *["0"] * 8, str(utime), "0", "0", "0"])

    def process(pid: int, pgrp: int, threads: dict[int, tuple[str, int]]) -> None:
        (tmp_path / str(pid) / "task").mkdir(parents=True)
        (tmp_path / str(pid) / "stat").write_text(line(pid, "python", pgrp, 0))
        for tid, (comm, utime) in threads.items():
            (tmp_path / str(pid) / "task" / str(tid)).mkdir()
            (tmp_path / str(pid) / "task" / str(tid) / "stat").write_text(line(tid, comm, pgrp, utime))

    process(10, 10, {10: ("python", 2 * ticks), 11: ("tokio-rt (w)", ticks), 12: ("tokio-rt (w)", ticks)})
    process(20, 20, {20: ("python", 5 * ticks)})  # another group: not counted
    assert thread_cpu_s(10, proc=tmp_path) == {"python": 2.0, "tokio-rt (w)": 2.0}
