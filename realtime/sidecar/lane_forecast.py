"""When queued render jobs will be ready: the render lane's batching rule run ahead on its cost model.

A new utterance's lead is chosen with this forecast (`RenderLane.first_frames_budget_ms`): the shortest
lead with which its first frames, and every queued frame that would be in time without them, are rendered
before their ticks. Counting the queue's frames (every frame due earlier, in full batches) overstated
what the lane does when many utterances start together: to keep its most urgent deadline it then runs
small batches, at a fraction of a full batch's frames per second, and the frames behind wait longer.

The rule mirrored here is `RenderLane._take_batch`'s: a batch takes the most urgent job, then jobs in
deadline order while they fit `max_batch_frames` and either stay in the bucket already paid for or grow it
to one whose time still meets the head's deadline. A head that is late even alone gets a full batch, and so
does one that is not an utterance's first frames while a full batch or more of other frames is due soon
(the lane is behind). A batch's frames are ready its bucket's whole time (features, render, assembly) after
it starts, and the next batch starts on the device when this one's device part ends (the lane pipelines).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ForecastJob:
    deadline_s: float  # when its first frame is due (the lane's clock)
    frames: int
    first_frames: bool = False  # an utterance's first frames (`RenderLane.submit_render`)


@dataclass(frozen=True)
class LaneCosts:
    """The lane's cost model as the forecast reads it, per batch size in frames (index 0..max_batch_frames;
    read once per planning, which runs the forecast a few times over a few hundred jobs on the event loop)."""

    batch_s: Sequence[float]  # a batch's whole time (features, render, assembly)
    device_s: Sequence[float]  # its time on the device
    bucket_of: Sequence[int]  # the bucket the engine pads it to
    max_batch_frames: int
    deadline_margin_s: float
    backlog_horizon_batches: float  # frames due within this many full batches' time count as a backlog

    @classmethod
    def read(
        cls,
        *,
        batch_ms: Callable[[int], float],
        device_ms: Callable[[int], float],
        buckets: Sequence[int],
        max_batch_frames: int,
        deadline_margin_s: float,
        backlog_horizon_batches: float,
    ) -> LaneCosts:
        sizes = [max(1, frames) for frames in range(max_batch_frames + 1)]
        return cls(
            batch_s=[batch_ms(frames) / 1000.0 for frames in sizes],
            device_s=[device_ms(frames) / 1000.0 for frames in sizes],
            bucket_of=[bucket_for(frames, buckets) for frames in sizes],
            max_batch_frames=max_batch_frames,
            deadline_margin_s=deadline_margin_s,
            backlog_horizon_batches=backlog_horizon_batches,
        )


def bucket_for(frames: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `frames` (the largest when none does)."""
    return next((bucket for bucket in buckets if bucket >= frames), buckets[-1])


def forecast_ready_s(jobs: Sequence[ForecastJob], *, start_s: float, costs: LaneCosts) -> list[float]:
    """When each of `jobs` (sorted by deadline) has its frames rendered, when the device is free for them
    from `start_s` on; in the order given."""
    batch_s, device_s, bucket_of = costs.batch_s, costs.device_s, costs.bucket_of
    ready_s = [0.0] * len(jobs)
    margin_s = costs.deadline_margin_s
    device_free_s = start_s
    horizon_ahead_s = costs.backlog_horizon_batches * batch_s[costs.max_batch_frames]
    # other_frames[i]: the frames of jobs[:i] that count toward a backlog (not first frames)
    other_frames = list(
        itertools.accumulate((0 if job.first_frames else job.frames for job in jobs), initial=0)
    )
    soon_end = 0  # jobs[:soon_end] are due by the horizon (deadlines sorted, the horizon only moves on)
    head = 0
    while head < len(jobs):
        now_s = device_free_s
        head_job = jobs[head]
        frames = min(head_job.frames, costs.max_batch_frames)
        head_in_time = now_s + batch_s[frames] + margin_s <= head_job.deadline_s
        soon_end = max(soon_end, head + 1)
        while soon_end < len(jobs) and jobs[soon_end].deadline_s <= now_s + horizon_ahead_s:
            soon_end += 1
        # As `RenderLane._take_batch` counts it: the head's frames and the other frames due soon behind it.
        due_soon = frames + other_frames[soon_end] - other_frames[head + 1]
        backlogged = due_soon >= costs.max_batch_frames
        head_in_time = head_in_time and (not backlogged or head_job.first_frames)
        # A larger bucket is allowed while it keeps the head's deadline (or the head is late anyway).
        latest_start_s = head_job.deadline_s - margin_s - now_s
        end = head + 1
        while end < len(jobs):
            grown = frames + jobs[end].frames
            if grown > costs.max_batch_frames:
                break
            if head_in_time and bucket_of[grown] > bucket_of[frames] and batch_s[grown] > latest_start_s:
                break  # the larger bucket would make the most urgent job late
            frames = grown
            end += 1
        done_s = now_s + batch_s[frames]
        for index in range(head, end):
            ready_s[index] = done_s
        device_free_s = now_s + device_s[frames]
        head = end
    return ready_s
