"""LiveKit output: `avatar_audio` (microphone) + `avatar_video` (camera), paced by the session clock.

One clock, the audio's: every tick the clock hands over frame N and the 1920 samples that
play while it is shown. The audio goes into the `AudioSource` at once; the source hands
10 ms to WebRTC every 10 ms from its own timer, and when its queue is empty at one of those
pulls it sends nothing, so the receiver conceals a gap and its audio slips 10 ms against
the video for good. A tick only 10-20 ms late (a busy event loop, a shared CPU) would do
that, so the queue is kept `audio_headroom_ms` deep: before the first tick (and again after
a disconnect or an interrupt) it is filled with silence up to `deadline + headroom`, so
tick N's audio enters WebRTC at its deadline + headroom, whatever the loop's jitter up to
the headroom. The frame is captured at deadline + headroom + `video_delay_ms`. That delay
exists because the two paths are not equally long at a receiver: Opus packetizes 20 ms at a time
and the receiver's jitter buffer holds audio a little longer than video, so at a LiveKit
native-SDK subscriber (Python/Rust/agents, which do no lip-sync of their own) a frame
captured at the same instant as its audio arrives ~35-45 ms before that audio. Holding
video by ~20 ms splits that error: the native subscriber sees video ~20 ms early, and a
browser that lip-syncs by capture time (both tracks share one `stream`) sees it ~20 ms
late — both inside one frame. tests/sidecar measures it; docs/audio-protocol.md explains it.
With `publish_audio` off there is no audio queue, and frames are captured at deadline + `video_delay_ms`.

An interrupt clears the source's queue (the speech already queued never goes out) and
refills it with silence up to the next tick's deadline + headroom: the audio stops at once
and the audio/video alignment is re-anchored on the session clock (error < 10 ms, not
cumulative over interrupts).

Every frame carries metadata: `frame_id` = the session clock's frame number and
`user_timestamp` = the tick's deadline in Unix microseconds, so a subscriber can measure
end-to-end latency per frame and match frames to audio positions.

Reconnects: the SDK resumes short outages itself; when it gives up (`disconnected` not
caused by us) the publisher joins again with backoff on a fresh `rtc.Room` and republishes
the same sources. Ticks while disconnected are counted as dropped, never queued (live).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from livekit import rtc
from livekit.rtc._proto import room_pb2, track_pb2, video_frame_pb2

from realtime.host import LiveKitTarget
from realtime.media.errors import OutputError
from realtime.publish.base import FrameKind, PublisherStats, PublishTick

logger = logging.getLogger(__name__)

AUDIO_TRACK_NAME = "avatar_audio"
VIDEO_TRACK_NAME = "avatar_video"
PUBLISH_ON_BEHALF_ATTRIBUTE = "lk.publish_on_behalf"
PLAYOUT_SAMPLE_RATE_HZ = 48_000


class LiveKitConnectError(OutputError):
    code = "livekit_connect_failed"


class LiveKitPublishError(OutputError):
    code = "livekit_publish_failed"


@dataclass(frozen=True)
class LiveKitPublisherOptions:
    width_px: int
    height_px: int
    frame_rate_fps: int = 25
    video_delay_ms: float = 40.0  # see the module docstring
    max_video_bitrate_bps: int = 1_500_000
    audio_headroom_ms: int = 60  # audio kept queued ahead of WebRTC's 10 ms pulls: absorbs clock jitter
    audio_queue_ms: int = 200  # the source's capacity: headroom + two 40 ms ticks (a refill, then a tick)
    connect_timeout_s: float = 10.0
    reconnect_backoff_initial_s: float = 0.5
    reconnect_backoff_max_s: float = 5.0
    stream_name: str = "avatar"  # both tracks in one stream: receivers that lip-sync do so by it

    def __post_init__(self) -> None:
        # WebRTC encoders need >= 16 px; I420 needs even dimensions.
        if self.width_px < 16 or self.height_px < 16 or self.width_px % 2 or self.height_px % 2:
            raise ValueError(f"video size {self.width_px}x{self.height_px} must be even and at least 16x16")
        # The source pulls whole 10 ms blocks; the headroom plus a tick must fit in its queue.
        if self.audio_headroom_ms < 0 or self.audio_headroom_ms % 10:
            raise ValueError(f"audio_headroom_ms {self.audio_headroom_ms} must be a non-negative multiple of 10")
        if self.audio_headroom_ms + 2 * (1000 // self.frame_rate_fps) > self.audio_queue_ms:
            raise ValueError(f"audio_queue_ms {self.audio_queue_ms} cannot hold the headroom plus two ticks")


RoomListener = Callable[[rtc.Room], None]

# Disconnects that were decided by someone (server API, a newer participant with our identity): no rejoin.
FINAL_DISCONNECT_REASONS = frozenset(
    {"DUPLICATE_IDENTITY", "PARTICIPANT_REMOVED", "ROOM_DELETED", "ROOM_CLOSED", "USER_REJECTED"}
)


def _disconnect_reason_name(reason: object) -> str:
    if isinstance(reason, int):
        try:
            return str(rtc.DisconnectReason.Name(rtc.DisconnectReason.ValueType(reason)))
        except ValueError:
            return str(reason)
    return str(reason)


class LiveKitPublisher:
    """Publishes one session into one room as the avatar participant."""

    def __init__(self, target: LiveKitTarget, options: LiveKitPublisherOptions) -> None:
        self.name = "livekit"
        self.target = target
        self.options = options
        self._stats = PublisherStats(name=self.name)
        self._room: rtc.Room | None = None
        self._audio_source: rtc.AudioSource | None = None
        self._video_source: rtc.VideoSource | None = None
        self._room_listeners: list[RoomListener] = []
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        # Frames waiting for their capture time (deadline + headroom + video delay), by frame index.
        self._pending_video: dict[int, tuple[asyncio.TimerHandle, PublishTick]] = {}
        # Audio queue anchoring (see the module docstring): captures and refills are serialised by the lock.
        self._audio_lock = asyncio.Lock()
        self._audio_anchored = False
        self._next_tick_deadline_s: float | None = None  # where the next tick's audio belongs on the clock
        # (when its audio enters WebRTC, speech samples) of the ticks handed to the audio source: an interrupt's
        # clear_queue takes back the ones that have not started, so they are not counted as published.
        self._queued_speech: deque[tuple[float, int]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def _audio_headroom_s(self) -> float:
        return self.options.audio_headroom_ms / 1000.0 if self._audio_source is not None else 0.0

    @property
    def room(self) -> rtc.Room | None:
        return self._room

    def on_room(self, listener: RoomListener) -> None:
        """Call `listener` with the connected room now (if any) and after every reconnect."""
        self._room_listeners.append(listener)
        if self._room is not None and self._stats.connected:
            listener(self._room)

    async def start(self) -> None:
        self._video_source = rtc.VideoSource(self.options.width_px, self.options.height_px)
        if self.target.publish_audio:
            self._audio_source = rtc.AudioSource(PLAYOUT_SAMPLE_RATE_HZ, 1, queue_size_ms=self.options.audio_queue_ms)
        await self._join()

    async def _join(self) -> None:
        room = rtc.Room()
        try:
            await asyncio.wait_for(
                room.connect(
                    self.target.url,
                    self.target.token,
                    rtc.RoomOptions(auto_subscribe=False, connect_timeout=self.options.connect_timeout_s),
                ),
                timeout=self.options.connect_timeout_s + 5.0,
            )
        except (rtc.ConnectError, TimeoutError, OSError) as exc:
            with contextlib.suppress(Exception):
                await room.disconnect()
            raise LiveKitConnectError(
                f"could not join LiveKit room {self.target.room!r} at {self.target.url}: {exc}"
            ) from exc
        try:
            await self._set_attributes(room)
            await self._publish_tracks(room)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await room.disconnect()
            raise LiveKitPublishError(f"joined room {self.target.room!r} but could not publish: {exc}") from exc
        room.on("disconnected", self._on_disconnected)
        self._room = room
        self._stats.connected = True
        logger.info(
            "livekit publisher connected",
            extra={
                "room": self.target.room,
                "identity": self.target.identity,
                "publish_audio": self.target.publish_audio,
            },
        )
        for listener in self._room_listeners:
            listener(room)

    async def _set_attributes(self, room: rtc.Room) -> None:
        wanted = self.target.publish_on_behalf
        if not wanted or room.local_participant.attributes.get(PUBLISH_ON_BEHALF_ATTRIBUTE) == wanted:
            return
        # Needs canUpdateOwnMetadata; a token minted with the attribute already set avoids the call.
        await room.local_participant.set_attributes({PUBLISH_ON_BEHALF_ATTRIBUTE: wanted})

    async def _publish_tracks(self, room: rtc.Room) -> None:
        # Audio first: a receiver that starts playing on the first track never shows silent lips.
        if self._audio_source is not None:
            audio_track = rtc.LocalAudioTrack.create_audio_track(AUDIO_TRACK_NAME, self._audio_source)
            await room.local_participant.publish_track(
                audio_track,
                rtc.TrackPublishOptions(
                    source=rtc.TrackSource.SOURCE_MICROPHONE, stream=self.options.stream_name, dtx=False
                ),
            )
        assert self._video_source is not None
        video_track = rtc.LocalVideoTrack.create_video_track(VIDEO_TRACK_NAME, self._video_source)
        await room.local_participant.publish_track(
            video_track,
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                stream=self.options.stream_name,
                simulcast=False,
                # Keep 25 fps under load: lower resolution before dropping frames (lips need every frame).
                degradation_preference=room_pb2.DegradationPreference.DEGRADATION_PREFERENCE_MAINTAIN_FRAMERATE,
                video_encoding=rtc.VideoEncoding(
                    max_bitrate=self.options.max_video_bitrate_bps,
                    max_framerate=float(self.options.frame_rate_fps),
                ),
                frame_metadata_features=[track_pb2.FMF_USER_TIMESTAMP, track_pb2.FMF_FRAME_ID],
            ),
        )

    def _on_disconnected(self, reason: object = None) -> None:
        self._stats.connected = False
        if self._closing:
            return
        reason_name = _disconnect_reason_name(reason)
        self._stats.last_error = f"disconnected: {reason_name}"
        if reason_name in FINAL_DISCONNECT_REASONS:
            # Someone meant it (the room was closed, the avatar removed, or another publisher took its identity):
            # rejoining would re-create the room or fight the other one. The session sees `connected` false.
            self._stats.extra["final_disconnect"] = 1.0
            logger.warning(
                "livekit publisher removed from the room; not rejoining",
                extra={"room": self.target.room, "reason": reason_name},
            )
            return
        logger.warning(
            "livekit publisher disconnected; rejoining", extra={"room": self.target.room, "reason": reason_name}
        )
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        backoff_s = self.options.reconnect_backoff_initial_s
        old = self._room
        self._room = None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.disconnect()
        while not self._closing:
            try:
                await self._join()
            except OutputError as exc:
                self._stats.last_error = exc.message
                logger.warning("livekit rejoin failed", extra={"error": exc.message, "retry_in_s": backoff_s})
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.options.reconnect_backoff_max_s)
                continue
            self._stats.reconnects += 1
            return

    async def publish(self, tick: PublishTick) -> None:
        # Set before any await: an interrupt during this tick's capture refills up to the *next* tick.
        self._next_tick_deadline_s = tick.deadline_s + len(tick.audio_playout) / PLAYOUT_SAMPLE_RATE_HZ
        if not self._stats.connected or self._video_source is None:
            self._stats.frames_dropped += 1
            self._stats.audio_samples_dropped += tick.speech_samples
            self._audio_anchored = False  # the queue drains meanwhile: refill it on the next tick
            return
        if self._audio_source is not None:
            pcm = self._to_int16(tick.audio_playout)
            frame = rtc.AudioFrame(pcm.tobytes(), PLAYOUT_SAMPLE_RATE_HZ, 1, len(pcm))
            try:
                async with self._audio_lock:
                    if not self._audio_anchored:
                        await self._fill_silence_until(tick.deadline_s)
                    else:
                        self._check_audio_slack(tick.deadline_s)
                    await self._audio_source.capture_frame(frame)
            except BaseException:
                # The capture failed (the room went away under it) or the session stopped mid-capture: the
                # tick's speech never reached WebRTC. Counted as dropped, so published + dropped == rendered.
                self._stats.frames_dropped += 1
                self._stats.audio_samples_dropped += tick.speech_samples
                raise
            self._stats.audio_samples_published += tick.speech_samples
            now_s = time.monotonic()
            while self._queued_speech and self._queued_speech[0][0] < now_s:
                self._queued_speech.popleft()  # started playing: published for good
            if tick.speech_samples:
                self._queued_speech.append((tick.deadline_s + self._audio_headroom_s, tick.speech_samples))
            self._stats.playout_samples_published += len(pcm)
        loop = asyncio.get_running_loop()
        # loop.time() is time.monotonic(): the tick's deadline is directly a loop time.
        when = tick.deadline_s + self._audio_headroom_s + self.options.video_delay_ms / 1000.0
        self._pending_video[tick.frame_index] = (loop.call_at(when, self._capture_video, tick), tick)

    def _check_audio_slack(self, tick_deadline_s: float) -> None:
        """How long before WebRTC pulls it this tick's audio arrives; negative: the queue ran dry (an underrun:
        the receiver conceals a gap and hears everything after it that much later)."""
        slack_ms = (tick_deadline_s + self._audio_headroom_s - time.monotonic()) * 1000.0
        extra = self._stats.extra
        extra["audio_slack_ms_min"] = round(min(extra.get("audio_slack_ms_min", slack_ms), slack_ms), 3)
        if slack_ms < 0:
            extra["audio_underruns"] = extra.get("audio_underruns", 0.0) + 1
            logger.warning(
                "audio source ran dry: a tick came %.1f ms after its audio was due",
                -slack_ms,
                extra={"room": self.target.room},
            )

    async def _fill_silence_until(self, tick_deadline_s: float) -> None:
        """Queue silence so that the audio captured next enters WebRTC at `tick_deadline_s` + headroom.

        Whole 10 ms blocks (the source's pull size); called with the audio lock held.
        """
        assert self._audio_source is not None
        blocks = round((tick_deadline_s + self._audio_headroom_s - time.monotonic()) * 100)
        tick_ms = 1000 // self.options.frame_rate_fps
        # At most headroom + one tick (an interrupt refills up to the next tick, up to a tick away).
        blocks = max(0, min(blocks, (self.options.audio_headroom_ms + tick_ms) // 10))
        self._audio_anchored = True
        if blocks:
            samples = blocks * PLAYOUT_SAMPLE_RATE_HZ // 100
            silence = rtc.AudioFrame(bytes(2 * samples), PLAYOUT_SAMPLE_RATE_HZ, 1, samples)
            await self._audio_source.capture_frame(silence)
            self._stats.playout_samples_published += samples
        self._stats.extra["audio_fill_blocks_last"] = float(blocks)

    def _capture_video(self, tick: PublishTick) -> None:
        self._pending_video.pop(tick.frame_index, None)
        if not self._stats.connected or self._video_source is None:
            self._stats.frames_dropped += 1
            return
        width, height = self.options.width_px, self.options.height_px
        # Odd-sized avatars lose their last row/column: I420 needs even dimensions.
        rgb = np.ascontiguousarray(tick.frame_rgb[:height, :width])
        i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
        frame = rtc.VideoFrame(width, height, rtc.VideoBufferType.I420, i420.tobytes())
        metadata = video_frame_pb2.FrameMetadata(user_timestamp=tick.wall_time_us, frame_id=tick.frame_index)
        # The capture timestamp is when the tick's audio enters WebRTC (deadline + headroom), not the delayed
        # capture time: receivers that lip-sync by capture time then see no offset at all.
        # libwebrtc's capture clock is CLOCK_MONOTONIC in microseconds, as is time.monotonic().
        audio_start_s = tick.deadline_s + self._audio_headroom_s
        self._video_source.capture_frame(frame, timestamp_us=int(audio_start_s * 1_000_000), metadata=metadata)
        self._stats.frames_published += 1
        lateness_ms = (time.monotonic() - audio_start_s) * 1000.0 - self.options.video_delay_ms
        extra = self._stats.extra
        extra["video_capture_lateness_ms_last"] = round(lateness_ms, 3)
        extra["video_capture_lateness_ms_max"] = round(
            max(extra.get("video_capture_lateness_ms_max", 0.0), lateness_ms), 3
        )

    def _to_int16(self, samples: np.ndarray) -> np.ndarray:
        return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        """Frames still waiting for their capture time show the idle frame instead, and the speech queued in
        the audio source is dropped and replaced by silence: the cut reaches viewers at once."""
        loop = asyncio.get_running_loop()
        if self._audio_source is not None and self._stats.connected:
            self._audio_source.clear_queue()
            self._drop_queued_speech()
            self._audio_anchored = False
            self._stats.extra["audio_clears"] = self._stats.extra.get("audio_clears", 0.0) + 1
            task = loop.create_task(self._refill_after_clear())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for frame_index, (handle, tick) in list(self._pending_video.items()):
            if tick.kind is FrameKind.IDLE:
                continue
            handle.cancel()
            idle = dataclasses.replace(tick, frame_rgb=idle_frame(frame_index), kind=FrameKind.IDLE)
            self._pending_video[frame_index] = (loop.call_at(handle.when(), self._capture_video, idle), idle)

    def _drop_queued_speech(self) -> None:
        """Speech of ticks that had not started playing is gone with the audio source's queue: dropped, not
        published (published + dropped == rendered)."""
        now_s = time.monotonic()
        cleared = sum(samples for start_s, samples in self._queued_speech if start_s >= now_s)
        self._queued_speech.clear()
        self._stats.audio_samples_published -= cleared
        self._stats.audio_samples_dropped += cleared
        self._stats.extra["audio_samples_cleared"] = self._stats.extra.get("audio_samples_cleared", 0.0) + cleared

    async def _refill_after_clear(self) -> None:
        async with self._audio_lock:
            if not self._audio_anchored and self._next_tick_deadline_s is not None and self._audio_source is not None:
                await self._fill_silence_until(self._next_tick_deadline_s)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Frames still waiting for their capture time (up to headroom + video delay ahead) never reach the room.
        # Every session ends with a few: counted apart from drops, so frames handed in = published + dropped +
        # discarded at close, and a healthy session's drop count stays 0.
        for handle, _tick in self._pending_video.values():
            handle.cancel()
        extra = self._stats.extra
        extra["frames_discarded_at_close"] = extra.get("frames_discarded_at_close", 0.0) + len(self._pending_video)
        self._pending_video.clear()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnect_task
        room, self._room = self._room, None
        self._stats.connected = False
        if room is not None:
            with contextlib.suppress(Exception):
                await room.disconnect()
        if self._audio_source is not None:
            await self._audio_source.aclose()
            self._audio_source = None
        if self._video_source is not None:
            await self._video_source.aclose()
            self._video_source = None

    def stats(self) -> PublisherStats:
        return self._stats
