"""The LiveKit output re-anchors its audio on the session clock after any stall (realtime/outputs/avsync.py).

An injected clock and a stand-in audio source (no sleeps, no network): every test publishes
ticks as the session clock would, moves the clock as a stall would, and checks where each
tick's audio enters WebRTC (the queue model's prediction, which `SourceClock` tests check
against the source's own rules), what was dropped or padded, and that the sample accounting
stays exact.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from realtime.ingest.formats import PLAYOUT_SAMPLE_RATE_HZ
from realtime.outputs.avsync import SourceClock
from realtime.outputs.base import PublishTick
from realtime.outputs.livekit import LiveKitPublisher
from tests.realtime.outputs.test_publisher_drops import (
    FakeClock,
    _AudioSource,
    connected_publisher,
    speech_tick,
)

T0_S = 1000.0
TICK_S = 0.04
HEADROOM_S = 0.06  # LiveKitPublisherOptions.audio_headroom_ms
BLOCK = 480  # one 10 ms pull at 48 kHz


def tick(index: int, *, speech: int = 640) -> PublishTick:
    """Tick `index` of a clock started at T0_S, with a ramp as audio (so dropped heads are recognisable)."""
    ramp = ((np.arange(1920) + index * 1920) % 30000 / 32767.0).astype(np.float32)
    return dataclasses.replace(
        speech_tick(index, speech), deadline_s=T0_S + index * TICK_S, audio_playout=ramp
    )


def first_samples(source: _AudioSource) -> list[int]:
    return [int(frame[0]) for frame in source.frames]


async def publish_on_time(
    publisher: LiveKitPublisher, clock: FakeClock, indices: range, late_s: float = 0.0
) -> None:
    for index in indices:
        clock.now_s = T0_S + index * TICK_S + late_s
        await publisher.publish(tick(index))


def anchor_error_ms(publisher: LiveKitPublisher, index: int, clock: FakeClock) -> float:
    """Where the next sample would enter WebRTC vs where tick `index`'s audio belongs (+ = audio late)."""
    predicted_s = publisher._source_clock.predicted_start_s(clock())
    return (predicted_s - (T0_S + index * TICK_S + HEADROOM_S)) * 1000.0


def assert_accounting(publisher: LiveKitPublisher, speech_total: int) -> None:
    stats = publisher.stats()
    assert stats.audio_samples_published + stats.audio_samples_dropped == speech_total, stats


async def test_ticks_on_time_keep_the_audio_on_its_anchor_with_one_initial_pad() -> None:
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(20), late_s=0.01)  # loop jitter well inside the headroom
    extra = publisher.stats().extra
    # The first tick fills the queue: 10 ms late, its audio would enter WebRTC 50 ms before its anchor.
    assert extra["audio_resync_padded"] == 1 and extra["audio_resync_padded_samples"] == 5 * BLOCK
    assert "audio_resync_dropped" not in extra
    assert abs(anchor_error_ms(publisher, 20, clock)) < 1.0
    assert publisher.stats().audio_samples_published == 20 * 640
    await publisher.close()


