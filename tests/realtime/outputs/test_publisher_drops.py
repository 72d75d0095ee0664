"""Speech in ticks an output cannot deliver is counted (`audio_samples_dropped`), so published + dropped ==
rendered
holds for every output, across a live switch too. No network: the outputs are used before (or without)
connecting."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

from infra.process import free_port
from realtime.outputs.base import FrameKind, PublishTick
from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.livekit import LiveKitPublisher, LiveKitPublisherOptions
from realtime.outputs.recording import RecordingOutput
from realtime.outputs.registry import LiveKitTarget
from realtime.outputs.rtmp_stream import RtmpStreamWriter
from realtime.outputs.switch import SwitchableOutput
from tests.support.recording import RecordingPublisher

WIDTH_PX, HEIGHT_PX = 32, 32


def speech_tick(frame_index: int, speech_samples: int) -> PublishTick:
    return PublishTick(
        frame_index=frame_index,
        deadline_s=0.0,
        wall_time_us=0,
        frame_rgb=np.zeros((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8),
        audio_playout=np.zeros(1920, dtype=np.float32),
        speech_samples=speech_samples,
        kind=FrameKind.SPEECH,
        utterance_id=1,
    )


def livekit_publisher(clock: Callable[[], float] = time.monotonic) -> LiveKitPublisher:
    target = LiveKitTarget(url="ws://127.0.0.1:1", room="r", identity="avatar", token="t")
    return LiveKitPublisher(target, LiveKitPublisherOptions(width_px=WIDTH_PX, height_px=HEIGHT_PX), clock)


async def test_a_disconnected_livekit_output_counts_the_speech_it_drops() -> None:
    publisher = livekit_publisher()  # never connected: every tick is dropped
    await publisher.publish(speech_tick(0, 640))
    await publisher.publish(speech_tick(1, 300))
    stats = publisher.stats()
    assert (stats.frames_dropped, stats.audio_samples_dropped, stats.audio_samples_published) == (2, 940, 0)


async def test_a_full_recording_queue_counts_the_speech_it_drops(tmp_path: Path) -> None:
    output = RecordingOutput(
        tmp_path / "r.mp4", WIDTH_PX, HEIGHT_PX, queue_size_frames=1
    )  # not started: no reader
    await output.publish(speech_tick(0, 640))
    await output.publish(speech_tick(1, 500))
    stats = output.stats()
    assert (stats.frames_dropped, stats.audio_samples_dropped) == (1, 500)


def test_a_full_rtmp_queue_counts_the_speech_it_drops() -> None:
    url = f"rtmp://127.0.0.1:{free_port()}/live/key"
    publisher = RtmpStreamWriter(
        url, EncoderSettings(width_px=WIDTH_PX, height_px=HEIGHT_PX), queue_size_frames=1
    )
    tick = speech_tick(0, 0)
    publisher.submit(tick.frame_rgb, 0, tick.audio_playout, 0, 640)  # not started: nothing drains the queue
    publisher.submit(tick.frame_rgb, 1, tick.audio_playout, 1920, 200)
    assert (publisher.stats.frames_dropped, publisher.stats.speech_samples_dropped) == (1, 200)


async def test_a_switch_keeps_the_retired_outputs_dropped_speech() -> None:
    first = livekit_publisher()
    live = SwitchableOutput(first)
    await live.publish(speech_tick(0, 640))  # dropped: LiveKit is not connected
    await live.switch_to(RecordingPublisher(WIDTH_PX, HEIGHT_PX))
    await live.publish(speech_tick(1, 640))
    stats = live.stats()
    assert (stats.audio_samples_dropped, stats.audio_samples_published) == (640, 640)


class _SlowClosingPublisher(RecordingPublisher):
    """Its `close` waits for the test to release it: a stats sample can be taken mid-switch."""

    def __init__(self) -> None:
        super().__init__(WIDTH_PX, HEIGHT_PX)
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def close(self) -> None:
        self.closing.set()
        await self.release.wait()
        await super().close()


async def test_stats_sampled_while_the_old_output_closes_already_count_the_switch() -> None:
    """The status a workflow reads mid-switch must not pair the new output's name with the old counters
    (it did: a switch back showed `livekit` with `switch_backs` 0), nor lose the old output's frames."""
    first = _SlowClosingPublisher()
    live = SwitchableOutput(first)
    await live.publish(speech_tick(0, 640))
    replacement = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    switching = asyncio.create_task(live.switch_to(replacement, switch_back=True))
    await first.closing.wait()
    mid = live.stats()
    assert live.current is replacement and (mid.extra["switches"], mid.extra["switch_backs"]) == (1.0, 1.0)
    assert (mid.frames_published, mid.audio_samples_published) == (1, 640)
    first.release.set()
    await switching
    await live.publish(speech_tick(1, 640))
    after = live.stats()
    assert (after.frames_published, after.audio_samples_published, after.extra["switches"]) == (2, 1280, 1.0)


