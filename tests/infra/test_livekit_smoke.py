"""Two livekit.rtc participants exchange video and audio through the real livekit-server, on loopback only."""

from __future__ import annotations

import asyncio
import ipaddress
import os

import numpy as np
import pytest
from livekit import api, rtc

from infra.livekit import LiveKitServerConfig
from infra.process import ManagedProcess
from tests.support.netcheck import ice_remote_addresses, off_host_peers

pytestmark = pytest.mark.service

WIDTH_PX, HEIGHT_PX = 320, 240
SAMPLE_RATE_HZ = 48_000
FRAME_RATE_FPS = 25


def _token(config: LiveKitServerConfig, identity: str, room: str) -> str:
    return (
        api.AccessToken(config.api_key, config.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


async def _publish(source_v: rtc.VideoSource, source_a: rtc.AudioSource, stop: asyncio.Event) -> None:
    samples_per_frame = SAMPLE_RATE_HZ // FRAME_RATE_FPS
    t = np.arange(samples_per_frame) / SAMPLE_RATE_HZ
    index = 0
    while not stop.is_set():
        rgba = np.zeros((HEIGHT_PX, WIDTH_PX, 4), dtype=np.uint8)
        rgba[..., 0] = (index * 7) % 256
        rgba[..., 1] = np.linspace(0, 255, WIDTH_PX, dtype=np.uint8)[None, :]
        rgba[..., 3] = 255
        source_v.capture_frame(rtc.VideoFrame(WIDTH_PX, HEIGHT_PX, rtc.VideoBufferType.RGBA, rgba.tobytes()))
        tone = (0.3 * np.sin(2 * np.pi * 440 * (t + index / FRAME_RATE_FPS)) * 32767).astype(np.int16)
        await source_a.capture_frame(rtc.AudioFrame(tone.tobytes(), SAMPLE_RATE_HZ, 1, samples_per_frame))
        index += 1
        await asyncio.sleep(1 / FRAME_RATE_FPS)


async def test_two_participants_exchange_video_and_audio(
    livekit_service: tuple[LiveKitServerConfig, ManagedProcess],
) -> None:
    config, server = livekit_service
    room_name = "smoke-room"
    publisher, subscriber = rtc.Room(), rtc.Room()
    video_frames: list[rtc.VideoFrame] = []
    audio_frames: list[rtc.AudioFrame] = []
    got_enough = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def read_video(track: rtc.Track) -> None:
        async for event in rtc.VideoStream(track):
            video_frames.append(event.frame)
            if len(video_frames) >= 10 and len(audio_frames) >= 10:
                got_enough.set()

    async def read_audio(track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=SAMPLE_RATE_HZ, num_channels=1):
            audio_frames.append(event.frame)

    @subscriber.on("track_subscribed")
    def on_track(track: rtc.Track, *_: object) -> None:
        reader = read_video if track.kind == rtc.TrackKind.KIND_VIDEO else read_audio
        tasks.append(asyncio.create_task(reader(track)))

    await subscriber.connect(config.ws_url, _token(config, "viewer", room_name))
    await publisher.connect(config.ws_url, _token(config, "avatar", room_name))
    video_source = rtc.VideoSource(WIDTH_PX, HEIGHT_PX)
    audio_source = rtc.AudioSource(SAMPLE_RATE_HZ, 1)
    await publisher.local_participant.publish_track(
        rtc.LocalVideoTrack.create_video_track("smoke_video", video_source),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA),
    )
    await publisher.local_participant.publish_track(
        rtc.LocalAudioTrack.create_audio_track("smoke_audio", audio_source),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
    )
    stop = asyncio.Event()
    pump = asyncio.create_task(_publish(video_source, audio_source, stop))
    try:
        await asyncio.wait_for(got_enough.wait(), timeout=30)

        # Loopback only: every ICE peer, and every connected socket of the server and of this process.
        for room in (publisher, subscriber):
            remotes = await ice_remote_addresses(room)
            assert remotes, "no ICE candidates reported"
            assert all(ipaddress.ip_address(a).is_loopback for a in remotes), remotes
        assert server.pid is not None
        assert off_host_peers(server.pid) == []
        assert off_host_peers(os.getpid()) == []
    finally:
        stop.set()
        await pump
        for task in tasks:
            task.cancel()
        await publisher.disconnect()
        await subscriber.disconnect()

    assert len(video_frames) >= 10
    assert all((f.width, f.height) == (WIDTH_PX, HEIGHT_PX) for f in video_frames)
    assert len(audio_frames) >= 10
    received = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in audio_frames])
    assert np.abs(received).max() > 1000, "audio frames arrived but carried silence"
