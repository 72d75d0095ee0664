"""RTMP(S) output as a session `Publisher`: the LiveKit fallback (H.264 zerolatency + AAC 48 kHz via PyAV).

Encoding and network I/O happen on the media thread of `realtime.outputs.rtmp_stream.RtmpStreamWriter`;
`publish` only enqueues, so a slow or dead RTMP server never stalls the session clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from realtime.outputs.base import SERVER_UNREACHABLE, PublisherStats, PublishTick
from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.rtmp_stream import RtmpStreamWriter
from realtime.outputs.rtmp_url import redact_rtmp_url, validate_rtmp_url


class RtmpOutput:
    def __init__(self, url: str, width_px: int, height_px: int, *, connect_timeout_s: float = 5.0) -> None:
        self.name = "rtmp"
        self.url = validate_rtmp_url(url)
        self._publisher = RtmpStreamWriter(
            url, EncoderSettings(width_px=width_px, height_px=height_px), connect_timeout_s=connect_timeout_s
        )
        # The first connect's steps: waiting for a thread to run it, then the connect itself (open + probe).
        self._connect_wait_s = 0.0
        self._connect_s = 0.0

    @property
    def detail(self) -> str:
        return redact_rtmp_url(self.url)

    async def start(self) -> None:
        # Connecting blocks on the network: keep it off the event loop.
        called_s = time.monotonic()

        def connect() -> None:
            began_s = time.monotonic()
            self._connect_wait_s = began_s - called_s
            try:
                self._publisher.start()
            finally:
                self._connect_s = time.monotonic() - began_s

        await asyncio.to_thread(connect)

    async def publish(self, tick: PublishTick) -> None:
        self._publisher.submit(
            tick.frame_rgb, tick.frame_index, tick.audio_playout, tick.audio_start_sample, tick.speech_samples
        )

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        self._publisher.replace_pending(idle_frame)

    async def close(self) -> None:
        await asyncio.to_thread(self._publisher.close)

    def stats(self) -> PublisherStats:
        raw = self._publisher.stats
        return PublisherStats(
            name=self.name,
            connected=raw.connected,
            frames_published=raw.frames_sent,
            frames_dropped=raw.frames_dropped,
            audio_samples_published=raw.speech_samples_sent,
            audio_samples_dropped=raw.speech_samples_dropped,
            playout_samples_published=raw.playout_samples_sent,
            reconnects=raw.reconnects,
            last_error=raw.last_error,
            extra={
                "audio_samples_flushed": float(raw.speech_samples_flushed),
                "connect_wait_s": round(self._connect_wait_s, 3),
                "connect_s": round(self._connect_s, 3),
                **({SERVER_UNREACHABLE: 1.0} if raw.unreachable and not raw.connected else {}),
            },
        )
