"""Speech in ticks an output cannot deliver is counted (`audio_samples_dropped`), so published + dropped == rendered
holds for every output, across a live switch too. No network: the outputs are used before (or without) connecting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infra.process import free_port
from realtime.host import LiveKitTarget
from realtime.media.encoder import EncoderSettings
from realtime.media.rtmp import RtmpPublisher
from realtime.publish.base import FrameKind, PublishTick
from realtime.publish.livekit import LiveKitPublisher, LiveKitPublisherOptions
from realtime.publish.recording import RecordingOutput
from realtime.publish.switch import SwitchableOutput
from tests.sidecar.recording import RecordingPublisher

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


def livekit_publisher() -> LiveKitPublisher:
    target = LiveKitTarget(url="ws://127.0.0.1:1", room="r", identity="avatar", token="t")
    return LiveKitPublisher(target, LiveKitPublisherOptions(width_px=WIDTH_PX, height_px=HEIGHT_PX))


async def test_a_disconnected_livekit_output_counts_the_speech_it_drops() -> None:
    publisher = livekit_publisher()  # never connected: every tick is dropped
    await publisher.publish(speech_tick(0, 640))
    await publisher.publish(speech_tick(1, 300))
    stats = publisher.stats()
    assert (stats.frames_dropped, stats.audio_samples_dropped, stats.audio_samples_published) == (2, 940, 0)


async def test_a_full_recording_queue_counts_the_speech_it_drops(tmp_path: Path) -> None:
    output = RecordingOutput(tmp_path / "r.mp4", WIDTH_PX, HEIGHT_PX, queue_size_frames=1)  # not started: no reader
    await output.publish(speech_tick(0, 640))
    await output.publish(speech_tick(1, 500))
    stats = output.stats()
    assert (stats.frames_dropped, stats.audio_samples_dropped) == (1, 500)


def test_a_full_rtmp_queue_counts_the_speech_it_drops() -> None:
    url = f"rtmp://127.0.0.1:{free_port()}/live/key"
    publisher = RtmpPublisher(url, EncoderSettings(width_px=WIDTH_PX, height_px=HEIGHT_PX), queue_size_frames=1)
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
