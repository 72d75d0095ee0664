"""bench.api's start -> ready breakdown, read from a session's Temporal history events."""

from __future__ import annotations

import json

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench.api import ActivitySpan, activity_spans, lifecycle_breakdown

T0 = 1_800_000_000.0  # POST sent (epoch s)


def at(offset_ms: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(round((T0 + offset_ms / 1000) * 1e6))
    return stamp


def started(event_id: int, offset_ms: float) -> HistoryEvent:
    return HistoryEvent(
        event_id=event_id,
        event_time=at(offset_ms),
        event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
    )


def activity(
    first_id: int, name: str, scheduled_ms: float, started_ms: float, completed_ms: float
) -> list[HistoryEvent]:
    scheduled = HistoryEvent(
        event_id=first_id,
        event_time=at(scheduled_ms),
        event_type=EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    )
    scheduled.activity_task_scheduled_event_attributes.activity_type.name = name
    start = HistoryEvent(
        event_id=first_id + 1,
        event_time=at(started_ms),
        event_type=EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
    )
    start.activity_task_started_event_attributes.scheduled_event_id = first_id
    done = HistoryEvent(
        event_id=first_id + 2,
        event_time=at(completed_ms),
        event_type=EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    )
    done.activity_task_completed_event_attributes.scheduled_event_id = first_id
    return [scheduled, start, done]


def local_activity(event_id: int, name: str, scheduled_ms: float, completed_ms: float) -> HistoryEvent:
    event = HistoryEvent(
        event_id=event_id, event_time=at(completed_ms + 5), event_type=EventType.EVENT_TYPE_MARKER_RECORDED
    )
    marker = event.marker_recorded_event_attributes
    marker.marker_name = "core_local_activity"
    data = {
        "activity_type": name,
        "original_schedule_time": _json_time(scheduled_ms),
        "complete_time": _json_time(completed_ms),
    }
    marker.details["data"].CopyFrom(Payloads(payloads=[Payload(data=json.dumps(data).encode())]))
    return event


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
