"""A LiveKit subscriber that records what it receives, and the measurements the acceptance tests make on it.

How A/V sync is measured at the subscriber (docs/audio-protocol.md repeats this):

1. Every received video frame carries `frame_id` (the session clock's frame number) and its
   arrival time. Every received 10 ms audio chunk has an arrival time; received sample r
   is taken to play at arrival(chunk) + (r - first sample of the chunk) / 48 000. The SDK
   hands audio out at real-time pace but queues it while this reader is starved (a loaded
   host), and the queued chunks then arrive in a burst: a chunk's play time is therefore
   taken as the earlier of its arrival and the next chunk's play time less its own length
   (a reader that fell behind makes audio look late; the stream itself never runs faster
   than real time). The A/V offset keeps each video frame's arrival: a starved reader makes
   video look late, never early, so the measured offset errs towards the failing side.
   Where a test asks which frames showed while the audio was loud, both sides need play
   times: video frames queue the same way (the Python stream's queue is unbounded), and
   `frame_play_times` undoes their bursts with the frames' capture timestamps.
2. The received audio is aligned to the speech that was sent (cross-correlation of the 48 kHz
   signals), giving `lag`: the received-sample index of the utterance's first sample.
3. The sidecar says which clock frame carried the utterance's first 40 ms (`playback_started`
   `frame_id`). So frame `n` shows utterance samples from (n - n0)·1920 on, and the offset of
   that frame is arrival(frame n) - play time(received sample lag + (n - n0)·1920):
   positive = video late. We report the median over the utterance's frames, and the same
   difference at the speech onset (first sample whose 10 ms envelope exceeds 10 % of the peak).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
from livekit import api, rtc

from infra.livekit import LiveKitServerConfig

PLAYOUT_RATE_HZ = 48_000
SAMPLES_PER_FRAME_48K = 1920


def token(config: LiveKitServerConfig, identity: str, room: str, **attributes: str) -> str:
    builder = (
        api.AccessToken(config.api_key, config.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True))
    )
    if attributes:
        builder = builder.with_attributes(attributes)
    return builder.to_jwt()


def agent_token(config: LiveKitServerConfig, identity: str, room: str, **attributes: str) -> str:
    builder = (
        api.AccessToken(config.api_key, config.api_secret)
        .with_identity(identity)
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room, agent=True, can_update_own_metadata=True))
    )
    if attributes:
        builder = builder.with_attributes(attributes)
    return builder.to_jwt()


@dataclass
class ReceivedFrame:
    arrival_s: float  # time.monotonic()
    arrival_wall_us: int  # time.time() in microseconds: with user_timestamp, the frame's end-to-end latency
    frame_id: int
    user_timestamp_us: int
    mouth: np.ndarray  # the mouth region of the frame (RGB)
    width_px: int
    height_px: int


@dataclass(frozen=True)
class JitterSample:
    """One reading of the subscriber's receive statistics for a track (cumulative counters, as WebRTC keeps
    them)."""

    at_s: float  # time.monotonic()
    kind: str  # "audio" | "video"
    jitter_buffer_delay_s: float  # summed over emitted samples (audio) or frames (video)
    jitter_buffer_target_delay_s: float
    # Summed like the delay: WebRTC's jitterBufferMinimumDelay, the least delay the buffer was held to.
    jitter_buffer_minimum_delay_s: float
    emitted: int
    concealed_samples: int
    removed_for_acceleration: int
    inserted_for_deceleration: int


def mean_jitter_delay_ms(
    samples: list[JitterSample], kind: str, since_s: float, until_s: float, *, minimum: bool = False
) -> float | None:
    """The jitter buffer's mean delay (ms) over what it emitted between two readings around [since_s,
    until_s]; with `minimum`, the mean least delay it was held to."""
    rows = [row for row in samples if row.kind == kind and since_s <= row.at_s <= until_s]
    if len(rows) < 2 or rows[-1].emitted <= rows[0].emitted:
        return None
    if minimum:
        delay_s = rows[-1].jitter_buffer_minimum_delay_s - rows[0].jitter_buffer_minimum_delay_s
    else:
        delay_s = rows[-1].jitter_buffer_delay_s - rows[0].jitter_buffer_delay_s
    return 1000.0 * delay_s / (rows[-1].emitted - rows[0].emitted)


def _bursts_undone(arrivals_s: np.ndarray, positions_s: np.ndarray) -> np.ndarray:
    """Play times of items that reached a reader at `arrivals_s` and sit at `positions_s` in their stream:
    each item plays no later than the next one's play time less the distance between them, i.e. its
    position plus the running minimum of arrival - position from the end (a stream never runs faster than
    real time; a starved reader only delays)."""
    return np.asarray(np.minimum.accumulate((arrivals_s - positions_s)[::-1])[::-1] + positions_s)


@dataclass
class RoomRecorder:
    """Subscribes to the avatar's tracks and records frames (mouth region) and audio with arrival times."""

    mouth_box: tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels
    frames: list[ReceivedFrame] = field(default_factory=list)
    audio_chunks: list[tuple[float, np.ndarray]] = field(default_factory=list)
    track_names: dict[str, str] = field(default_factory=dict)  # name -> kind
    room: rtc.Room = field(default_factory=rtc.Room)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _audio_task: asyncio.Task[None] | None = None
    # With `stats_interval_s`, the receive statistics of both tracks are read that often (measurements only).
    stats_interval_s: float | None = None
    jitter: list[JitterSample] = field(default_factory=list)
    _tracks: dict[str, rtc.Track] = field(default_factory=dict)

    async def connect(self, url: str, jwt: str) -> None:
        @self.room.on("track_subscribed")
        def on_track(track: rtc.Track, publication: rtc.RemoteTrackPublication, participant: object) -> None:
            self.track_names[track.name] = "video" if track.kind == rtc.TrackKind.KIND_VIDEO else "audio"
            self._tracks[self.track_names[track.name]] = track
            if track.kind == rtc.TrackKind.KIND_VIDEO:
                self._tasks.append(asyncio.create_task(self._read_video(track)))
                return
            # Like a player, follow the newest audio track (the avatar renews it after a stall): the old one's
            # stream is stopped, so the recorded audio stays one timeline.
            if self._audio_task is not None:
                self._audio_task.cancel()
            self._audio_task = asyncio.create_task(self._read_audio(track))
            self._tasks.append(self._audio_task)

        await self.room.connect(url, jwt)
        if self.stats_interval_s is not None:
            self._tasks.append(asyncio.create_task(self._read_stats(self.stats_interval_s)))

    async def _read_stats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for kind, track in list(self._tracks.items()):
                try:
                    report = await track.get_stats()
                except Exception:  # a track being replaced: the next reading has the new one
                    continue
                for item in report:
                    if item.WhichOneof("stats") != "inbound_rtp":
                        continue
                    inbound = item.inbound_rtp.inbound
                    self.jitter.append(
                        JitterSample(
                            at_s=time.monotonic(),
                            kind=kind,
                            jitter_buffer_delay_s=inbound.jitter_buffer_delay,
                            jitter_buffer_target_delay_s=inbound.jitter_buffer_target_delay,
                            jitter_buffer_minimum_delay_s=inbound.jitter_buffer_minimum_delay,
                            emitted=int(inbound.jitter_buffer_emitted_count),
                            concealed_samples=int(inbound.concealed_samples),
                            removed_for_acceleration=int(inbound.removed_samples_for_acceleration),
                            inserted_for_deceleration=int(inbound.inserted_samples_for_deceleration),
                        )
                    )

    async def _read_video(self, track: rtc.Track) -> None:
        x1, y1, x2, y2 = self.mouth_box
        async for event in rtc.VideoStream(track, format=rtc.VideoBufferType.RGB24):
            arrival = time.monotonic()
            arrival_wall_us = int(time.time() * 1_000_000)
            frame = event.frame
            image = np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, 3)
            metadata = event.metadata
            self.frames.append(
                ReceivedFrame(
                    arrival_s=arrival,
                    arrival_wall_us=arrival_wall_us,
                    frame_id=int(metadata.frame_id) if metadata is not None else -1,
                    user_timestamp_us=int(metadata.user_timestamp) if metadata is not None else 0,
                    mouth=image[y1:y2, x1:x2].copy(),
                    width_px=frame.width,
                    height_px=frame.height,
                )
            )

    async def _read_audio(self, track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=PLAYOUT_RATE_HZ, num_channels=1):
            self.audio_chunks.append(
                (time.monotonic(), np.frombuffer(event.frame.data, dtype=np.int16).copy())
            )

    async def wait_for(self, predicate: object, timeout_s: float) -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"subscriber: condition not met in {timeout_s} s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.room.disconnect()

    # ---- derived signals ------------------------------------------------------------------

    def audio(self) -> np.ndarray:
        """All received audio as float32 at 48 kHz."""
        if not self.audio_chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([chunk for _, chunk in self.audio_chunks]).astype(np.float32) / 32768.0

    def chunk_play_times(self) -> np.ndarray:
        """Per received audio chunk, when its first sample plays: its arrival, bursts of a starved reader
        undone (see the module docstring). With S_k the chunk's start in seconds of audio, play_k =
        min(arrival_k, play_(k+1) - length_k) is S_k plus the running minimum of arrival - S from the end."""
        lengths_s = np.array([len(chunk) for _, chunk in self.audio_chunks]) / PLAYOUT_RATE_HZ
        arrivals = np.array([t for t, _ in self.audio_chunks])
        starts_s = np.concatenate([[0.0], np.cumsum(lengths_s)[:-1]]) if len(lengths_s) else lengths_s
        return _bursts_undone(arrivals, starts_s)

    def frame_play_times(self) -> np.ndarray:
        """Per received frame (as in `frames`), when it shows: its arrival, bursts of a starved reader undone
        as for audio, with the frame's capture time on the sidecar's clock (its user timestamp) as its place
        in the stream. NaN for frames without a timestamp (none: the avatar stamps every frame)."""
        stamped = np.array([f.user_timestamp_us > 0 for f in self.frames], dtype=bool)
        arrivals = np.array([f.arrival_s for f in self.frames])
        positions_s = np.array([f.user_timestamp_us for f in self.frames], dtype=np.float64) / 1e6
        plays = np.full(len(self.frames), np.nan)
        plays[stamped] = _bursts_undone(arrivals[stamped], positions_s[stamped])
        return plays

    def audio_play_time(self, sample_index: np.ndarray) -> np.ndarray:
        """Play time of received samples (see the module docstring)."""
        starts = np.cumsum([0] + [len(chunk) for _, chunk in self.audio_chunks])
        plays = self.chunk_play_times()
        chunk = np.clip(np.searchsorted(starts, sample_index, side="right") - 1, 0, len(plays) - 1)
        return np.asarray(plays[chunk] + (sample_index - starts[chunk]) / PLAYOUT_RATE_HZ)

    def latency_ms(self) -> np.ndarray:
        """Per frame: arrival here minus the frame's tick on the sidecar's clock (its user timestamp)."""
        return np.array(
            [(f.arrival_wall_us - f.user_timestamp_us) / 1000.0 for f in self.frames if f.user_timestamp_us]
        )

    def fps(self, since_s: float | None = None) -> float:
        times = [f.arrival_s for f in self.frames if since_s is None or f.arrival_s >= since_s]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def idle_and_loud_frames(
    recorder: RoomRecorder, side_px: int, *, idle_margin_s: float = 0.3, loud_fraction: float = 0.3
) -> tuple[list[ReceivedFrame], list[ReceivedFrame]]:
    """(full-size frames shown before the heard speech began, those shown while it was loud), by play time.

    For tests that know neither the utterance's first frame nor its samples (the speech came from a client
    we did not write): the avatar publishes audio and video from one clock, so a frame and the audio that
    played with it belong together. Play times, not arrivals: on a loaded host both streams can reach this
    reader in bursts, each on its own schedule (see the module docstring); compared by arrival, smooth
    frames against audio handed out in 100 ms bursts miss loud audio about half the time.
    Loud: a 10 ms chunk above `loud_fraction` of the loudest; the speech began at the first chunk above 5 %.
    """
    times = recorder.chunk_play_times()
    level = np.array(
        [
            float(np.sqrt(np.mean((chunk.astype(np.float32) / 32768.0) ** 2)))
            for _, chunk in recorder.audio_chunks
        ]
    )
    if not level.size or level.max() <= 0.0:
        return [], []
    onset_s = float(times[np.argmax(level > 0.05 * level.max())])
    loud_times = np.sort(times[level > loud_fraction * level.max()])
    half_chunk_s = 0.02  # a frame shows for 40 ms: within 20 ms of a loud chunk's start is "with" it
    idle: list[ReceivedFrame] = []
    loud: list[ReceivedFrame] = []
    for frame, play_s in zip(recorder.frames, recorder.frame_play_times(), strict=True):
        if (frame.width_px, frame.height_px) != (side_px, side_px) or not np.isfinite(play_s):
            continue
        if play_s < onset_s - idle_margin_s:
            idle.append(frame)
        elif np.min(np.abs(loud_times - play_s)) < half_chunk_s:
            loud.append(frame)
    return idle, loud


