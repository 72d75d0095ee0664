"""LiveKit output: `avatar_audio` (microphone) + `avatar_video` (camera), paced by the session clock.

One clock, the audio's: every tick the clock hands over frame N and the 1920 samples that
play while it is shown. The audio goes into the `AudioSource` at once; the source hands
10 ms to WebRTC every 10 ms from its own timer, and when its queue is empty at one of those
pulls it sends 10 ms of silence in its place, so the audio slips 10 ms against the video for
good. A tick only 10-20 ms late (a busy event loop, a shared CPU) would do
that, so the queue is kept `audio_headroom_ms` deep: before the first tick (and again after
a disconnect or an interrupt) it is filled with silence up to `deadline + headroom`, so
tick N's audio enters WebRTC at its deadline + headroom, whatever the loop's jitter up to
the headroom. The frame is captured at deadline + headroom + `video_delay_ms`. Receivers that
lip-sync the two tracks (libwebrtc's, native SDKs and browsers alike, when both tracks share one
stream id: the same `stream`, passed on by livekit-server's `room.sync_streams`) see the frame as
captured that much after its audio (the SDK re-bases a frame's capture time on its hand-over) and
aim to show it that much later; their synchroniser leaves differences under 30 ms alone, so where
they rest spans a band around the delay, and after a stall grew their audio buffer and the video
followed it, they rest at its top. The delay is small so that the band stays inside one frame both
ways. A receiver that does not sync them plays each track as it arrives, and its audio path is
longer (Opus packetizes 20 ms, its jitter buffer holds audio longer than video): there the video
comes early by that difference less the delay, the direction viewers notice least.
docs/audio-protocol.md gives the measurements; tests/realtime measures it.
With `publish_audio` off there is no audio queue, and frames are captured at deadline + `video_delay_ms`.

Every tick is re-anchored on that clock (`avsync`): the publisher models the source's queue
in the source's own time, calibrated a few times a second by the sender's measured
`total_samples_duration`, predicts when the tick's first sample will enter WebRTC, and
drops the late head of its audio (the tick came after its audio was due, or the pull thread
fell behind real time) or queues silence in front of it (the queue is shallower than the
anchor wants: the first tick, after a disconnect, an interrupt or a clock restart), so that
after any stall the audio is back on the video's clock within one 10 ms block at the next
tick. Dropped speech is counted (`audio_samples_dropped`, so published + dropped ==
rendered stays exact) and the send-side A/V offset (when the frame was captured, less the
video delay, minus when its audio entered WebRTC) is measured for every frame and exported
as `av_offset_ms`, with `av_offset_alarms` counting frames past `av_offset_alarm_ms`.

After a stall of `renew_audio_after_stall_ms` the audio track is renewed in the next silence,
make before break (`_maybe_renew_audio_track`, `_renew_audio_track`): audio RTP timestamps
count pulled samples, so a stalled sender's audio reaches receivers late, their jitter
buffers grow on it and keep the delay, and only a new track starts them afresh.

With `idle_audio_reserve_ms` (off by default: docs/audio-protocol.md section 4 has the
measurement) the source is kept that deep in silence while idle (no speech queued) instead of
the headroom, so that a stall in silence shorter than that finds queued silence for every pull
it held up (a stopped pull thread catches up on it, and DTX hardly sends silence). Speech never
waits behind it: the first speech tick clears the queued silence (a clear moves no RTP
timestamp) and is anchored as usual; the reserve grows again only once the last speech sample
has entered WebRTC. `playback_finished` is measured against the output's own account of when
the utterance's last speech sample is heard (`speech_heard_at_s`).

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
While the SDK is resuming (`reconnecting` until `reconnected`) nothing reaches a viewer, so
the publisher reports itself not connected from the first moment: the session's output-down
timeout, not the SDK's own retry budget, decides when the session falls back. At that moment the
publisher also opens a TCP connection to the server's address: refused (nothing listens: the
server process or its host is gone), it reports `SERVER_UNREACHABLE`, and the session falls back
without waiting out the timeout; so does a rejoin that fails. A server that still accepts
connections may be resumed by the SDK, so the timeout stands.
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
from urllib.parse import urlsplit

import cv2
import numpy as np
from livekit import rtc
from livekit.rtc._proto import room_pb2, stats_pb2, track_pb2, video_frame_pb2

from realtime.clock import Clock, monotonic_clock
from realtime.ingest.formats import PLAYOUT_SAMPLE_RATE_HZ, TIMELINE_SAMPLE_RATE_HZ
from realtime.outputs.avsync import SourceClock
from realtime.outputs.base import SERVER_UNREACHABLE, FrameKind, PublisherStats, PublishTick
from realtime.outputs.errors import OutputError
from realtime.outputs.frame_handoff import FrameHandOff
from realtime.outputs.registry import LiveKitTarget

logger = logging.getLogger(__name__)

AUDIO_TRACK_NAME = "avatar_audio"
VIDEO_TRACK_NAME = "avatar_video"
PUBLISH_ON_BEHALF_ATTRIBUTE = "lk.publish_on_behalf"
PULL_BLOCK_SAMPLES = PLAYOUT_SAMPLE_RATE_HZ // 100  # the source hands WebRTC 10 ms per pull
# Anchor errors below this are left alone: one pull cannot be split, and the queue model is only that precise.
ANCHOR_TOLERANCE_SAMPLES = PULL_BLOCK_SAMPLES * 3 // 2
# In speech, audio up to two frames late is kept (avsync.SourceClock.plan): the next silence absorbs the
# correction.
LATE_SPEECH_TOLERANCE_SAMPLES = 2 * 1920
# The most a late queue delays the playback events (the re-anchoring corrects anything later within a tick).
MAX_PLAYOUT_LAG_S = 0.2
# Utterances whose speech end `speech_heard_at_s` remembers (its playback events come within a second).
MAX_TRACKED_UTTERANCES = 16
# Two readings of the sender's pulled-audio count differ from real time by up to a pull plus the reading's
# jitter.
MISSED_PULL_NOISE_MS = 25.0
# How long the probe of a lost server's address waits for its TCP handshake: on loopback or a LAN a refusal
# comes back in milliseconds; a probe left unanswered proves nothing and leaves the timeout to decide.
SERVER_PROBE_TIMEOUT_S = 1.0
# How often a server that still takes connections is probed again while the publisher stays down.
SERVER_PROBE_INTERVAL_S = 0.25


class LiveKitConnectError(OutputError):
    code = "livekit_connect_failed"


class LiveKitPublishError(OutputError):
    code = "livekit_publish_failed"


@dataclass(frozen=True)
class LiveKitPublisherOptions:
    width_px: int
    height_px: int
    frame_rate_fps: int = 25
    video_delay_ms: float = 10.0  # see the module docstring
    # From entering WebRTC to heard at a receiver: a 20 ms Opus packet, the network, the receiver's jitter
    # buffer and playout. Playback events wait this long (realtime.sidecar.runtime). Not `video_delay_ms`:
    # that is the difference between the audio and the video paths, the audio path is the video's plus it.
    receiver_audio_delay_ms: float = 80.0
    # A frame a stall held this long past its capture time is dropped (3 frames; see `_capture_video`).
    drop_video_later_than_ms: float = 120.0
    max_video_bitrate_bps: int = 1_500_000
    audio_headroom_ms: int = 60  # audio kept queued ahead of WebRTC's 10 ms pulls: absorbs clock jitter
    # While idle (no speech queued) the source is kept this deep in silence, so that a stall in silence
    # shorter than it (a stopped process, a starved pull thread, a stalled event loop) leaves the sender's
    # RTP clock in step with real time: receivers get no late audio and their jitter buffers do not grow
    # (see the module docstring). The first speech tick clears that silence. 0 = off, the default: with
    # this SDK a stall in silence did not grow receivers' jitter buffers without it either
    # (docs/audio-protocol.md section 4).
    idle_audio_reserve_ms: int = 0
    # The source's capacity: the idle reserve (or the headroom) + two 40 ms ticks (a refill, then a tick).
    audio_queue_ms: int = 200
    connect_timeout_s: float = 10.0
    reconnect_backoff_initial_s: float = 0.5
    reconnect_backoff_max_s: float = 5.0
    stream_name: str = "avatar"  # both tracks in one stream: receivers that lip-sync do so by it
    av_offset_alarm_ms: float = (
        40.0  # a frame whose send-side A/V offset is past this (one frame) is an alarm
    )
    calibrate_interval_s: float = (
        0.2  # how often the sender's pulled-audio count re-calibrates the queue model
    )
    # See LiveKitPublisher._maybe_renew_audio_track: a stall this long (a tick that long after its period)
    # renews the audio track once no speech has entered WebRTC for `renew_audio_idle_ms` (make before break:
    # `_renew_audio_track`). 0 = off, the default: a receiver that switches to the new track mid-utterance
    # (the load's own event-loop stalls renew it too) drops what its old track's jitter buffer held.
    renew_audio_after_stall_ms: float = 0.0
    renew_audio_idle_ms: float = 300.0
    renew_audio_min_interval_s: float = 2.0
    # How long the old and the new audio track both carry the source's audio (see `_renew_audio_track`).
    renew_audio_overlap_s: float = 1.0

    def __post_init__(self) -> None:
        # WebRTC encoders need >= 16 px; I420 needs even dimensions.
        if self.width_px < 16 or self.height_px < 16 or self.width_px % 2 or self.height_px % 2:
            raise ValueError(f"video size {self.width_px}x{self.height_px} must be even and at least 16x16")
        # The source pulls whole 10 ms blocks; the headroom plus a tick must fit in its queue.
        if self.audio_headroom_ms < 0 or self.audio_headroom_ms % 10:
            raise ValueError(
                f"audio_headroom_ms {self.audio_headroom_ms} must be a non-negative multiple of 10"
            )
        if self.idle_audio_reserve_ms < 0 or self.idle_audio_reserve_ms % 10:
            raise ValueError(
                f"idle_audio_reserve_ms {self.idle_audio_reserve_ms} must be a non-negative multiple of 10"
            )
        deepest_ms = max(self.audio_headroom_ms, self.idle_audio_reserve_ms)
        if deepest_ms + 2 * (1000 // self.frame_rate_fps) > self.audio_queue_ms:
            raise ValueError(
                f"audio_queue_ms {self.audio_queue_ms} cannot hold the headroom or the idle reserve plus two "
                "ticks"
            )


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

    def __init__(
        self, target: LiveKitTarget, options: LiveKitPublisherOptions, clock: Clock = monotonic_clock
    ) -> None:
        self.name = "livekit"
        self._clock = (
            clock  # time.monotonic (the session clock's and the event loop's); tests inject their own
        )
        self.target = target
        self.options = options
        self._stats = PublisherStats(name=self.name)
        self._room: rtc.Room | None = None
        self._audio_source: rtc.AudioSource | None = None
        self._audio_track: rtc.LocalAudioTrack | None = None
        self._source_clock = SourceClock(
            PLAYOUT_SAMPLE_RATE_HZ,
            PULL_BLOCK_SAMPLES,
            2 * options.audio_queue_ms * PLAYOUT_SAMPLE_RATE_HZ // 1000,
        )
        self._calibrate_task: asyncio.Task[None] | None = None
        # (track, seconds of audio it had pulled, when): the previous reading, for `_count_missed_pulls`.
        self._last_pull_reading: tuple[rtc.LocalAudioTrack, float, float] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._renew_wanted = False  # a stall asked for a new audio track: it waits for silence
        self._speech_end_s = -1e9  # when the last queued speech sample enters WebRTC (monotonic)
        # The same per utterance (the latest few), for `speech_heard_at_s`.
        self._speech_end_by_utterance: dict[int, float] = {}
        self._last_renew_s = -1e9
        self._last_tick_at_s = float("inf")  # when the previous tick's audio was queued (none yet: no stall)
        self._reserve_held = False  # the previous tick kept the idle reserve queued
        self._last_alarm_log_s = -1e9
        # Per frame waiting for its capture: how late its audio enters WebRTC vs its anchor (s); None: none
        # kept.
        self._audio_residual_s: dict[int, float | None] = {}
        self._video_source: rtc.VideoSource | None = None
        # Frames reach the video source on a thread of their own (see `frame_handoff`).
        self._frames = FrameHandOff("livekit", on_error=self._on_capture_error)
        self._room_listeners: list[RoomListener] = []
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None  # see _probe_server
        # Frames waiting for their capture time (deadline + headroom + video delay), by frame index.
        self._pending_video: dict[int, tuple[asyncio.TimerHandle, PublishTick]] = {}
        # Audio queue anchoring (see the module docstring): captures and refills are serialised by the lock.
        self._audio_lock = asyncio.Lock()
        self._next_tick_deadline_s: float | None = None  # where the next tick's audio belongs on the clock
        # (when its audio enters WebRTC, speech samples) of the ticks handed to the audio source: an
        # interrupt's clear_queue takes back the ones that have not started, so they are not counted as
        # published.
        self._queued_speech: deque[tuple[float, int]] = deque()
        # How late the latest tick's first kept sample entered WebRTC vs its anchor (s): `playout_delay_s`.
        self._audio_lag_s = 0.0
        # Interrupts so far and the idle frame they show: a tick being queued during one shows it too.
        self._interrupts = 0
        self._idle_frame: Callable[[int], np.ndarray] | None = None
        # Ticks whose audio reached the source: an interrupt compares it across its refill.
        self._captures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def _audio_headroom_s(self) -> float:
        return self.options.audio_headroom_ms / 1000.0 if self._audio_source is not None else 0.0

    @property
    def room(self) -> rtc.Room | None:
        return self._room

    def capture_delay_s(self) -> float:
        """How long after its tick's deadline a frame is handed to WebRTC: the audio headroom (when there is
        audio) plus `video_delay_ms`."""
        return self._audio_headroom_s + self.options.video_delay_ms / 1000.0

    def playout_delay_s(self) -> float:
        """How long after its tick's deadline a tick's audio is heard: the headroom it waits in the audio
        source, plus how far from its anchor the latest tick's audio actually entered WebRTC (in speech the
        re-anchoring keeps audio up to two frames late), then the receivers' audio path
        (`receiver_audio_delay_ms`)."""
        if self._audio_source is None:
            return 0.0
        lag_s = min(max(self._audio_lag_s, -self._audio_headroom_s), MAX_PLAYOUT_LAG_S)
        return self._audio_headroom_s + lag_s + self.options.receiver_audio_delay_ms / 1000.0

    @property
    def agent_identity(self) -> str | None:
        return self.target.publish_on_behalf

    def on_room(self, listener: RoomListener) -> None:
        """Call `listener` with the connected room now (if any) and after every reconnect."""
        self._room_listeners.append(listener)
        if self._room is not None and self._stats.connected:
            listener(self._room)

    async def start(self) -> None:
        self._video_source = rtc.VideoSource(self.options.width_px, self.options.height_px)
        if self.target.publish_audio:
            self._audio_source = rtc.AudioSource(
                PLAYOUT_SAMPLE_RATE_HZ, 1, queue_size_ms=self.options.audio_queue_ms
            )
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
            raise LiveKitPublishError(
                f"joined room {self.target.room!r} but could not publish: {exc}"
            ) from exc
        room.on("disconnected", self._on_disconnected)
        room.on("reconnecting", lambda: self._on_transport_state(room, connected=False))
        room.on("reconnected", lambda: self._on_transport_state(room, connected=True))
        self._room = room
        self._stats.connected = True
        self._stats.extra.pop(SERVER_UNREACHABLE, None)
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
            await self._publish_audio_track(room)
            if self._calibrate_task is None or self._calibrate_task.done():
                self._calibrate_task = asyncio.get_running_loop().create_task(self._calibrate_loop())
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

    async def _publish_audio_track(self, room: rtc.Room) -> None:
        assert self._audio_source is not None
        audio_track = rtc.LocalAudioTrack.create_audio_track(AUDIO_TRACK_NAME, self._audio_source)
        await room.local_participant.publish_track(
            audio_track,
            # DTX: in silence the encoder sends (almost) no packets while its RTP clock runs on, so a stall
            # while idle is, for receivers, a gap in silence rather than packets arriving late (see
            # `_renew_audio_track`).
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_MICROPHONE, stream=self.options.stream_name, dtx=True
            ),
        )
        # A new sender counts its pulled audio from zero: the queue model's count starts over with it.
        self._audio_track = audio_track
        self._source_clock.start(self._clock())

    def _maybe_renew_audio_track(self, stall_ms: float, now_s: float, *, idle: bool) -> None:
        """After a stall of `renew_audio_after_stall_ms` or more, give receivers a fresh audio stream, in
        silence.

        Audio RTP timestamps count samples, not time: when a stopped process resumes, the source's pull thread
        makes up the pulls it missed back to back (the queued audio, then silence), so receivers get the
        whole stall's audio at once, up to the stall late, before this code runs again. A receiver's jitter
        buffer (NetEq) plays it after concealing the gap, so the audio plays that much behind the video,
        whose capture timestamps follow the clock (the video's jitter buffer does not grow); one that has
        received the track only briefly also raises its target delay on it for seconds (its delay statistics
        still weigh each new sample heavily: docs/audio-protocol.md section 4), and nothing the sender queues
        afterwards can bring that back. A new track (a new SSRC) starts a new
        jitter buffer at its normal depth. A receiver switches to the new
        track at a resubscription, so the renewal waits until no speech has entered WebRTC for
        `renew_audio_idle_ms` (the tail has played out at receivers; an utterance that starts first defers
        it), and the old track carries the audio until receivers have the new one (`_renew_audio_track`)."""
        threshold_ms = self.options.renew_audio_after_stall_ms
        if threshold_ms and stall_ms >= threshold_ms:
            if not self._renew_wanted:
                self._stats.extra["audio_track_renewals_wanted"] = (
                    self._stats.extra.get("audio_track_renewals_wanted", 0.0) + 1
                )
            self._renew_wanted = True
        if not self._renew_wanted or not idle or self._renew_task is not None or self._room is None:
            return
        if (now_s - self._speech_end_s) * 1000.0 < self.options.renew_audio_idle_ms:
            return
        if now_s - self._last_renew_s < self.options.renew_audio_min_interval_s:
            return
        self._renew_wanted = False
        self._last_renew_s = now_s
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_audio_track(self._room))

    async def _renew_audio_track(self, room: rtc.Room) -> None:
        """Make before break: the new track is published on the same source first, so both carry the
        source's audio (every pull goes to every track of the source) while receivers subscribe to the new
        one, and the old one goes `renew_audio_overlap_s` later. A receiver that follows the newest track
        (browsers, `avcheck.RoomRecorder`) hears no gap even when an utterance starts meanwhile."""
        old = self._audio_track
        extra = self._stats.extra
        try:
            await self._publish_audio_track(room)  # from here on the new track's count calibrates the model
            await asyncio.sleep(self.options.renew_audio_overlap_s)
            if old is not None and old.sid:
                await room.local_participant.unpublish_track(old.sid)
            extra["audio_track_renewals"] = extra.get("audio_track_renewals", 0.0) + 1
            logger.info("audio track renewed after a stall", extra={"room": self.target.room})
        except Exception as exc:
            extra["audio_track_renewal_failures"] = extra.get("audio_track_renewal_failures", 0.0) + 1
            logger.warning("audio track renewal failed", extra={"room": self.target.room, "error": repr(exc)})
        finally:
            self._renew_task = None

    async def _calibrate_loop(self) -> None:
        """Re-calibrate the source's queue model from the sender's count of the audio it pulled."""
        while not self._closing:
            await asyncio.sleep(self.options.calibrate_interval_s)
            track = self._audio_track
            if track is None or not self._stats.connected:
                continue
            asked_s = self._clock()
            try:
                report = await asyncio.wait_for(track.get_stats(), timeout=1.0)
            except Exception as exc:  # a stats call failing costs precision, never the session
                self._stats.extra["audio_calibration_failures"] = (
                    self._stats.extra.get("audio_calibration_failures", 0.0) + 1
                )
                logger.debug(
                    "audio source stats failed", extra={"room": self.target.room, "error": repr(exc)}
                )
                continue
            answered_s = self._clock()
            measured = _pulled_audio(report)
            if measured is None or track is not self._audio_track:
                continue
            pulled_s, collected_unix_us = measured
            # The collection time is wall-clock microseconds; on the monotonic clock it lies between ask and
            # answer.
            at_s = answered_s - (time.time() - collected_unix_us / 1_000_000)
            at_s = min(max(at_s, asked_s), answered_s)
            self._source_clock.calibrate(round(pulled_s * PLAYOUT_SAMPLE_RATE_HZ), at_s)
            extra = self._stats.extra
            self._count_missed_pulls(track, pulled_s, at_s)
            extra["audio_calibration_error_ms_last"] = round(self._source_clock.last_calibration_error_ms, 3)
            extra["audio_calibration_rebases"] = float(self._source_clock.rebases)
            extra["audio_queued_ms"] = round(
                self._source_clock.queued_samples(answered_s) * 1000.0 / PLAYOUT_SAMPLE_RATE_HZ, 3
            )

    def _count_missed_pulls(self, track: rtc.LocalAudioTrack, pulled_s: float, at_s: float) -> None:
        """`audio_pulls_missed_ms`: real time in which the sender took no audio from the source (its pull
        thread was stopped or starved past what its catch-up found queued). Audio RTP timestamps count
        samples, so every receiver's audio timeline falls that far behind the video's for as long as the
        track lives."""
        previous = self._last_pull_reading
        self._last_pull_reading = (track, pulled_s, at_s)
        if previous is None or previous[0] is not track:
            return
        missed_ms = ((at_s - previous[2]) - (pulled_s - previous[1])) * 1000.0
        if missed_ms > MISSED_PULL_NOISE_MS:
            extra = self._stats.extra
            extra["audio_pulls_missed_ms"] = round(extra.get("audio_pulls_missed_ms", 0.0) + missed_ms, 3)

    def _on_transport_state(self, room: rtc.Room, *, connected: bool) -> None:
        """The SDK lost (reconnecting) or resumed (reconnected) the connection of the room in use."""
        if room is not self._room or self._closing:
            return  # a room this publisher already left
        self._stats.connected = connected
        if not connected:
            self._stats.last_error = "reconnecting: the connection to livekit-server broke"
            logger.warning(
                "livekit connection lost; the SDK is resuming it", extra={"room": self.target.room}
            )
            if self._probe_task is None or self._probe_task.done():
                self._probe_task = asyncio.get_running_loop().create_task(self._probe_server())
                self._tasks.add(self._probe_task)
                self._probe_task.add_done_callback(self._tasks.discard)
        else:
            self._stats.extra.pop(SERVER_UNREACHABLE, None)
            logger.info("livekit connection resumed", extra={"room": self.target.room})

    async def _probe_server(self) -> None:
        """While the publisher is down: is anything listening at the server's address? Refused:
        `SERVER_UNREACHABLE` (module docstring). Probed again while connections are still taken: a server
        being killed may accept one last connection into its backlog just before its socket goes away."""
        host, port = _server_address(self.target.url)
        while not self._stats.connected and not self._closing:
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout=SERVER_PROBE_TIMEOUT_S
                )
            except TimeoutError:
                continue  # slow, not gone: the SDK may still resume; the output-down timeout decides
            except OSError as exc:
                # Whichever room is current (the SDK may have given up and a rejoin begun meanwhile), the
                # publisher is still down: a refusal tells about the server, not about one connection.
                if not self._stats.connected and not self._closing:
                    self._stats.extra[SERVER_UNREACHABLE] = 1.0
                    self._stats.last_error = (
                        f"reconnecting: livekit-server at {host}:{port} refused a new connection ({exc})"
                    )
                    logger.warning(
                        "livekit-server unreachable", extra={"room": self.target.room, "error": str(exc)}
                    )
                return
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            await asyncio.sleep(SERVER_PROBE_INTERVAL_S)

    def _on_disconnected(self, reason: object = None) -> None:
        self._stats.connected = False
        if self._closing:
            return
        reason_name = _disconnect_reason_name(reason)
        self._stats.last_error = f"disconnected: {reason_name}"
        if reason_name in FINAL_DISCONNECT_REASONS:
            # Someone meant it (the room was closed, the avatar removed, or another publisher took its
            # identity): rejoining would re-create the room or fight the other one. The session sees
            # `connected` false.
            self._stats.extra["final_disconnect"] = 1.0
            logger.warning(
                "livekit publisher removed from the room; not rejoining",
                extra={"room": self.target.room, "reason": reason_name},
            )
            return
        logger.warning(
            "livekit publisher disconnected; rejoining",
            extra={"room": self.target.room, "reason": reason_name},
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
                self._stats.extra[SERVER_UNREACHABLE] = 1.0
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
            self._last_tick_at_s = float(
                "inf"
            )  # an outage is not a stall: the track is new after a rejoin anyway
            return
        residual_s: float | None = None
        interrupts_before = self._interrupts
        if self._audio_source is not None:
            try:
                async with self._audio_lock:
                    residual_s = await self._queue_tick_audio(tick)
            except BaseException:
                # The capture failed (the room went away under it) or the session stopped mid-capture: the
                # tick's speech never reached WebRTC. Counted as dropped, so published + dropped == rendered.
                self._stats.frames_dropped += 1
                self._stats.audio_samples_dropped += tick.speech_samples
                raise
        if self._interrupts != interrupts_before and tick.kind is not FrameKind.IDLE and self._idle_frame:
            # An interrupt came while this tick's audio was being queued (its speech was cleared after it
            # landed): its frame, not yet waiting for its capture time, shows the idle frame too.
            tick = dataclasses.replace(
                tick, frame_rgb=self._idle_frame(tick.frame_index), kind=FrameKind.IDLE
            )
        self._audio_residual_s[tick.frame_index] = residual_s
        if residual_s is not None:
            self._audio_lag_s = residual_s
        loop = asyncio.get_running_loop()
        # loop.time() is time.monotonic(): the tick's deadline is directly a loop time.
        when = tick.deadline_s + self.capture_delay_s()
        self._pending_video[tick.frame_index] = (loop.call_at(when, self._capture_video, tick), tick)

    async def _queue_tick_audio(self, tick: PublishTick) -> float | None:
        """Queue the tick's audio re-anchored on the session clock (see the module docstring); called with the
        audio lock held. Returns how late its first kept sample enters WebRTC vs where it belongs (s), or None
        when all of it was dropped."""
        assert self._audio_source is not None
        pcm = self._to_int16(tick.audio_playout)
        now_s = self._clock()
        anchor_s = tick.deadline_s + self._audio_headroom_s
        self._check_audio_slack(anchor_s, now_s)
        capacity = self.options.audio_queue_ms * PLAYOUT_SAMPLE_RATE_HZ // 1000
        # A stall shows as the time since the previous tick past one period (the clock may have restarted
        # since, so the tick itself need not be late).
        period_s = len(pcm) / PLAYOUT_SAMPLE_RATE_HZ
        idle = tick.speech_samples == 0
        stall_ms = (now_s - self._last_tick_at_s - period_s) * 1000.0
        # A stall the idle reserve covered sent receivers no late audio: nothing to renew.
        if not (self._reserve_held and stall_ms < self.options.idle_audio_reserve_ms):
            self._maybe_renew_audio_track(stall_ms, now_s, idle=idle)
        self._last_tick_at_s = now_s
        # Speech is queued until the source has handed its last sample over (in the source's own time): the
        # idle reserve never grows behind it, and is never cleared from under it.
        speech_queued = self._source_clock.speech_queued(now_s)
        reserve_s = 0.0
        if idle and not speech_queued:  # the queue is kept the reserve deep instead of the headroom
            reserve_s = max(0.0, self.options.idle_audio_reserve_ms / 1000.0 - self._audio_headroom_s)
        elif not idle and not speech_queued:
            self._clear_idle_reserve(anchor_s, now_s)
        self._reserve_held = bool(reserve_s)
        decision = self._source_clock.plan(
            anchor_s + reserve_s,
            len(pcm),
            now_s,
            tolerance_samples=ANCHOR_TOLERANCE_SAMPLES,
            max_pad_samples=capacity
            - len(pcm),  # the tick must still fit: a full source would block the clock
            late_speech_tolerance_samples=LATE_SPEECH_TOLERANCE_SAMPLES if tick.speech_samples else 0,
        )
        kept = pcm[decision.drop_samples :]
        # Speech sits at the head of a tick (a last tick is padded at its end): the dropped head is speech
        # first.
        dropped_speech = min(
            tick.speech_samples,
            round(decision.drop_samples * TIMELINE_SAMPLE_RATE_HZ / PLAYOUT_SAMPLE_RATE_HZ),
        )
        samples = np.concatenate([np.zeros(decision.pad_samples, dtype=np.int16), kept])
        extra = self._stats.extra
        extra["audio_anchor_error_ms_last"] = round(decision.error_ms, 3)
        for name, count in (("dropped", decision.drop_samples), ("padded", decision.pad_samples)):
            if (
                count
            ):  # audio_resync_{dropped,padded}: re-anchorings; ..._samples: 48 kHz samples they took or added
                extra[f"audio_resync_{name}"] = extra.get(f"audio_resync_{name}", 0.0) + 1
                extra[f"audio_resync_{name}_samples"] = extra.get(f"audio_resync_{name}_samples", 0.0) + count
        if len(samples):
            frame = rtc.AudioFrame(samples.tobytes(), PLAYOUT_SAMPLE_RATE_HZ, 1, len(samples))
            await self._audio_source.capture_frame(frame)
            self._captures += 1
            self._source_clock.captured(len(samples), now_s)
            if tick.speech_samples - dropped_speech:
                self._source_clock.speech_captured()
        published_speech = tick.speech_samples - dropped_speech
        self._stats.audio_samples_published += published_speech
        self._stats.audio_samples_dropped += dropped_speech
        self._stats.playout_samples_published += len(samples)
        done_s = self._clock()
        while self._queued_speech and self._queued_speech[0][0] < done_s:
            self._queued_speech.popleft()  # started playing: published for good
        if published_speech:
            self._queued_speech.append((decision.start_s, published_speech))
            # Speech sits at the head of the tick (a last tick is padded after it): it ends that far into
            # `kept`.
            speech_playout = round(tick.speech_samples * PLAYOUT_SAMPLE_RATE_HZ / TIMELINE_SAMPLE_RATE_HZ)
            kept_speech = min(len(kept), max(0, speech_playout - decision.drop_samples))
            self._speech_end_s = decision.start_s + kept_speech / PLAYOUT_SAMPLE_RATE_HZ
            if tick.utterance_id is not None:
                self._speech_end_by_utterance[tick.utterance_id] = self._speech_end_s
                while len(self._speech_end_by_utterance) > MAX_TRACKED_UTTERANCES:
                    del self._speech_end_by_utterance[next(iter(self._speech_end_by_utterance))]
        if not len(kept) or reserve_s:
            return None  # nothing to pair with the frame: all dropped, or silence kept deep on purpose
        return decision.start_s - (anchor_s + decision.drop_samples / PLAYOUT_SAMPLE_RATE_HZ)

    def _clear_idle_reserve(self, anchor_s: float, now_s: float) -> None:
        """Speech starts while the source holds only silence, deeper than the anchor wants (the idle reserve,
        or a pull thread that fell behind): that silence is cleared rather than the speech's head dropped,
        so the speech enters WebRTC at its anchor (or as near as a late tick can). Clearing the queue moves
        no RTP timestamp (those count pulled samples): receivers see nothing of it."""
        assert self._audio_source is not None
        if not self._source_clock.queued_samples(now_s):
            return
        excess_s = self._source_clock.predicted_start_s(now_s) - anchor_s
        if excess_s * PLAYOUT_SAMPLE_RATE_HZ < ANCHOR_TOLERANCE_SAMPLES:
            return
        self._audio_source.clear_queue()
        self._source_clock.cleared(now_s)
        extra = self._stats.extra
        extra["audio_silence_clears"] = extra.get("audio_silence_clears", 0.0) + 1

    def speech_heard_at_s(self, utterance_id: int) -> float | None:
        """When the last speech sample of `utterance_id` that this output sent is heard at receivers: when it
        entered WebRTC (the queue model's prediction at its capture) plus `receiver_audio_delay_ms`. None for
        an utterance it sent no speech of (or too long ago)."""
        end_s = self._speech_end_by_utterance.get(utterance_id)
        return None if end_s is None else end_s + self.options.receiver_audio_delay_ms / 1000.0

    def _check_audio_slack(self, anchor_s: float, now_s: float) -> None:
        """How long before WebRTC pulls it this tick's audio arrives; negative: the queue ran dry (an
        underrun:
        silence went out in its place, and the re-anchoring drops what is late)."""
        slack_ms = (anchor_s - now_s) * 1000.0
        extra = self._stats.extra
        extra["audio_slack_ms_min"] = round(min(extra.get("audio_slack_ms_min", slack_ms), slack_ms), 3)
        if slack_ms < 0:
            extra["audio_underruns"] = extra.get("audio_underruns", 0.0) + 1
            logger.warning(
                "audio source ran dry: a tick came %.1f ms after its audio was due",
                -slack_ms,
                extra={"room": self.target.room},
            )

    def _capture_video(self, tick: PublishTick) -> None:
        self._pending_video.pop(tick.frame_index, None)
        residual_s = self._audio_residual_s.pop(tick.frame_index, None)
        if not self._stats.connected or self._video_source is None:
            self._stats.frames_dropped += 1
            return
        audio_start_s = tick.deadline_s + self._audio_headroom_s
        lateness_ms = (self._clock() - audio_start_s) * 1000.0 - self.options.video_delay_ms
        if lateness_ms > self.options.drop_video_later_than_ms:
            # A stall held this frame past its capture time: sent now, with its capture timestamp, it would
            # reach receivers that late, and their video jitter buffers would grow on it as NetEq does on late
            # audio. Dropped, as the late head of the audio is (the next frames are on the clock again).
            self._stats.frames_dropped += 1
            extra = self._stats.extra
            extra["video_frames_dropped_late"] = extra.get("video_frames_dropped_late", 0.0) + 1
            return
        source, width, height = self._video_source, self.options.width_px, self.options.height_px
        frame_rgb, metadata = (
            tick.frame_rgb,
            video_frame_pb2.FrameMetadata(user_timestamp=tick.wall_time_us, frame_id=tick.frame_index),
        )

        def capture() -> None:  # on the hand-off's thread: the conversion releases the GIL too
            # Odd-sized avatars lose their last row/column: I420 needs even dimensions.
            i420 = cv2.cvtColor(np.ascontiguousarray(frame_rgb[:height, :width]), cv2.COLOR_RGB2YUV_I420)
            frame = rtc.VideoFrame(width, height, rtc.VideoBufferType.I420, i420.tobytes())
            # The capture timestamp is when the tick's audio enters WebRTC (deadline + headroom). The SDK
            # passes it through libwebrtc's TimestampAligner, which keeps the spacing of the timestamps but
            # re-bases them on the time each frame is handed over, so receivers that lip-sync by capture time
            # see the frame as captured `video_delay_ms` after its audio (the module docstring says why it is
            # small). libwebrtc's capture clock is CLOCK_MONOTONIC in microseconds, as is time.monotonic().
            source.capture_frame(frame, timestamp_us=int(audio_start_s * 1_000_000), metadata=metadata)

        if not self._frames.submit(capture):
            # The encoder is frames behind (a starved host): a stale frame would only add to its delay.
            self._stats.frames_dropped += 1
            extra = self._stats.extra
            extra["video_frames_dropped_busy"] = extra.get("video_frames_dropped_busy", 0.0) + 1
            return
        self._stats.frames_published += 1
        extra = self._stats.extra
        extra["video_capture_lateness_ms_last"] = round(lateness_ms, 3)
        extra["video_capture_lateness_ms_max"] = round(
            max(extra.get("video_capture_lateness_ms_max", 0.0), lateness_ms), 3
        )
        if residual_s is not None:
            self._record_av_offset(lateness_ms - residual_s * 1000.0)

    def _on_capture_error(self, error: BaseException) -> None:
        """A frame handed to the hand-off did not reach the source (it was closed under it): a drop, not a
        publish."""
        self._stats.frames_published -= 1
        self._stats.frames_dropped += 1
        logger.warning("a video frame did not reach the source: %s", error, extra={"room": self.target.room})

    def _record_av_offset(self, offset_ms: float) -> None:
        """The send-side A/V offset of one frame: how much later than its audio the frame left (less the video
        delay, which is deliberate); positive = video late, as at a subscriber."""
        extra = self._stats.extra
        extra["av_offset_frames"] = extra.get("av_offset_frames", 0.0) + 1  # frames measured
        extra["av_offset_ms"] = round(offset_ms, 3)
        extra["av_offset_ms_min"] = round(min(extra.get("av_offset_ms_min", offset_ms), offset_ms), 3)
        extra["av_offset_ms_max"] = round(max(extra.get("av_offset_ms_max", offset_ms), offset_ms), 3)
        # Past what a stall in speech may leave until the next silence (LATE_SPEECH_TOLERANCE_SAMPLES).
        if abs(offset_ms) > LATE_SPEECH_TOLERANCE_SAMPLES * 1000.0 / PLAYOUT_SAMPLE_RATE_HZ:
            extra["av_offset_frames_past_late_speech"] = (
                extra.get("av_offset_frames_past_late_speech", 0.0) + 1
            )
        if abs(offset_ms) <= self.options.av_offset_alarm_ms:
            return
        extra["av_offset_alarms"] = extra.get("av_offset_alarms", 0.0) + 1
        now_s = self._clock()
        if now_s - self._last_alarm_log_s >= 1.0:  # at most one line a second: a stall makes a run of them
            self._last_alarm_log_s = now_s
            logger.warning(
                "send-side A/V offset %.1f ms is past the %.0f ms alarm",
                offset_ms,
                self.options.av_offset_alarm_ms,
                extra={"room": self.target.room, "av_offset_alarms": extra["av_offset_alarms"]},
            )

    def _to_int16(self, samples: np.ndarray) -> np.ndarray:
        return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        """Frames still waiting for their capture time show the idle frame instead, and the speech queued in
        the audio source is dropped and replaced by silence: the cut reaches viewers at once."""
        self._interrupts += 1
        self._idle_frame = idle_frame
        loop = asyncio.get_running_loop()
        if self._audio_source is not None and self._stats.connected:
            now_s = self._clock()
            speech_cut = self._source_clock.speech_queued(now_s)
            self._audio_source.clear_queue()
            self._source_clock.cleared(now_s)
            self._drop_queued_speech()
            self._speech_end_s = min(self._speech_end_s, now_s)
            if speech_cut:  # only the pull block in progress still carries speech
                self._record_interrupt_tail(0.0)
            self._stats.extra["audio_clears"] = self._stats.extra.get("audio_clears", 0.0) + 1
            task = loop.create_task(self._refill_after_clear(self._captures, now_s))
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
        now_s = self._clock()
        cleared = sum(samples for start_s, samples in self._queued_speech if start_s >= now_s)
        self._queued_speech.clear()
        self._stats.audio_samples_published -= cleared
        self._stats.audio_samples_dropped += cleared
        self._stats.extra["audio_samples_cleared"] = (
            self._stats.extra.get("audio_samples_cleared", 0.0) + cleared
        )

    def _record_interrupt_tail(self, cleared_after_s: float) -> None:
        """`audio_interrupt_tail_ms`: how long after an interrupt speech still entered WebRTC, on this
        output's clock: the time until its queue was cleared for good plus the pull block in progress."""
        tail_ms = cleared_after_s * 1000.0 + PULL_BLOCK_SAMPLES * 1000.0 / PLAYOUT_SAMPLE_RATE_HZ
        extra = self._stats.extra
        extra["audio_interrupt_tail_ms_last"] = round(tail_ms, 3)
        extra["audio_interrupt_tail_ms_max"] = round(
            max(extra.get("audio_interrupt_tail_ms_max", 0.0), tail_ms), 3
        )

    async def _refill_after_clear(self, captures_at_clear: int, interrupted_at_s: float) -> None:
        """Silence up to the next tick's anchor, so that the cut does not wait for the next tick to re-anchor.

        A tick whose capture was under way at the clear (the lock was held) may have queued its speech after
        it: that speech is cleared too, before the silence."""
        async with self._audio_lock:
            if self._next_tick_deadline_s is None or self._audio_source is None:
                return
            now_s = self._clock()
            if self._captures != captures_at_clear:
                speech_cut = self._source_clock.speech_queued(now_s)  # the capture that landed queued speech
                self._audio_source.clear_queue()
                self._source_clock.cleared(now_s)
                self._drop_queued_speech()
                self._speech_end_s = min(self._speech_end_s, now_s)
                if speech_cut:
                    self._record_interrupt_tail(now_s - interrupted_at_s)
                self._stats.extra["audio_clears_after_capture"] = (
                    self._stats.extra.get("audio_clears_after_capture", 0.0) + 1
                )
            blocks = round((self._next_tick_deadline_s + self._audio_headroom_s - now_s) * 100)
            tick_blocks = 100 // self.options.frame_rate_fps
            # At most headroom + one tick (the next tick is up to a tick away).
            blocks = max(0, min(blocks, self.options.audio_headroom_ms // 10 + tick_blocks))
            if blocks:
                samples = blocks * PULL_BLOCK_SAMPLES
                await self._audio_source.capture_frame(
                    rtc.AudioFrame(bytes(2 * samples), PLAYOUT_SAMPLE_RATE_HZ, 1, samples)
                )
                self._source_clock.captured(samples, now_s)
                self._stats.playout_samples_published += samples
            self._stats.extra["audio_fill_blocks_last"] = float(blocks)

    async def close(self) -> None:
        self._closing = True
        for task in (self._calibrate_task, self._renew_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Frames still waiting for their capture time (up to headroom + video delay ahead) never reach the
        # room. Every session ends with a few: counted apart from drops, so frames handed in = published +
        # dropped + discarded at close, and a healthy session's drop count stays 0.
        for handle, _tick in self._pending_video.values():
            handle.cancel()
        extra = self._stats.extra
        extra["frames_discarded_at_close"] = extra.get("frames_discarded_at_close", 0.0) + len(
            self._pending_video
        )
        self._pending_video.clear()
        # Frames already handed over go in before the room goes and the source is freed (their captures use
        # both).
        await self._frames.aclose()
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


def _server_address(url: str) -> tuple[str, int]:
    """The host and TCP port a LiveKit URL (ws[s]:// or http[s]://) connects to."""
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    return parts.hostname or "localhost", parts.port or (443 if secure else 80)


def _pulled_audio(report: list[stats_pb2.RtcStats]) -> tuple[float, int] | None:
    """(seconds of audio the sender took from the source, speech and silence; when that was measured, Unix µs)
    from a local audio track's stats, or None when the report has no audio media source."""
    for item in report:
        if item.WhichOneof("stats") == "media_source" and item.media_source.source.kind == "audio":
            return item.media_source.audio.total_samples_duration, int(item.media_source.rtc.timestamp)
    return None