class FakeClock:
    """An injected monotonic clock: tests move it by hand (no sleeps)."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class _AudioSource:
    """Stands in for `rtc.AudioSource`: `capture_frame` fails, hangs, or queues (then `clear_queue` empties
    it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.queued = 0
        self.clears = 0
        self.frames: list[np.ndarray] = []  # every captured frame's int16 samples

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        if self.mode == "fail":
            raise RuntimeError("the room went away")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        self.queued += 1
        self.frames.append(np.frombuffer(frame.data, dtype=np.int16).copy())

    def clear_queue(self) -> None:
        self.clears += 1
        self.queued = 0

    async def aclose(self) -> None:
        pass


class _VideoSource:
    def capture_frame(self, frame: object, **kwargs: object) -> None:
        del frame, kwargs

    async def aclose(self) -> None:
        pass


def connected_publisher(
    source: _AudioSource, clock: Callable[[], float] = time.monotonic
) -> LiveKitPublisher:
    """A LiveKit output in the state a joined room leaves it, with a stand-in audio source (no network): its
    source started being pulled at `clock()`."""
    publisher = livekit_publisher(clock)
    publisher._stats.connected = True
    publisher._video_source = _VideoSource()  # type: ignore[assignment]
    publisher._audio_source = source  # type: ignore[assignment]
    publisher._source_clock.start(clock())
    return publisher


async def test_a_capture_that_fails_or_is_cancelled_counts_its_speech_as_dropped() -> None:
    failing = connected_publisher(_AudioSource("fail"))
    due_now = dataclasses.replace(speech_tick(0, 640), deadline_s=time.monotonic())
    with pytest.raises(RuntimeError):
        await failing.publish(due_now)
    stats = failing.stats()
    assert (stats.frames_dropped, stats.audio_samples_dropped, stats.audio_samples_published) == (1, 640, 0)

    hanging = connected_publisher(_AudioSource("hang"))
    due_now = dataclasses.replace(due_now, deadline_s=time.monotonic())
    task = asyncio.create_task(hanging.publish(due_now))  # the session stops mid-capture
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = hanging.stats()
    assert (stats.audio_samples_dropped, stats.audio_samples_published) == (640, 0)
    await hanging.close()
    await failing.close()


async def test_an_interrupt_takes_back_the_queued_speech_that_had_not_started_playing() -> None:
    source = _AudioSource("queue")
    clock = FakeClock(1000.0)
    publisher = connected_publisher(source, clock)
    # Three ticks queued on time; 100 ms later the first one is playing, the other two still wait in the
    # queue.
    for index, speech in enumerate((640, 640, 320)):
        await publisher.publish(
            dataclasses.replace(speech_tick(index, speech), deadline_s=1000.0 + 0.04 * index)
        )
    assert publisher.stats().audio_samples_published == 1600
    clock.now_s += 0.1
    publisher.interrupt(lambda _index: np.zeros((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8))
    stats = publisher.stats()
    assert source.clears == 1
    assert (stats.audio_samples_published, stats.audio_samples_dropped) == (640, 960)
    assert stats.extra["audio_samples_cleared"] == 960
    await publisher.close()


class _GatedAudioSource(_AudioSource):
    """A source whose captures complete only when the test opens the gate (a capture under way at an
    interrupt)."""

    def __init__(self) -> None:
        super().__init__("queue")
        self.gate = asyncio.Event()

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await self.gate.wait()
        await super().capture_frame(frame)


async def test_speech_whose_capture_was_under_way_at_an_interrupt_is_cleared_too() -> None:
    source = _GatedAudioSource()
    clock = FakeClock(1000.0)
    publisher = connected_publisher(source, clock)
    source.gate.set()
    await publisher.publish(dataclasses.replace(speech_tick(0, 640), deadline_s=1000.0))
    source.gate.clear()
    captured: list[tuple[int, FrameKind]] = []
    publisher._capture_video = lambda tick: captured.append((tick.frame_index, tick.kind))  # type: ignore[method-assign]
    publishing = asyncio.create_task(
        publisher.publish(dataclasses.replace(speech_tick(1, 640), deadline_s=1000.04))
    )
    await asyncio.sleep(0)  # tick 1's capture is under way ...
    clock.now_s += 0.01
    publisher.interrupt(lambda _index: np.zeros((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8))
    source.gate.set()  # ... and lands in the source after the clear
    await publishing
    for _ in range(5):
        await asyncio.sleep(0)  # the refill after the clear
    stats = publisher.stats()
    assert source.clears == 2 and stats.extra["audio_clears_after_capture"] == 1
    # Its frame, which was not waiting for its capture time yet at the interrupt, shows the idle frame too.
    assert sorted(captured) == [(0, FrameKind.IDLE), (1, FrameKind.IDLE)]
    assert (stats.audio_samples_published, stats.audio_samples_dropped) == (0, 1280)
    await publisher.close()


async def test_frames_waiting_for_their_capture_time_at_close_are_counted() -> None:
    """Before, they vanished from the accounting: frames handed in != published + dropped."""
    publisher = connected_publisher(_AudioSource("queue"))
    now_s = time.monotonic()
    for index in range(3):  # captured 70+ ms from now (deadline + headroom + video delay): still pending
        await publisher.publish(dataclasses.replace(speech_tick(index, 640), deadline_s=now_s + 0.04 * index))
    await publisher.close()
    stats = publisher.stats()
    assert (stats.frames_published, stats.frames_dropped) == (0, 0)
    assert stats.extra["frames_discarded_at_close"] == 3