def received_frames_summary(recorder: RoomRecorder) -> dict[str, object]:
    """What a failing frame count needs to be read: the sizes received and the gaps in the clock's frame
    numbers (frames the subscriber never got)."""
    ids = [f.frame_id for f in recorder.frames if f.frame_id >= 0]
    return {
        "sizes": dict(Counter(f"{f.width_px}x{f.height_px}" for f in recorder.frames)),
        "frame_id_gaps": dict(Counter(b - a for a, b in pairwise(ids) if b - a != 1)),
        "frames": len(recorder.frames),
    }


def mouth_change(frame: ReceivedFrame, idle_mouth: np.ndarray) -> float:
    """Mean absolute difference (0-255) between a received mouth region and the idle frame's."""
    return float(np.abs(frame.mouth.astype(np.float32) - idle_mouth.astype(np.float32)).mean())


def envelope(samples: np.ndarray, rate_hz: int, window_ms: float = 10.0) -> np.ndarray:
    window = max(1, int(rate_hz * window_ms / 1000))
    n = len(samples) // window
    return np.sqrt(np.mean(np.square(samples[: n * window].reshape(n, window), dtype=np.float64), axis=1))


def align(received: np.ndarray, sent: np.ndarray) -> tuple[int, float]:
    """Lag (received index of sent[0]) maximising the normalised cross-correlation, and its value."""
    size = 1 << int(np.ceil(np.log2(len(received) + len(sent))))
    spectrum = np.fft.rfft(received, size) * np.conj(np.fft.rfft(sent, size))
    correlation = np.fft.irfft(spectrum, size)[: len(received)]
    lag = int(np.argmax(correlation))
    norm = np.linalg.norm(sent) * np.linalg.norm(received[lag : lag + len(sent)]) or 1.0
    return lag, float(correlation[lag] / norm)


