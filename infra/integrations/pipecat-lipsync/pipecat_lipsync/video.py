"""`LipsyncVideoService`: a Pipecat frame processor that gives the bot a lipsync-live face in a LiveKit room.

Place it right after the TTS service:

    Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts,
              LipsyncVideoService(api_url=..., api_key=..., avatar=..., room="support-42"),
              transport.output(), context_aggregator.assistant()])

On `StartFrame` it starts a lipsync-live session publishing into `room` (or uses the one it
was given) and opens the session's audio WebSocket. Every `TTSAudioRawFrame` is sent there
(its rate and channels declared with a `config` message whenever they change), each
`TTSStoppedFrame` ends the utterance, and an `InterruptionFrame` interrupts it: the avatar
drops what it had queued and returns to idle. The avatar publishes the speech itself, in sync
with the lips, so TTS audio is not passed downstream unless `passthrough_audio=True` (then the
pipeline's transport plays it and the avatar publishes video only). A send that finds the audio
connection closed (an API replica restarting) reconnects once and goes on.
`EndFrame` waits for the last utterance to finish playing, then stops the session;
`CancelFrame` stops it at once.

The server's events become Pipecat event handlers: `on_session_started(service, created)`,
`on_ready(service, event)`, `on_playback_started(service, event)`,
`on_playback_finished(service, event)` (`interrupted`, `playback_position` in seconds) and
`on_audio_error(service, event)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from lipsync_client import (
    AudioFormat,
    AudioStream,
    AudioStreamError,
    Avatar,
    LipsyncClient,
    LipsyncError,
    LiveKitOutput,
    SessionCreated,
)
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

logger = logging.getLogger("pipecat_lipsync")

EVENT_HANDLERS = (
    "on_session_started",
    "on_ready",
    "on_playback_started",
    "on_playback_finished",
    "on_audio_error",
)
DEFAULT_DRAIN_TIMEOUT_S = 30.0


class LipsyncVideoService(FrameProcessor):
    """A lipsync-live avatar fed by the pipeline's TTS audio. See the module docstring."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        avatar: str | Avatar | None = None,
        room: str | None = None,
        identity: str | None = None,
        publish_on_behalf: str | None = None,
        session: SessionCreated | None = None,
        passthrough_audio: bool = False,
        stop_session_on_end: bool = True,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if session is None and (avatar is None or room is None):
            raise ValueError("LipsyncVideoService: give avatar and room (to start a session), or session")
        self._client = LipsyncClient(api_url, api_key)
        self._avatar = (
            avatar if isinstance(avatar, Avatar) or avatar is None else Avatar(frames_zip_url=avatar)
        )
        self._room = room
        self._identity = identity
        self._publish_on_behalf = publish_on_behalf
        self._session = session
        self._owns_session = session is None
        self._passthrough_audio = passthrough_audio
        self._stop_session_on_end = stop_session_on_end
        self._drain_timeout_s = drain_timeout_s
        self._audio: AudioStream | None = None
        self._utterance_open = False
        self._playing = 0  # utterances sent and not yet finished
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        for name in EVENT_HANDLERS:
            self._register_event_handler(name)

    @property
    def session(self) -> SessionCreated | None:
        """The lipsync-live session (its id, `livekit.identity`, status URL) once the pipeline started."""
        return self._session

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._open()
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send_audio(frame)
            if not self._passthrough_audio:
                return
        elif isinstance(frame, TTSStoppedFrame):
            await self._end_utterance()
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
        elif isinstance(frame, EndFrame):
            await self._close(drain=True, reason="the pipeline ended")
        elif isinstance(frame, CancelFrame):
            await self._close(drain=False, reason="the pipeline was cancelled")
        await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close(drain=False, reason="the pipeline was cleaned up")

    # --- internals ------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            if self._session is None:
                assert self._avatar is not None and self._room is not None
                self._session = await self._client.create_session(
                    avatar=self._avatar,
                    livekit=LiveKitOutput(
                        room=self._room,
                        identity=self._identity,
                        # The pipeline's own transport plays passed-through audio: the avatar must not too.
                        publish_audio=not self._passthrough_audio,
                        publish_on_behalf=self._publish_on_behalf,
                    ),
                )
                await self._call_event_handler("on_session_started", self._session)
            await self._connect()
        except (LipsyncError, OSError) as exc:
            await self.push_error(error_msg=f"lipsync-live: {exc}", exception=exc)

    async def _connect(self) -> None:
        # Audio sent before the session is live waits in the API's relay (bounded), so the
        # pipeline need not wait for the avatar to be ready.
        assert self._session is not None
        declared = self._audio.audio_format if self._audio is not None else None
        self._audio = self._client.audio_stream(self._session, audio_format=declared)
        self._audio.add_listener(self._on_server_event)
        await self._audio.connect()

    async def _with_reconnect(self, send: Callable[[AudioStream], Awaitable[None]]) -> None:
        """`send` on the audio socket; once more on a fresh connection if it had closed (an API replica
        restarting: the sidecar keeps the session and takes the newest connection)."""
        assert self._audio is not None
        try:
            await send(self._audio)
        except AudioStreamError as exc:
            if exc.code != "closed":
                raise
            logger.info("lipsync-live: the audio connection closed; reconnecting")
            await self._connect()
            await send(self._audio)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        if self._audio is None:
            return

        async def send(audio: AudioStream) -> None:
            declared = audio.audio_format
            if (declared.sample_rate_hz, declared.channels) != (frame.sample_rate, frame.num_channels):
                await audio.set_format(
                    AudioFormat(sample_rate_hz=frame.sample_rate, channels=frame.num_channels)
                )
            await audio.send_pcm(frame.audio)

        try:
            await self._with_reconnect(send)
        except (LipsyncError, OSError, ValueError) as exc:
            await self.push_error(error_msg=f"lipsync-live: sending audio failed: {exc}", exception=exc)
            return
        if not self._utterance_open:
            self._utterance_open = True
            self._playing += 1
            self._drained.clear()

    async def _end_utterance(self) -> None:
        if self._audio is None or not self._utterance_open:
            return
        self._utterance_open = False
        if self._playing == 0:
            self._drained.set()  # the server ended it already (500 ms without audio) and said so
        try:
            await self._with_reconnect(AudioStream.end_utterance)
        except (LipsyncError, OSError) as exc:
            await self.push_error(error_msg=f"lipsync-live: end of utterance failed: {exc}", exception=exc)

    async def _interrupt(self) -> None:
        if self._audio is None or (self._playing == 0 and not self._utterance_open):
            return  # nothing queued: an interrupt would only produce an empty playback_finished
        self._utterance_open = False
        try:
            await self._with_reconnect(AudioStream.interrupt)
        except (LipsyncError, OSError) as exc:
            await self.push_error(error_msg=f"lipsync-live: interrupt failed: {exc}", exception=exc)

    def _on_server_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "playback_finished":
            self._playing = max(0, self._playing - 1)
            if self._playing == 0 and not self._utterance_open:
                self._drained.set()
        handler = {
            "ready": "on_ready",
            "playback_started": "on_playback_started",
            "playback_finished": "on_playback_finished",
            "error": "on_audio_error",
        }.get(str(kind))
        if handler is not None:
            self.create_task(self._call_event_handler(handler, event), f"lipsync-{handler}")
        if kind == "error":
            logger.warning(
                "lipsync-live audio error", extra={"code": event.get("code"), "message": event.get("message")}
            )

    async def _close(self, *, drain: bool, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self._audio is not None:
            if drain:
                await self._end_utterance()
                try:
                    await asyncio.wait_for(self._drained.wait(), self._drain_timeout_s)
                except TimeoutError:
                    logger.warning("lipsync-live: the last utterance did not finish playing before the end")
            await self._audio.aclose()
        try:
            if self._session is not None and self._owns_session and self._stop_session_on_end:
                await self._client.stop_session(self._session.session_id, reason)
        except LipsyncError as exc:
            logger.warning(
                "lipsync-live: stopping the session failed", extra={"code": exc.code, "error": exc.message}
            )
        finally:
            await self._client.aclose()
