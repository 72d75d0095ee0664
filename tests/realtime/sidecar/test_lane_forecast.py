"""The forecast of when queued jobs are rendered runs the render lane's batching rule (`lane_forecast`)."""

from __future__ import annotations

import pytest

from realtime.sidecar.lane_forecast import ForecastJob, LaneCosts, forecast_ready_s

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
BATCH_MS = {1: 10.0, 2: 12.0, 4: 16.0, 8: 24.0, 16: 40.0, 32: 70.0, 48: 100.0, 64: 130.0}


def _ms(frames: int) -> float:
    return BATCH_MS[next(b for b in BUCKETS if b >= frames)]


def _costs(*, device_share: float = 1.0, max_batch_frames: int = 64) -> LaneCosts:
    return LaneCosts.read(
        batch_ms=_ms,
        device_ms=lambda frames: _ms(frames) * device_share,
        buckets=BUCKETS,
        max_batch_frames=max_batch_frames,
        deadline_margin_s=0.005,
        backlog_horizon_batches=2.0,
    )


def test_jobs_ride_batches_in_deadline_order_up_to_the_frame_limit() -> None:
    # 80 frames due in a second: a full batch, then the rest in its own bucket (16 frames) after it.
    jobs = [ForecastJob(1.0 + 0.01 * k, 4, first_frames=True) for k in range(20)]
    ready = forecast_ready_s(jobs, start_s=0.0, costs=_costs())
    assert ready[:16] == pytest.approx([0.130] * 16)
    assert ready[16:] == pytest.approx([0.130 + 0.040] * 4)


def test_the_next_batch_starts_when_the_device_part_of_the_one_before_ends() -> None:
    jobs = [ForecastJob(1.0 + 0.01 * k, 4, first_frames=True) for k in range(20)]
    ready = forecast_ready_s(jobs, start_s=0.0, costs=_costs(device_share=0.5))
    # The second batch starts 65 ms in (the first's device part) and takes its whole 40 ms.
    assert ready[16:] == pytest.approx([0.065 + 0.040] * 4)


def test_a_batch_stops_growing_where_a_larger_bucket_would_make_the_most_urgent_job_late() -> None:
    # Head due at 50 ms: 16 frames (40 ms + 5 ms margin) keep it, 20 (bucket 32: 70 ms) would not.
    jobs = [ForecastJob(0.050, 4), *(ForecastJob(0.5 + 0.01 * k, 4) for k in range(7))]
    ready = forecast_ready_s(jobs, start_s=0.0, costs=_costs())
    assert ready[:4] == pytest.approx([0.040] * 4)
    assert ready[4:] == pytest.approx([0.080] * 4)  # the other 16 frames, in a batch of their own


def test_a_head_that_is_late_even_alone_gets_a_full_batch() -> None:
    jobs = [ForecastJob(0.005, 4), *(ForecastJob(0.5 + 0.01 * k, 4) for k in range(15))]
    ready = forecast_ready_s(jobs, start_s=0.0, costs=_costs())
    assert ready == pytest.approx([0.130] * 16)


def test_a_full_batch_due_soon_makes_the_lane_behind_but_first_frames_and_later_frames_do_not() -> None:
    head = ForecastJob(0.050, 4)
    due_soon = [ForecastJob(0.100 + 0.001 * k, 4) for k in range(15)]  # within two full batches (260 ms)
    due_later = [ForecastJob(1.0 + 0.001 * k, 4) for k in range(15)]
    first_frames_soon = [ForecastJob(0.100 + 0.001 * k, 4, first_frames=True) for k in range(15)]
    behind = forecast_ready_s([head, *due_soon], start_s=0.0, costs=_costs())
    assert behind[0] == pytest.approx(0.130)  # throughput first: one full batch, the head late
    for others in (due_later, first_frames_soon):
        ready = forecast_ready_s([head, *others], start_s=0.0, costs=_costs())
        assert ready[0] == pytest.approx(0.040)  # the batch was cut for the head