async def test_after_a_stall_the_late_audio_is_dropped_and_the_next_tick_is_back_on_its_anchor() -> None:
    """The event loop stalls 172 ms (below the clock's resync threshold): the clock then bursts the missed
    ticks.
    Their audio is late (silence went out meanwhile): it is dropped, counted, and the audio is back in
    step."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(10))
    stalled_until_s = T0_S + 10 * TICK_S + 0.172
    clock.now_s = stalled_until_s
    for index in range(10, 15):  # ticks 10..14 were due during the stall: all published at once
        await publisher.publish(tick(index))
    stats = publisher.stats()
    # Tick 10's audio belonged in WebRTC at +60 ms, it is 112 ms late: dropped whole; tick 11 (72 ms late)
    # too;
    # tick 12 is 32 ms late: its head (30 ms, whole blocks) is dropped; ticks 13-14 are on their anchors.
    dropped_playout = stats.extra["audio_resync_dropped_samples"]
    assert dropped_playout == 2 * 1920 + 3 * BLOCK
    assert stats.audio_samples_dropped == 2 * 640 + 3 * BLOCK // 3
    assert abs(anchor_error_ms(publisher, 15, clock)) <= 5.0
    # Tick 12's first kept sample is its 1440th (the ramp shows which part went out).
    assert first_samples(source)[-3] == publisher._to_int16(tick(12).audio_playout)[3 * BLOCK]
    await publish_on_time(publisher, clock, range(15, 25))
    assert publisher.stats().extra["audio_resync_dropped"] == 3  # no further correction once back in step
    assert_accounting(publisher, 25 * 640)
    await publisher.close()


async def test_a_small_slip_in_speech_keeps_the_words_and_the_next_silence_absorbs_it() -> None:
    """A 50 ms hiccup mid-utterance: the late speech is kept (audio up to two frames late is the side viewers
    tolerate); the first silent tick drops its own silence to bring the audio back on its anchor."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    clock.now_s = T0_S + 5 * TICK_S + HEADROOM_S + 0.05  # tick 5 comes 50 ms after its audio was due
    await publisher.publish(tick(5))
    await publish_on_time(publisher, clock, range(6, 8), late_s=HEADROOM_S + 0.05)
    assert "audio_resync_dropped" not in publisher.stats().extra  # no word lost
    assert anchor_error_ms(publisher, 8, clock) == pytest.approx(50.0, abs=1.0)
    clock.now_s = T0_S + 8 * TICK_S
    await publisher.publish(dataclasses.replace(tick(8, speech=0), audio_playout=np.zeros(1920, np.float32)))
    # The silent tick is dropped whole (silence, not speech): 40 of the 50 ms; the 10 ms left are inside the
    # tolerance (one pull block cannot be split).
    assert publisher.stats().extra["audio_resync_dropped_samples"] == 1920
    assert anchor_error_ms(publisher, 9, clock) == pytest.approx(10.0, abs=1.0)
    assert_accounting(publisher, 8 * 640)
    await publisher.close()


async def test_a_pull_thread_that_fell_behind_is_measured_and_the_excess_queue_dropped() -> None:
    """CPU starvation: the source handed WebRTC 150 ms less than real time says (its queue is that much deeper
    than
    meant, so the audio would play 150 ms behind the lips). The next calibration shows it; the excess is
    dropped."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    # The first measurement finds the sender's count 20 ms behind the model (it starts counting when its
    # transport is up): it only sets where the count stands, the queue keeps its depth.
    queued = publisher._source_clock.queued_samples(clock())
    publisher._source_clock.calibrate(
        publisher._source_clock.position(clock()) - 20 * 48 - BLOCK // 2, clock()
    )
    assert publisher._source_clock.queued_samples(clock()) == queued
    await publish_on_time(publisher, clock, range(5, 10))
    assert "audio_resync_dropped" not in publisher.stats().extra
    measured_at_s = clock()
    # The sender's count moves in whole pulls: between two pulls the position is half a block past it.
    pulled = (
        publisher._source_clock.position(measured_at_s) - 150 * PLAYOUT_SAMPLE_RATE_HZ // 1000 - BLOCK // 2
    )
    publisher._source_clock.calibrate(pulled, measured_at_s)
    assert publisher._source_clock.last_calibration_error_ms == pytest.approx(-150.0)
    assert anchor_error_ms(publisher, 10, clock) == pytest.approx(150.0, abs=1.0)
    await publish_on_time(publisher, clock, range(10, 14))  # ticks 10-12 dropped whole, tick 13's first 30 ms
    extra = publisher.stats().extra
    assert extra["audio_resync_dropped_samples"] == 150 * 48
    assert abs(anchor_error_ms(publisher, 14, clock)) <= 5.0
    assert_accounting(publisher, 14 * 640)
    await publisher.close()


async def test_a_queue_shallower_than_its_anchor_is_padded_with_silence() -> None:
    """The clock restarted past a long stall while the source kept pulling (silence): the next tick would
    enter
    WebRTC at once, 60 ms before the video it belongs to. Silence is queued in front of it instead."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    restarted_s = T0_S + 5 * TICK_S + 0.4  # the session clock restarts from here: tick 5 is due now
    clock.now_s = restarted_s
    await publisher.publish(dataclasses.replace(tick(5), deadline_s=restarted_s))
    frames = source.frames
    assert len(frames[-1]) == 6 * BLOCK + 1920 and not frames[-1][: 6 * BLOCK].any()
    assert publisher.stats().extra["audio_resync_padded"] == 2
    assert_accounting(publisher, 6 * 640)
    await publisher.close()


