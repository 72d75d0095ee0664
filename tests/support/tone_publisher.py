"""A participant that publishes a tone and a grey picture until it is terminated (a separate process, so
that a test can stop it with SIGSTOP as a stalled sidecar would be).

    python -m tests.support.tone_publisher URL TOKEN AUDIO_STREAM VIDEO_STREAM

It prints `published` once both tracks are up.
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
from livekit import rtc

SAMPLE_RATE_HZ = 48_000
BLOCK_S = 0.01  # audio is fed in 10 ms blocks, as WebRTC pulls it
BLOCKS_PER_FRAME = 4  # 25 fps
PICTURE_PX = 64


async def publish(url: str, jwt: str, audio_stream: str, video_stream: str) -> None:
    room = rtc.Room()
    await room.connect(url, jwt)
    audio = rtc.AudioSource(SAMPLE_RATE_HZ, 1, queue_size_ms=60)
    video = rtc.VideoSource(PICTURE_PX, PICTURE_PX)
    await room.local_participant.publish_track(
        rtc.LocalVideoTrack.create_video_track("video", video),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA, stream=video_stream),
    )
    await room.local_participant.publish_track(
        rtc.LocalAudioTrack.create_audio_track("audio", audio),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE, stream=audio_stream),
    )
    sys.stdout.write("published\n")
    sys.stdout.flush()
    samples = int(SAMPLE_RATE_HZ * BLOCK_S)
    tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(samples) / SAMPLE_RATE_HZ)).astype(np.int16).tobytes()
    picture = bytes(PICTURE_PX * PICTURE_PX * 4)
    started_s = time.monotonic()
    block = 0
    while True:
        now_s = time.monotonic()
        due = int((now_s - started_s) / BLOCK_S)
        if due - block > 6:  # resumed after a stop: what was due meanwhile is not sent late
            block = due
        await asyncio.sleep(max(0.0, started_s + block * BLOCK_S - now_s))
        await audio.capture_frame(rtc.AudioFrame(tone, SAMPLE_RATE_HZ, 1, samples))
        if block % BLOCKS_PER_FRAME == 0:
            video.capture_frame(rtc.VideoFrame(PICTURE_PX, PICTURE_PX, rtc.VideoBufferType.RGBA, picture))
        block += 1


if __name__ == "__main__":
    asyncio.run(publish(*sys.argv[1:5]))
