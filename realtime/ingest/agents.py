"""The livekit-agents avatar protocol, avatar side: be a drop-in remote avatar for any LiveKit agent.

What the agent's `DataStreamAudioOutput` (livekit-agents `voice/avatar`) does, and how we answer:

- Audio: byte streams on topic `lk.audio_stream`, sent to our identity, with attributes
  `sample_rate` and `num_channels`; payload raw interleaved int16. One stream = one
  utterance (segment); its close marks the segment's end -> `end_of_utterance`.
- `lk.clear_buffer` RPC (agent -> avatar, empty payload): interrupt. We flush every stage
  and answer `lk.playback_finished` with `interrupted: true` for every segment it cut —
  and at least once, even when nothing was playing, so the agent never waits on a timeout.
  The rest of a stream that was open at the clear is discarded (counted as flushed).
- `lk.playback_finished` RPC (avatar -> agent): JSON `{"playback_position": seconds played
  of that segment, "interrupted": bool}`, after each segment plays out and after clears.
- `lk.playback_started` RPC (avatar -> agent, empty payload) when a segment's first frame
  goes out; agents that did not register it answer UNSUPPORTED_METHOD, which we accept.

The agent is the participant named by `lk.publish_on_behalf` when given; otherwise the first
participant that sends us an audio stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from livekit import rtc

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import MAX_CHANNELS, MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, PcmFormat
from realtime.ingest.input import AudioInput
from realtime.ingest.session import IngestSession

logger = logging.getLogger(__name__)

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
RPC_PLAYBACK_STARTED = "lk.playback_started"
AGENT_SOURCE = "agent"
RPC_RETRIES = 3


class AgentAudioBridge:
    """Connects one session's runtime to an agent in its LiveKit room (re-attached after reconnects)."""

    def __init__(self, runtime: IngestSession, agent_identity: str | None = None) -> None:
        self.runtime = runtime
        self.agent_identity = agent_identity
        self._room: rtc.Room | None = None
        self._input: AudioInput | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Segments are played one at a time, in arrival order.
        self._stream_lock = asyncio.Lock()
        self._current_reader: asyncio.Task[Any] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self.streams_received = 0
        self.streams_rejected = 0
        self.clears = 0
        self.rpc_failures = 0
        self.last_error = ""

    def attach(self, room: rtc.Room) -> None:
        """Register the stream handler and the clear RPC on `room` (again on the new room after a rejoin)."""
        self._room = room
        room.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream)
        room.local_participant.register_rpc_method(RPC_CLEAR_BUFFER, self._on_clear_buffer)
        if self._remove_listener is None:
            self._remove_listener = self.runtime.add_listener(self)

    async def close(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._room is not None:
            self._room.unregister_byte_stream_handler(AUDIO_STREAM_TOPIC)
            self._room.local_participant.unregister_rpc_method(RPC_CLEAR_BUFFER)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._input is not None:
            self._input.close()

    # ---- agent -> avatar ------------------------------------------------------------------

    def _accepts(self, identity: str) -> bool:
        if self.agent_identity is None:
            self.agent_identity = identity
            logger.info("agent audio source is %s", identity)
        return identity == self.agent_identity

    def _on_stream(self, reader: rtc.ByteStreamReader, participant_identity: str) -> None:
        if not self._accepts(participant_identity):
            logger.warning(
                "ignoring lk.audio_stream from %s (the agent is %s)",
                participant_identity,
                self.agent_identity,
            )
            self._spawn(self._drain(reader))
            return
        self.streams_received += 1
        if self._current_reader is not None and not self._current_reader.done():
            # The agent never overlaps segments: a new one means the open one's trailer was lost. End it.
            logger.warning("new lk.audio_stream while one is open: ending the open one")
            self._current_reader.cancel()
        task = asyncio.get_running_loop().create_task(self._read_stream(reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._current_reader = task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, reader: rtc.ByteStreamReader) -> None:
        async for _chunk in reader:
            pass

    def _stream_format(self, reader: rtc.ByteStreamReader) -> PcmFormat:
        attributes = reader.info.attributes or {}
        try:
            sample_rate_hz = int(attributes["sample_rate"])
            channels = int(attributes["num_channels"])
        except (KeyError, ValueError) as exc:
            raise IngestError(
                IngestErrorCode.BAD_CONFIG,
                f"lk.audio_stream needs integer attributes sample_rate and num_channels, got {attributes!r}",
                fatal=True,
            ) from exc
        if not (MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ and 1 <= channels <= MAX_CHANNELS):
            raise IngestError(
                IngestErrorCode.BAD_CONFIG,
                f"lk.audio_stream sample_rate {sample_rate_hz} / num_channels {channels} out of range",
                fatal=True,
            )
        return PcmFormat(sample_rate_hz=sample_rate_hz, channels=channels)

    async def _read_stream(self, reader: rtc.ByteStreamReader) -> None:
        async with self._stream_lock:
            await self._read_segment(reader)

    async def _read_segment(self, reader: rtc.ByteStreamReader) -> None:
        try:
            pcm_format = self._stream_format(reader)
        except IngestError as exc:
            self.streams_rejected += 1
            self.last_error = exc.message
            logger.error("rejected agent audio stream: %s", exc)
            await self._drain(reader)
            return
        if self._input is None:
            self._input = AudioInput(self.runtime, AGENT_SOURCE, pcm_format, utterance_gap_ms=0)
        audio_input = self._input
        audio_input.set_format(pcm_format)
        generation = self.runtime.timeline.generation
        carry = b""  # chunks are byte ranges of one stream: a sample may straddle two of them
        discarded_bytes = 0
        try:
            async for chunk in reader:
                if self.runtime.timeline.generation != generation:
                    discarded_bytes += len(chunk)  # cleared: the rest of this segment is not played
                    continue
                data = carry + chunk
                usable = len(data) - len(data) % pcm_format.bytes_per_frame
                carry = data[usable:]
                if not usable:
                    continue
                mono = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
                if pcm_format.channels > 1:
                    mono = mono.reshape(-1, pcm_format.channels).mean(axis=1, dtype=np.float32)
                try:
                    audio_input.push_samples(mono)
                except IngestError as exc:
                    self.last_error = exc.message
                    logger.error("agent audio rejected: %s", exc)
        except asyncio.CancelledError:
            # Superseded by a newer stream (or shutting down): what arrived still plays.
            if self.runtime.timeline.generation == generation:
                audio_input.end_utterance()
            else:
                self._account_cleared(audio_input, pcm_format, discarded_bytes + len(carry))
            raise
        if self.runtime.timeline.generation != generation:
            self._account_cleared(audio_input, pcm_format, discarded_bytes + len(carry))
            return
        if carry:
            try:
                audio_input.reject(
                    IngestError(
                        IngestErrorCode.MISALIGNED_PCM,
                        f"lk.audio_stream ended with {len(carry)} byte(s) that are not a whole sample frame",
                    )
                )
            except IngestError as exc:
                logger.error("%s", exc)
        audio_input.end_utterance()

    def _account_cleared(self, audio_input: AudioInput, pcm_format: PcmFormat, discarded_bytes: int) -> None:
        """Cleared mid-segment: what arrived after the clear counts as received and flushed, never played."""
        audio_input.settle()
        self.runtime.timeline.discard_held(
            pcm_format.to_timeline_samples(discarded_bytes // pcm_format.bytes_per_frame)
        )

    def _on_clear_buffer(self, data: rtc.RpcInvocationData) -> str:
        if self.agent_identity is not None and data.caller_identity != self.agent_identity:
            logger.warning("lk.clear_buffer from unexpected participant %s", data.caller_identity)
            return "reject"
        self.clears += 1
        finished = self.runtime.interrupt()
        if not any(item.source == AGENT_SOURCE for item in finished):
            # Always answer a clear, so the agent's playout bookkeeping never waits for a timeout.
            self._send_finished(0.0, True)
        return "ok"

    # ---- avatar -> agent (PlaybackListener) ------------------------------------------------

    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None:
        if source == AGENT_SOURCE:
            self._spawn(self._rpc(RPC_PLAYBACK_STARTED, ""))

    def on_playback_finished(
        self,
        utterance_id: int,
        source: str,
        position_s: float,
        interrupted: bool,
    ) -> None:
        if source == AGENT_SOURCE:
            self._send_finished(position_s, interrupted)

    def _send_finished(self, position_s: float, interrupted: bool) -> None:
        payload = json.dumps({"playback_position": round(position_s, 6), "interrupted": interrupted})
        self._spawn(self._rpc(RPC_PLAYBACK_FINISHED, payload))

    async def _rpc(self, method: str, payload: str) -> None:
        room, agent = self._room, self.agent_identity
        if room is None or agent is None:
            return
        for attempt in range(RPC_RETRIES):
            try:
                await room.local_participant.perform_rpc(
                    destination_identity=agent,
                    method=method,
                    payload=payload,
                )
                return
            except rtc.RpcError as exc:
                if exc.code == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD and method == RPC_PLAYBACK_STARTED:
                    return  # optional for agents
                if attempt == RPC_RETRIES - 1:
                    self.rpc_failures += 1
                    self.last_error = f"{method} failed: {exc.message}"
                    logger.error("%s to %s failed: %s", method, agent, exc.message)
                    return
                await asyncio.sleep(0.1)
