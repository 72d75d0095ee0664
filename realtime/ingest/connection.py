"""One audio WebSocket (docs/audio-protocol.md): its input, its outgoing messages, its playback events.

The server routes the socket here after its credential check; everything after that (the
session lookup, the format in the query, the message loop, the close) happens here, against
the `AudioSessions` protocol rather than the sidecar's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import PcmFormat
from realtime.ingest.input import AudioInput
from realtime.ingest.protocol import (
    ConfigMessage,
    EndOfUtterance,
    Interrupt,
    StatsRequest,
    config_applied_message,
    parse_client_text,
    playback_finished_message,
    playback_started_message,
    ready_message,
    stats_message,
    suspect_sample_rate_message,
)
from realtime.ingest.session import AudioSessions, ConnectionLimits
from realtime.ingest.ws_close import ws_close_code

logger = logging.getLogger(__name__)

WS_SOURCE = "ws"
# Periodic stats faster than this would let one client keep the event loop busy computing them for nothing.
MIN_STATS_INTERVAL_MS = 100
# Query parameters that are not part of the audio format (besides the server's credential parameters).
_NON_FORMAT_PARAMS = frozenset({"session_id", "stats_interval_ms", "pacing"})
# pacing=realtime: the client streams as it produces, so its arrival rate is checked (ratewatch).
PACING_VALUES = ("realtime", "burst")
# How long a close waits for the queued messages to go out before it sends the close frame.
_CLOSE_FLUSH_TIMEOUT_S = 2.0


class AudioConnection:
    """One audio WebSocket.

    Every outgoing message goes through `outbox` and one sender task, so messages never
    interleave; `_close` is the one way out (error message first, then the close frame).
    One connection per session: a newer one for the same session in `registry` replaces it.
    """

    def __init__(
        self,
        websocket: WebSocket,
        sessions: AudioSessions,
        session_id: str,
        limits: ConnectionLimits,
        registry: dict[str, AudioConnection],
        *,
        credential_params: Collection[str] = (),
    ) -> None:
        self.websocket = websocket
        self.sessions = sessions
        self.session_id = session_id
        self.limits = limits
        self.registry = registry
        self._ignored_params = _NON_FORMAT_PARAMS | frozenset(credential_params)
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.input: AudioInput | None = None
        self.pacing = "burst"  # what the client declared (`pacing` query parameter)
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._close_error: IngestError | None = None  # why `_close` began (replaced, session ended)

    def input_report(self) -> dict[str, Any] | None:
        """The declared format, pacing and accepted messages (None before the connection is ready)."""
        if self.input is None:
            return None
        return {
            "format": self.input.pcm_format.as_dict(),
            "pacing": self.pacing,
            "messages_accepted": self.input.messages_accepted,
        }

    # PlaybackListener: events for utterances that came in over the WS.
    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None:
        if source == WS_SOURCE:
            self.outbox.put_nowait(playback_started_message(utterance_id, frame_id))

    def on_playback_finished(
        self,
        utterance_id: int,
        source: str,
        position_s: float,
        interrupted: bool,
    ) -> None:
        if source == WS_SOURCE:
            self.outbox.put_nowait(playback_finished_message(utterance_id, position_s, interrupted))

    async def _send_loop(self) -> None:
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            await self.websocket.send_json(message)

    async def _stats_loop(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000.0)
            self._queue_stats()

    def _queue_stats(self) -> None:
        runtime = self.sessions.runtime(self.session_id)
        if runtime is not None:
            self.outbox.put_nowait(stats_message(runtime.stats()))

    async def _close(self, error: IngestError | None) -> None:
        """Send `error` (if any) after everything queued, then close (`ws_close_code`). Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._close_error = error
        if error is not None:
            self.outbox.put_nowait(error.to_message())
        self.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            if self._sender is None:
                await self._send_loop()
            else:
                await asyncio.wait_for(asyncio.shield(self._sender), timeout=_CLOSE_FLUSH_TIMEOUT_S)
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                code = error.code if error else None
                await self.websocket.close(ws_close_code(code), reason=code or "")

    def _parse_query(self) -> tuple[PcmFormat, int, str]:
        """(format, stats interval, pacing) from the query string; raises IngestError BAD_CONFIG."""
        params = dict(self.websocket.query_params)
        format_params = {k: v for k, v in params.items() if k not in self._ignored_params}
        pcm_format = PcmFormat.from_mapping(format_params)
        try:
            stats_interval_ms = int(params.get("stats_interval_ms", self.limits.stats_interval_ms))
        except ValueError:
            raise IngestError(IngestErrorCode.BAD_CONFIG, "stats_interval_ms must be an integer") from None
        pacing = params.get("pacing", "burst")
        if pacing not in PACING_VALUES:
            raise IngestError(
                IngestErrorCode.BAD_CONFIG, f"pacing {pacing!r} must be one of {', '.join(PACING_VALUES)}"
            )
        if stats_interval_ms != 0 and stats_interval_ms < MIN_STATS_INTERVAL_MS:
            raise IngestError(
                IngestErrorCode.BAD_CONFIG,
                f"stats_interval_ms {stats_interval_ms} must be 0 (stats only on request) "
                f"or at least {MIN_STATS_INTERVAL_MS}",
            )
        return pcm_format, stats_interval_ms, pacing

    async def serve(self, refusal: IngestError | None = None) -> None:
        """Serve the socket; `refusal` (a failed credential check) closes it before anything is looked at."""
        await self.websocket.accept()
        if refusal is not None:
            await self._close(refusal)
            return
        # A session still being brought up here is waited for (bounded): its client gets `ready` the moment
        # the output opens, without polling. One this sidecar does not host is refused at once.
        runtime = self.sessions.runtime(self.session_id) or await self.sessions.wait_runtime(
            self.session_id, self.limits.output_open_wait_s
        )
        if runtime is None:
            await self._close(
                IngestError(
                    IngestErrorCode.UNKNOWN_SESSION,
                    f"no live session {self.session_id!r} on this sidecar (not hosted here, ended, or its "
                    f"output did not open within {self.limits.output_open_wait_s:g} s)",
                    fatal=True,
                )
            )
            return
        try:
            pcm_format, stats_interval_ms, pacing = self._parse_query()
        except IngestError as exc:
            await self._close(exc)
            return
        self.input = AudioInput(
            runtime,
            WS_SOURCE,
            pcm_format,
            max_message_bytes=self.limits.max_message_bytes,
            utterance_gap_ms=self.limits.utterance_gap_ms,
            realtime_paced=pacing == "realtime",
        )
        self.pacing = pacing
        previous = self.registry.get(self.session_id)
        if previous is not None:
            # A reconnecting client takes over from its stale socket.
            await previous._close(
                IngestError(IngestErrorCode.REPLACED, "a newer audio connection for this session took over")
            )
        self.registry[self.session_id] = self
        remove_listener = runtime.add_listener(self)
        self.sessions.audio_client_joined(self.session_id)
        self._sender = asyncio.create_task(self._send_loop())
        helpers = [asyncio.create_task(self._watch_session_end())]
        if stats_interval_ms > 0:
            helpers.append(asyncio.create_task(self._stats_loop(stats_interval_ms)))
        self.outbox.put_nowait(
            ready_message(
                self.session_id,
                pcm_format,
                max_message_bytes=self.limits.max_message_bytes,
                buffer_limit_ms=runtime.config.buffer_limit_ms,
                lookahead_ms=runtime.lookahead_ms,
            )
        )
        try:
            await self._receive_loop()
        finally:
            if self.registry.get(self.session_id) is self:
                del self.registry[self.session_id]
            remove_listener()
            self.input.close()  # what the client sent still plays
            self.sessions.audio_client_left(self.session_id)
            for helper in helpers:
                helper.cancel()
            await self._close(None)

    async def _watch_session_end(self) -> None:
        """Tell the client when its session ends (stop, idle timeout, teardown) and close the socket."""
        await self.sessions.wait_session_end(self.session_id)
        await self._close(
            IngestError(IngestErrorCode.SESSION_ENDED, f"session {self.session_id} has ended", fatal=True)
        )

    async def _receive_loop(self) -> None:
        assert self.input is not None
        while not self._closing:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            if self._closing:
                self._refuse_late(message)
                return
            try:
                if message.get("bytes") is not None:
                    self.input.push(message["bytes"])
                    while self.input.rate_warnings:
                        self.outbox.put_nowait(suspect_sample_rate_message(self.input.rate_warnings.pop(0)))
                elif message.get("text") is not None:
                    self._handle_text(message["text"])
            except IngestError as exc:
                if exc.fatal:
                    await self._close(exc)
                    return
                self.outbox.put_nowait(exc.to_message())
            except Exception:
                # A defect, not bad input: the client still gets a code and a sentence (not a bare drop),
                # the traceback goes to the log, and the session itself (other clients, the clock) goes on.
                logger.exception("audio message handling failed", extra={"session_id": self.session_id})
                error = IngestError(
                    IngestErrorCode.INTERNAL_ERROR,
                    "the sidecar failed to handle this message (a bug, logged); reconnect to go on",
                    fatal=True,
                )
                await self._close(error)
                return

    def _refuse_late(self, message: dict[str, Any]) -> None:
        """Audio that arrived while the connection was closing is not played: count it as rejected."""
        assert self.input is not None
        payload = message.get("bytes")
        if not payload:
            return
        reason = self._close_error
        code = reason.code if reason is not None else IngestErrorCode.SESSION_ENDED
        pcm_format = self.input.pcm_format
        frames = len(payload) // pcm_format.bytes_per_frame
        with contextlib.suppress(IngestError):
            self.input.reject(
                IngestError(
                    code,
                    "binary message arrived while the connection was closing; the message was rejected",
                    rejected_samples=pcm_format.to_timeline_samples(frames),
                )
            )

    def _handle_text(self, text: str) -> None:
        assert self.input is not None
        parsed = parse_client_text(text, self.input.pcm_format)
        if isinstance(parsed, ConfigMessage):
            self.input.set_format(parsed.pcm_format)
            self.outbox.put_nowait(config_applied_message(parsed.pcm_format))
        elif isinstance(parsed, EndOfUtterance):
            self.input.end_utterance()
        elif isinstance(parsed, Interrupt):
            self.input.interrupt()
        elif isinstance(parsed, StatsRequest):
            self._queue_stats()