def envelope_correlation(received: np.ndarray, sent: np.ndarray, lag: int) -> float:
    """Pearson r of the 10 ms envelopes of the sent speech and the aligned received audio."""
    segment = received[lag : lag + len(sent)]
    a, b = envelope(sent[: len(segment)], PLAYOUT_RATE_HZ), envelope(segment, PLAYOUT_RATE_HZ)
    return float(np.corrcoef(a, b)[0, 1])


def block_lags(
    received: np.ndarray, sent: np.ndarray, lag: int, block: int = 24_000, search: int = 4_800
) -> list[int]:
    """For each loud `block` of the sent speech, its best lag relative to the global `lag` (in samples).

    All zero (±1 sample of codec phase) when the received audio is the sent audio, shifted as a whole; a
    gap the sender could not fill (an audio source queue that ran dry) shows up as a jump by its length.
    """
    lags = []
    starts = range(0, len(sent) - block, block)
    rms = {start: float(np.sqrt(np.mean(np.square(sent[start : start + block])))) for start in starts}
    loudest = max(rms.values(), default=0.0)
    for start in starts:
        segment = sent[start : start + block]
        window = received[lag + start - search : lag + start + block + search]
        # Mostly-silent blocks correlate poorly (their peak can sit anywhere): only loud speech is compared.
        if rms[start] < 0.3 * loudest or lag + start - search < 0 or len(window) < block + 2 * search:
            continue
        lags.append(int(np.argmax(np.correlate(window, segment, "valid"))) - search)
    return lags


