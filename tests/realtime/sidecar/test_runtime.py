"""The session runtime on the real preview engine: idle cycle, speech frames, accounting, interrupts,
crossfades.

Output goes to a RecordingPublisher (no network): every tick is inspected.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime.ingest.formats import PcmFormat
from realtime.ingest.input import AudioInput
from realtime.outputs.base import FrameKind
from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.render_lane import RenderLane
from realtime.sidecar.runtime import SessionRuntime
from tests.support.lane_sim import simulate
from tests.support.sidecar_harness import RunningSidecar, SpeechClip, open_recorded_session


class Events:
    def __init__(self) -> None:
        self.started: list[tuple[int, str, int]] = []
        self.finished: list[tuple[int, str, float, bool]] = []

    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None:
        self.started.append((utterance_id, source, frame_id))

    def on_playback_finished(
        self, utterance_id: int, source: str, position_s: float, interrupted: bool
    ) -> None:
        self.finished.append((utterance_id, source, position_s, interrupted))


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def speech_16k_pcm(speech: SpeechClip) -> bytes:
    import soxr

    samples = soxr.resample(speech.float32(), speech.rate_hz, 16_000)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def assert_accounting(runtime: SessionRuntime) -> None:
    stats = runtime.stats()
    assert stats.audio_samples_received == (
        stats.audio_samples_rendered
        + stats.audio_samples_pending
        + stats.audio_samples_rejected
        + stats.audio_samples_flushed
    ), stats


def runtime_of(sidecar: RunningSidecar, session_id: str) -> SessionRuntime:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    runtime = host.runtime(session_id)
    assert runtime is not None
    return runtime


def mouth_box(sidecar: RunningSidecar, session_id: str) -> tuple[int, int, int, int]:
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    avatar = host.sessions[session_id].avatar
    x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[0])  # type: ignore[attr-defined]
    height = y2 - y1
    return x1, y1 + height // 2, x2, min(avatar.height_px, y2 + height // 8)  # type: ignore[attr-defined]


async def test_idle_cycle_without_audio(sidecar: RunningSidecar, avatar_zip_path: Path) -> None:
    recorder = await open_recorded_session(sidecar, "idle", avatar_zip_path)
    runtime = runtime_of(sidecar, "idle")
    try:
        await until(lambda: len(recorder.ticks) >= 30)
        ticks = recorder.ticks[:30]
        assert [t.frame_index for t in ticks] == list(range(ticks[0].frame_index, ticks[0].frame_index + 30))
        assert all(t.kind is FrameKind.IDLE and t.speech_samples == 0 for t in ticks)
        assert not np.any(np.concatenate([t.audio_playout for t in ticks]))
        # The ping-pong cycle: 12 frames forward then back, so ticks 0..23 show frames 0..11, 11..0.
        avatar = runtime.engine.avatar
        for tick in ticks:
            assert np.array_equal(tick.frame_rgb, avatar.idle_frame(tick.frame_index))
        distinct = {ticks[i].frame_rgb.tobytes() for i in range(24)}
        assert len(distinct) == 12
        # Pace: 25 fps on the clock, deadlines 40 ms apart.
        deadlines = np.diff([t.deadline_s for t in ticks])
        assert np.allclose(deadlines, 0.04, atol=1e-6)
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("idle")  # type: ignore[attr-defined]


async def test_utterance_plays_every_sample_once_in_sync(
    sidecar: RunningSidecar, avatar_zip_path: Path, speech: SpeechClip
) -> None:
    recorder = await open_recorded_session(sidecar, "speak", avatar_zip_path)
    runtime = runtime_of(sidecar, "speak")
    events = Events()
    runtime.add_listener(events)
    try:
        pcm = speech_16k_pcm(speech)
        n_samples = len(pcm) // 2
        audio_input = AudioInput(runtime, "test")
        for start in range(0, len(pcm), 3200):  # 100 ms messages, faster than real time
            audio_input.push(pcm[start : start + 3200])
        utterance_id = audio_input.end_utterance()
        assert utterance_id is not None
        await until(lambda: bool(events.finished), timeout_s=15)

        speech_ticks = recorder.speech_ticks(utterance_id)
        frame_count = -(-n_samples // 640)
        assert len(speech_ticks) == frame_count
        # Consecutive clock frames, starting where playback_started said.
        assert events.started == [(utterance_id, "test", speech_ticks[0].frame_index)]
        assert [t.frame_index for t in speech_ticks] == list(
            range(speech_ticks[0].frame_index, speech_ticks[0].frame_index + frame_count)
        )
        assert sum(t.speech_samples for t in speech_ticks) == n_samples
        # The published audio is the sent audio (48 kHz), in order, each sample once.
        published = np.concatenate([t.audio_playout for t in speech_ticks])
        import soxr

        reference = soxr.resample(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, 16_000, 48_000)
        assert abs(len(published) - len(reference)) < 1920
        n = min(len(published), len(reference))
        assert np.corrcoef(published[:n], reference[:n])[0, 1] > 0.999
        # Lips follow the audio: loud frames open the mouth, silent frames show the idle frame.
        x1, y1, x2, y2 = mouth_box(sidecar, "speak")
        avatar = runtime.engine.avatar
        levels = np.array([np.sqrt(np.mean(np.square(t.audio_playout))) for t in speech_ticks])
        change = np.array(
            [
                np.abs(
                    t.frame_rgb[y1:y2, x1:x2].astype(np.float32)
                    - avatar.idle_frame(t.frame_index)[y1:y2, x1:x2].astype(np.float32)
                ).mean()
                for t in speech_ticks
            ]
        )
        loud = levels > 0.05
        assert loud.sum() > 20
        assert np.median(change[loud]) > 5.0
        assert np.corrcoef(levels, change)[0, 1] > 0.5
        # Finished, not interrupted, at the utterance's full length.
        assert events.finished == [(utterance_id, "test", pytest.approx(n_samples / 16_000), False)]
        stats = runtime.stats()
        assert stats.audio_samples_received == n_samples
        assert stats.audio_samples_rendered == n_samples
        assert stats.audio_samples_published == n_samples
        assert stats.audio_samples_pending == 0 and stats.audio_samples_rejected == 0
        assert stats.speech_frames == frame_count
        assert stats.dropped_frames == 0
        assert stats.ttff_ms is not None and stats.ttff_ms < 300
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("speak")  # type: ignore[attr-defined]


async def test_interrupt_flushes_and_cuts_to_idle_on_the_next_tick(
    sidecar: RunningSidecar, avatar_zip_path: Path, speech: SpeechClip
) -> None:
    recorder = await open_recorded_session(sidecar, "cut", avatar_zip_path)
    runtime = runtime_of(sidecar, "cut")
    events = Events()
    runtime.add_listener(events)
    try:
        pcm = speech_16k_pcm(speech)
        audio_input = AudioInput(runtime, "test")
        audio_input.push(pcm)  # the whole sentence at once: frames are rendered ahead
        audio_input.end_utterance()
        await until(lambda: len(recorder.speech_ticks()) >= 25)
        ticks_before = len(recorder.ticks)
        audio_input.interrupt()
        await until(lambda: len(recorder.ticks) >= ticks_before + 10)

        after = recorder.ticks[ticks_before:]
        assert all(t.kind is FrameKind.IDLE for t in after), [
            t.kind for t in after
        ]  # a hard cut: no crossfade
        assert not np.any(np.concatenate([t.audio_playout for t in after]))
        avatar = runtime.engine.avatar
        assert all(np.array_equal(t.frame_rgb, avatar.idle_frame(t.frame_index)) for t in after)
        assert recorder.interrupted_at  # the publisher was told
        played = sum(t.speech_samples for t in recorder.speech_ticks())
        assert len(events.finished) == 1
        _, _, position_s, interrupted = events.finished[0]
        assert interrupted and position_s == pytest.approx(played / 16_000)
        stats = runtime.stats()
        assert stats.audio_samples_flushed == len(pcm) // 2 - played
        assert stats.audio_samples_pending == 0
        assert_accounting(runtime)

        # The session goes on: the next utterance plays in full.
        second = pcm[: 16_000 * 2]  # 1 s
        audio_input.push(second)
        next_id = audio_input.end_utterance()
        await until(lambda: len(events.finished) == 2, timeout_s=10)
        assert events.finished[1][0] == next_id and not events.finished[1][3]
        assert sum(t.speech_samples for t in recorder.speech_ticks(next_id)) == 16_000
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("cut")  # type: ignore[attr-defined]


async def test_crossfade_when_an_utterance_ends_on_an_open_mouth(
    sidecar: RunningSidecar, avatar_zip_path: Path
) -> None:
    recorder = await open_recorded_session(sidecar, "fade", avatar_zip_path)
    runtime = runtime_of(sidecar, "fade")
    try:
        # 600 ms of a loud vowel-like tone that stops dead: the last speech frame has an open mouth.
        t = np.arange(9600) / 16_000
        tone = 0.5 * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
        audio_input = AudioInput(runtime, "test")
        audio_input.push((tone * 32767).astype("<i2").tobytes())
        utterance_id = audio_input.end_utterance()
        await until(lambda: len(recorder.speech_ticks(utterance_id)) == 15)
        await until(
            lambda: (
                recorder.ticks[-1].kind is FrameKind.IDLE and recorder.ticks[-2].kind is not FrameKind.SPEECH
            )
        )
        kinds = recorder.kinds()
        last_speech = max(i for i, k in enumerate(kinds) if k is FrameKind.SPEECH)
        assert kinds[last_speech + 1 : last_speech + 3] == [FrameKind.CROSSFADE, FrameKind.CROSSFADE]
        assert kinds[last_speech + 3] is FrameKind.IDLE
        x1, y1, x2, y2 = mouth_box(sidecar, "fade")
        avatar = runtime.engine.avatar

        def change(index: int) -> float:
            tick = recorder.ticks[index]
            idle = avatar.idle_frame(tick.frame_index)
            return float(np.abs(tick.frame_rgb[y1:y2, x1:x2].astype(float) - idle[y1:y2, x1:x2]).mean())

        fade = [change(last_speech + i) for i in range(4)]
        assert fade[0] > fade[1] > fade[2] > fade[3] == 0.0, fade
    finally:
        await sidecar.host.teardown("fade")  # type: ignore[attr-defined]


async def test_slow_client_pauses_the_utterance_without_losing_audio(
    sidecar: RunningSidecar, avatar_zip_path: Path, speech: SpeechClip
) -> None:
    recorder = await open_recorded_session(sidecar, "slow", avatar_zip_path)
    runtime = runtime_of(sidecar, "slow")
    try:
        pcm = speech_16k_pcm(speech)[: 16_000 * 2 * 2]  # 2 s
        audio_input = AudioInput(runtime, "test")
        audio_input.push(pcm[:8000])  # 250 ms, then a 300 ms stall, then the rest
        await asyncio.sleep(0.3)
        audio_input.push(pcm[8000:])
        utterance_id = audio_input.end_utterance()
        await until(
            lambda: sum(t.speech_samples for t in recorder.speech_ticks(utterance_id)) == len(pcm) // 2
        )
        assert runtime.counters.underrun_ticks > 0
        assert runtime.counters.render_misses == 0
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("slow")  # type: ignore[attr-defined]


async def test_an_utterance_without_end_of_utterance_ends_after_the_gap(
    sidecar: RunningSidecar, avatar_zip_path: Path
) -> None:
    recorder = await open_recorded_session(sidecar, "gap", avatar_zip_path)
    runtime = runtime_of(sidecar, "gap")
    try:
        audio_input = AudioInput(runtime, "test", PcmFormat(sample_rate_hz=48_000), utterance_gap_ms=200)
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(48_000 // 2) / 48_000) * 32767).astype("<i2")
        audio_input.push(tone.tobytes())  # 500 ms at 48 kHz, never ended by the client
        await until(lambda: audio_input.implicit_ends == 1, timeout_s=3)
        await until(lambda: runtime.timeline.pending_samples == 0 and not runtime.playing, timeout_s=5)
        assert sum(t.speech_samples for t in recorder.speech_ticks()) == 8000
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("gap")  # type: ignore[attr-defined]


@pytest.mark.parametrize("stall_s", [0.45, 0.2])  # long past the gap's due time / ending just after it
async def test_a_stalled_event_loop_does_not_split_the_utterance(
    sidecar: RunningSidecar, avatar_zip_path: Path, stall_s: float
) -> None:
    """The gap timer falls due while the loop is blocked (GC, a GIL-holding thread) and runs before the task
    that reads the audio the client sent meanwhile: it must look again, not end the utterance (it did: a
    3 s utterance was reported finished at 1.0 s)."""
    recorder = await open_recorded_session(sidecar, "stall-gap", avatar_zip_path)
    runtime = runtime_of(sidecar, "stall-gap")
    try:
        audio_input = AudioInput(runtime, "test", PcmFormat(sample_rate_hz=48_000), utterance_gap_ms=200)
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(48_000 // 4) / 48_000) * 32767).astype("<i2")
        loop = asyncio.get_running_loop()

        def stall() -> None:
            time.sleep(stall_s)  # the loop is blocked past the gap timer's due time
            # Audio that arrived during the stall: a socket read resolves a future, whose task runs one loop
            # iteration later, after the timers that fell due meanwhile.
            loop.call_soon(loop.call_soon, read_the_queued_audio)

        ended: list[int | None] = []

        def read_the_queued_audio() -> None:
            audio_input.push(tone.tobytes())
            ended.append(audio_input.end_utterance())

        audio_input.push(tone.tobytes())  # 250 ms
        loop.call_later(0.05, stall)
        await until(lambda: bool(ended), timeout_s=3)
        utterance_id = ended[0]
        await until(lambda: runtime.timeline.pending_samples == 0 and not runtime.playing, timeout_s=5)
        assert audio_input.implicit_ends == 0
        assert sum(t.speech_samples for t in recorder.speech_ticks(utterance_id)) == 2 * 4000
        assert_accounting(runtime)
    finally:
        await sidecar.host.teardown("stall-gap")  # type: ignore[attr-defined]


async def test_render_lane_runs_the_most_urgent_job_first_and_batches_queued_ones() -> None:
    calls: list[list[str]] = []
    gate = asyncio.Event()

    def render(requests: Sequence[object]) -> list[np.ndarray]:
        calls.append([str(r) for r in requests])
        return [np.zeros((2, 2, 3), np.uint8) for _ in requests]

    lane = RenderLane(render, max_batch_frames=8)
    loop = asyncio.get_running_loop()
    try:
        # Block the lane with a generic job until every render job is queued.
        blocker = asyncio.ensure_future(
            lane.call(0.0, lambda: asyncio.run_coroutine_threadsafe(gate.wait(), loop).result())
        )
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(lane.render(30.0, lambda: ["late-1", "late-2"]))
        urgent = asyncio.ensure_future(lane.render(10.0, lambda: ["urgent"]))
        middle = asyncio.ensure_future(lane.render(20.0, lambda: ["middle-1", "middle-2", "middle-3"]))
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        results = await asyncio.gather(urgent, middle, late)
        assert [len(r) for r in results] == [1, 3, 2]
        assert calls == [["urgent", "middle-1", "middle-2", "middle-3", "late-1", "late-2"]]
        assert lane.stats.largest_batch_frames == 6 and lane.stats.batches == 1
    finally:
        lane.close()


# A fake engine whose batches only sleep, for the H200-measured batch times of the full-size model × 0.75
# (bench/results/sessions-h200-20261130.json, an earlier run under `history`): one lane, six sessions
# streaming
# speech at real-time pace.
_SIM_COST_MS = {1: 13.0, 2: 19.0, 4: 26.0, 8: 38.0, 16: 60.0, 32: 90.0}
# The lane's batch times with the compiled engine on an H200 (the same file, an earlier run).
_H200_COMPILED_MS = {1: 9.3, 2: 15.0, 4: 20.0, 8: 27.5, 16: 49.0, 32: 86.0, 48: 123.0, 64: 158.0}


async def test_a_load_adaptive_planning_budget_holds_sessions_that_the_fixed_budget_drops() -> None:
    fixed = await simulate(6, _SIM_COST_MS, RuntimeConfig(max_render_budget_ms=40.0), duration_s=3.0)
    adaptive = await simulate(6, _SIM_COST_MS, RuntimeConfig(), duration_s=3.0)
    assert fixed.speech_frames == adaptive.speech_frames > 400  # 6 sessions × 2 utterances × 38 frames
    # 40 ms between a frame becoming ready and its tick cannot hold a batch in flight plus the frame's own.
    # (The lane skips the frames that would be late, so the misses stay below the load they would spiral
    # into.)
    assert fixed.dropped_frames > fixed.speech_frames // 10, fixed
    assert adaptive.dropped_frames == 0, adaptive
    # The price: utterances start later (more than the 40 ms minimum ahead), within the configured bound.
    bound_ms = RuntimeConfig().max_render_budget_ms
    assert all(40.0 < budget_ms <= bound_ms for budget_ms in adaptive.planned_budget_ms), (
        adaptive.planned_budget_ms
    )
    assert statistics.median(adaptive.ttff_ms) > statistics.median(fixed.ttff_ms)


async def test_past_full_load_the_misses_stay_near_the_excess_instead_of_spiralling() -> None:
    """9 sessions where 6-7 fit (the batch times of the H200 × 2.4, a 480 ms planning bound). Rendering the
    frames
    that are late anyway made the next ones late too: 81 % of the frames were missed in this simulation.
    Skipped,
    they leave the lane to the frames that can still be on time."""
    slow_ms = {bucket: 2.4 * ms for bucket, ms in _H200_COMPILED_MS.items()}
    result = await simulate(
        9, slow_ms, RuntimeConfig(), duration_s=6.0, utterance_s=3.0, gap_s=0.6, max_batch_frames=64
    )
    assert result.speech_frames > 1000
    assert 0 < result.dropped_frames < result.speech_frames // 2, result.dropped_frames


async def test_pipelined_batches_hold_a_load_that_batches_run_one_at_a_time_drop() -> None:
    """13 sessions; per batch the H200's batch times on the device, then host work of half that (frame
    assembly;
    half, to make the effect plain). One batch at a time the lane reaches 64 frames / (158 + 79) ms = 270 fps
    against 325 fps while all speak; pipelined (`render_async`), the host work overlaps the next batch's
    device
    time: 405 fps."""
    host_ms = {bucket: ms / 2 for bucket, ms in _H200_COMPILED_MS.items()}
    options: dict[str, Any] = {"duration_s": 6.0, "utterance_s": 3.0, "gap_s": 0.6, "max_batch_frames": 64}
    serial = await simulate(13, _H200_COMPILED_MS, RuntimeConfig(), host_ms=host_ms, **options)
    pipelined = await simulate(
        13, _H200_COMPILED_MS, RuntimeConfig(), host_ms=host_ms, pipelined=True, **options
    )
    assert serial.speech_frames == pipelined.speech_frames > 1500
    assert serial.dropped_frames > serial.speech_frames // 20, serial.dropped_frames
    # None in nearly every run alone, also beside a busy core. In full CI runs: 13 of 1,950 once, and 52 once,
    # all at
    # utterance frames 62-66: every session lost the same 4 frames, as one ~160 ms stall of the whole process
    # would
    # do (the serial lane pays such a stall too). Bounds with room for one stall, still far below the serial
    # lane's
    # ~17 % (326-337 of 1,950 here).
    assert pipelined.dropped_frames <= pipelined.speech_frames // 20, pipelined.dropped_frames
    assert pipelined.dropped_frames * 4 <= serial.dropped_frames, (
        pipelined.dropped_frames,
        serial.dropped_frames,
    )


async def test_one_session_keeps_the_minimum_planning_budget_and_its_first_frame_latency() -> None:
    result = await simulate(1, _SIM_COST_MS, RuntimeConfig(), duration_s=2.0)
    assert result.dropped_frames == 0
    assert result.planned_budget_ms and all(budget_ms == 40.0 for budget_ms in result.planned_budget_ms)