async def test_the_send_side_av_offset_is_measured_per_frame_and_alarms_past_its_threshold() -> None:
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    video_delay_s = publisher.options.video_delay_ms / 1000.0
    await publish_on_time(publisher, clock, range(3))
    for index, video_late_s in (
        (0, 0.0),
        (1, 0.004),
        (2, 0.090),
    ):  # frame 2 leaves 90 ms late (a stalled loop)
        clock.now_s = T0_S + index * TICK_S + HEADROOM_S + video_delay_s + video_late_s
        publisher._pending_video.pop(index)[0].cancel()
        publisher._capture_video(tick(index))
    extra = publisher.stats().extra
    assert extra["av_offset_ms_min"] == pytest.approx(0.0, abs=0.01)
    assert extra["av_offset_ms"] == pytest.approx(90.0, abs=0.01)
    assert extra["av_offset_alarms"] == 1
    assert extra["av_offset_frames"] == 3
    assert extra["av_offset_frames_past_late_speech"] == 1  # 90 ms: past the 80 ms a stall in speech may keep
    await publisher.close()


def test_calibration_nudges_the_model_on_jitter_and_takes_a_jump_at_once() -> None:
    model = SourceClock(48_000, BLOCK)
    model.start(0.0)
    model.calibrate(24_000 - BLOCK // 2, 0.5)  # the first one: where the count stands
    model.calibrate(48_000 + 8 * 48 - BLOCK // 2, 1.0)  # 8 ms ahead of the model: pull-thread jitter
    assert model.last_calibration_error_ms == pytest.approx(8.0)
    assert model.position(1.0) == 48_000 + 2 * 48  # moved a quarter of the way
    model.calibrate(96_000 - 200 * 48 - BLOCK // 2, 2.0)  # 200 ms behind: the pull thread was stopped
    assert model.position(2.0) == 96_000 - 200 * 48


def test_a_count_that_stopped_while_the_source_drained_is_rebased_not_taken_as_a_deep_queue() -> None:
    """The sender's transport was down 2 s (its count froze) while the source kept draining: a 2 s queue
    cannot
    exist in a 200 ms source, so the measurement only moves where the count stands; no speech is dropped."""
    model = SourceClock(48_000, BLOCK, capacity_samples=9600)
    model.start(0.0)
    model.calibrate(48_000 - BLOCK // 2, 1.0)
    model.captured(2880, 1.0)  # 60 ms queued
    model.calibrate(48_000 + 10 * 48 - BLOCK // 2, 3.0)  # 2 s later the count moved only 10 ms
    assert model.rebases == 1
    assert model.queued_samples(3.0) == 0  # drained, as the source did
    model.captured(1920, 3.0)
    plan = model.plan(3.06, 1920, 3.0, tolerance_samples=720, max_pad_samples=7680)
    assert plan.drop_samples == 0


def test_the_queue_model_follows_the_sources_rules() -> None:
    """A sample captured now enters WebRTC at max(end of queue, now); an empty queue lets silence out."""
    model = SourceClock(48_000, BLOCK)
    model.start(10.0)
    model.captured(4800, 10.0)  # 100 ms queued at t=10
    assert model.queued_samples(10.05) == 2400
    assert model.predicted_start_s(10.05) == pytest.approx(10.1)
    assert model.queued_samples(10.3) == 0  # drained; silence went out since 10.1
    model.captured(960, 10.3)
    assert model.predicted_start_s(10.3) == pytest.approx(10.32)
    # A late tick (anchor 60 ms in the past) is dropped in whole blocks, at most its own length.
    late = model.plan(10.26, 1920, 10.3, tolerance_samples=BLOCK, max_pad_samples=7680)
    assert (late.drop_samples, late.pad_samples) == (1920, 0)
    assert late.error_ms == pytest.approx(60.0)
    # An early one (anchor 50 ms after where it would go) is padded with whole blocks.
    early = model.plan(10.37, 1920, 10.3, tolerance_samples=BLOCK, max_pad_samples=7680)
    assert (early.drop_samples, early.pad_samples) == (0, 5 * BLOCK)
    # Never padded past the source's capacity (a full source would block the clock).
    capped = model.plan(11.0, 1920, 10.3, tolerance_samples=BLOCK, max_pad_samples=3 * BLOCK)
    assert capped.pad_samples == BLOCK  # 960 (2 blocks) already queued, room for 3
    # Inside the tolerance nothing changes.
    steady = model.plan(10.325, 1920, 10.3, tolerance_samples=BLOCK, max_pad_samples=7680)
    assert (steady.drop_samples, steady.pad_samples) == (0, 0)


async def test_a_stall_renews_the_audio_track_in_the_next_silence_not_in_speech() -> None:
    """Receivers' jitter buffers grow on the late audio of a stall and keep it
    (LiveKitPublisher._maybe_renew_audio_
    track): a stall past `renew_audio_after_stall_ms` renews the track, but only once no speech has entered
    WebRTC
    for `renew_audio_idle_ms`, so that no words are cut."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    publisher.options = dataclasses.replace(publisher.options, renew_audio_after_stall_ms=100.0)
    renewals: list[float] = []

    async def renew(room: object) -> None:
        renewals.append(clock())
        publisher._renew_task = None

    publisher._room = object()  # type: ignore[assignment]
    publisher._renew_audio_track = renew  # type: ignore[method-assign]
    await publish_on_time(publisher, clock, range(10))
    clock.now_s = T0_S + 10 * TICK_S + 0.25  # the process stopped for 250 ms in speech
    await publisher.publish(tick(10))
    assert publisher.stats().extra["audio_track_renewals_wanted"] == 1
    for index in range(11, 20):  # the rest of the utterance, on time again: no renewal in speech
        clock.now_s = T0_S + index * TICK_S + 0.25
        await publisher.publish(tick(index))
        await asyncio.sleep(0)
    assert renewals == []
    speech_end_s = publisher._speech_end_s
    for index in range(20, 40):  # silence: the renewal waits until the speech's tail has played out
        clock.now_s = T0_S + index * TICK_S + 0.25
        await publisher.publish(tick(index, speech=0))
        await asyncio.sleep(0)
    assert len(renewals) == 1, renewals
    assert renewals[0] - speech_end_s >= publisher.options.renew_audio_idle_ms / 1000.0
    # A short stall (below the threshold) asks for nothing.
    clock.now_s += 0.08
    await publisher.publish(tick(40, speech=0))
    assert publisher.stats().extra["audio_track_renewals_wanted"] == 1
    await publisher.close()


async def test_a_frame_a_stall_held_past_its_capture_time_is_dropped_not_sent_late() -> None:
    """Sent late with its capture timestamp it would grow receivers' video jitter buffers, as late audio
    does."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(2))
    capture_s = HEADROOM_S + publisher.options.video_delay_ms / 1000.0
    for index, late_s in (
        (0, 0.1),
        (1, 0.25),
    ):  # frame 0 100 ms late (kept), frame 1 250 ms (after a SIGSTOP)
        clock.now_s = T0_S + index * TICK_S + capture_s + late_s
        publisher._pending_video.pop(index)[0].cancel()
        publisher._capture_video(tick(index))
    stats = publisher.stats()
    assert (stats.frames_published, stats.frames_dropped) == (1, 1)
    assert stats.extra["video_frames_dropped_late"] == 1
    await publisher.close()


async def test_playback_events_wait_for_audio_that_entered_webrtc_late() -> None:
    """In speech, audio up to two frames late is kept: its utterance is heard that much later, and the
    playback
    events (scheduled with `playout_delay_s`) wait for it."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    nominal_s = publisher.playout_delay_s()
    assert nominal_s == pytest.approx(
        HEADROOM_S + publisher.options.receiver_audio_delay_ms / 1000.0, abs=0.005
    )
    # Ticks 100 ms late from tick 5 on: the 60 ms headroom ran dry, tick 5's audio enters WebRTC 40 ms after
    # its
    # anchor and, being speech within two frames, stays there.
    await publish_on_time(publisher, clock, range(5, 8), late_s=0.1)
    assert publisher.playout_delay_s() - nominal_s == pytest.approx(0.04, abs=0.011)
    await publisher.close()


async def test_silence_is_kept_in_reserve_while_idle_and_cleared_when_speech_starts() -> None:
    """While idle the source is kept `idle_audio_reserve_ms` deep in silence, but only once the last speech
    sample has entered WebRTC; the next speech tick clears that silence and enters WebRTC at its anchor, with
    no word dropped."""
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    reserve_ms = 300
    publisher.options = dataclasses.replace(
        publisher.options, idle_audio_reserve_ms=reserve_ms, audio_queue_ms=reserve_ms + 100
    )
    await publish_on_time(publisher, clock, range(5))  # speech
    clock.now_s = T0_S + 5 * TICK_S
    await publisher.publish(tick(5, speech=0))
    # Tick 4's speech is still queued (it enters WebRTC until +100 ms): the first silent tick keeps its
    # anchor.
    assert abs(anchor_error_ms(publisher, 6, clock)) < 1.0
    for index in range(6, 12):
        clock.now_s = T0_S + index * TICK_S
        await publisher.publish(tick(index, speech=0))
    # Idle: the queue grew to the reserve (and the tick just queued) and no A/V offset is taken on it.
    queued_ms = publisher._source_clock.queued_samples(clock()) * 1000 / PLAYOUT_SAMPLE_RATE_HZ
    assert queued_ms == pytest.approx(reserve_ms + 1000 * TICK_S, abs=1.0)
    assert all(publisher._audio_residual_s[index] is None for index in range(7, 12))
    clears_before = source.clears
    clock.now_s = T0_S + 12 * TICK_S
    await publisher.publish(tick(12))  # speech again
    assert source.clears == clears_before + 1
    assert publisher.stats().extra["audio_silence_clears"] == 1
    assert abs(anchor_error_ms(publisher, 13, clock)) < 1.0
    assert publisher._audio_residual_s[12] == pytest.approx(0.0, abs=0.001)
    assert "audio_resync_dropped" not in publisher.stats().extra
    assert publisher.stats().audio_samples_published == 6 * 640
    await publisher.close()


async def test_a_stall_in_silence_shorter_than_the_reserve_leaves_the_source_a_queue_to_pull() -> None:
    """A 250 ms stop while idle: the source still held silence for every pull of it (none sent nothing, so
    the RTP clock stayed on real time); with the reserve off the same stall runs the queue dry."""
    for reserve_ms, runs_dry in ((300, False), (0, True)):
        clock, source = FakeClock(T0_S), _AudioSource("queue")
        publisher = connected_publisher(source, clock)
        publisher.options = dataclasses.replace(
            publisher.options, idle_audio_reserve_ms=reserve_ms, audio_queue_ms=max(200, reserve_ms + 100)
        )
        for index in range(12):
            clock.now_s = T0_S + index * TICK_S
            await publisher.publish(tick(index, speech=0))
        queued_s = publisher._source_clock.queued_samples(clock()) / PLAYOUT_SAMPLE_RATE_HZ
        assert (queued_s < 0.25) is runs_dry, (reserve_ms, queued_s)
        await publisher.close()


async def test_the_output_says_when_an_utterances_last_speech_sample_is_heard() -> None:
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    # Tick 4's audio enters WebRTC at its anchor (+60 ms) and lasts a tick; receivers hear it their delay
    # later.
    expected_s = T0_S + 4 * TICK_S + HEADROOM_S + TICK_S + publisher.options.receiver_audio_delay_ms / 1000.0
    assert publisher.speech_heard_at_s(1) == pytest.approx(expected_s, abs=0.001)
    assert publisher.speech_heard_at_s(2) is None  # an utterance it never sent
    await publisher.close()


async def test_an_interrupt_records_how_long_speech_still_entered_webrtc() -> None:
    clock, source = FakeClock(T0_S), _AudioSource("queue")
    publisher = connected_publisher(source, clock)
    await publish_on_time(publisher, clock, range(5))
    publisher.interrupt(lambda index: np.zeros((2, 2, 3), dtype=np.uint8))
    await asyncio.sleep(0)  # the refill
    extra = publisher.stats().extra
    # Cleared at once: only the pull block in progress carried speech.
    assert extra["audio_interrupt_tail_ms_last"] == pytest.approx(10.0)
    assert not publisher._source_clock.speech_queued(clock())
    await publisher.close()


async def test_a_stall_in_silence_the_reserve_covered_asks_for_no_renewal() -> None:
    """The reserve sent receivers no late audio through it, so there is no jitter buffer to reset; with the
    reserve off the same stall asks for a renewal."""
    for reserve_ms, wanted in ((300, 0.0), (0, 1.0)):
        clock, source = FakeClock(T0_S), _AudioSource("queue")
        publisher = connected_publisher(source, clock)
        publisher.options = dataclasses.replace(
            publisher.options,
            renew_audio_after_stall_ms=100.0,
            idle_audio_reserve_ms=reserve_ms,
            audio_queue_ms=max(200, reserve_ms + 100),
        )
        for index in range(10):
            clock.now_s = T0_S + index * TICK_S
            await publisher.publish(tick(index, speech=0))
        clock.now_s = T0_S + 10 * TICK_S + 0.25  # stopped for 250 ms while idle
        await publisher.publish(tick(10, speech=0))
        assert publisher.stats().extra.get("audio_track_renewals_wanted", 0.0) == wanted, reserve_ms
        await publisher.close()