def speech_onset(sent: np.ndarray, fraction: float = 0.1) -> int:
    """First sample of the first 10 ms window whose RMS exceeds `fraction` of the loudest window's."""
    env = envelope(sent, PLAYOUT_RATE_HZ)
    window = PLAYOUT_RATE_HZ // 100
    return int(np.argmax(env > fraction * env.max())) * window


@dataclass(frozen=True)
class AvOffset:
    median_ms: float
    p10_ms: float
    p90_ms: float
    onset_ms: float
    frames: int


def av_offset(
    recorder: RoomRecorder, lag: int, start_frame_id: int, utterance_samples_48k: int, onset: int
) -> AvOffset:
    frame_count = utterance_samples_48k // SAMPLES_PER_FRAME_48K
    by_id = {f.frame_id: f for f in recorder.frames}
    offsets = []
    for k in range(frame_count):
        frame = by_id.get(start_frame_id + k)
        if frame is None:
            continue
        audio_time = recorder.audio_play_time(np.array([lag + k * SAMPLES_PER_FRAME_48K]))[0]
        offsets.append((frame.arrival_s - audio_time) * 1000.0)
    # The frame that shows the onset; a subscriber under load may have dropped it (its decoder queue
    # overflowed): then the nearest received frame within two frames stands in, measured at its own first
    # sample. None of them received: KeyError (the onset frame's id), as for any frame looked up.
    onset_k = onset // SAMPLES_PER_FRAME_48K
    nearest = min(
        (k for k in range(onset_k - 2, onset_k + 3) if start_frame_id + k in by_id),
        key=lambda k: abs(k - onset_k),
        default=None,
    )
    if nearest is None:
        raise KeyError(start_frame_id + onset_k)
    k = nearest
    onset_frame = by_id[start_frame_id + k]
    if k != onset_k:
        onset = k * SAMPLES_PER_FRAME_48K
    onset_in_frame_s = (onset % SAMPLES_PER_FRAME_48K) / PLAYOUT_RATE_HZ
    onset_audio = recorder.audio_play_time(np.array([lag + onset]))[0]
    values = np.array(offsets)
    return AvOffset(
        median_ms=float(np.median(values)),
        p10_ms=float(np.percentile(values, 10)),
        p90_ms=float(np.percentile(values, 90)),
        onset_ms=float((onset_frame.arrival_s + onset_in_frame_s - onset_audio) * 1000.0),
        frames=len(offsets),
    )
