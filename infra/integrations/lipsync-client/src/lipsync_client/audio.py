"""`AudioStream`: one session's audio WebSocket (docs/audio-protocol.md): PCM out, playback events in.

A background task reads the server's messages as they come, so a sender that only sends
never stalls the socket; the events wait in a queue for `next_event`/`events`, and every
listener added with `add_listener` is called with each one as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from lipsync_client.errors import AudioStreamError, WaitTimeoutError
from lipsync_client.models import AudioFormat

logger = logging.getLogger("lipsync_client.audio")

Event = dict[str, Any]
Listener = Callable[[Event], None]

# The server's limit per binary message is 1 MiB; larger buffers are split below it.
MAX_CHUNK_BYTES = 512 * 1024
DEFAULT_CHUNK_MS = 100
# The relay answers `ready` only once the session is live (placement, avatar preparation).
DEFAULT_READY_TIMEOUT_S = 120.0
# Events wait here for next_event/events; a client that only uses listeners never reads them, so
# the oldest are dropped past this many (stats arrive every second on a long session).
MAX_QUEUED_EVENTS = 1024


class AudioStream:
    """The audio WebSocket of one session. Open with `async with`; see `LipsyncClient.audio_stream`."""

    def __init__(self, url: str, *, api_key: str, audio_format: AudioFormat | None = None) -> None:
        self.url = url
        self._api_key = api_key
        self.audio_format = audio_format or AudioFormat()
        self._declare_format = audio_format is not None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._listeners: list[Listener] = []
        self._ready: asyncio.Future[Event] | None = None
        self.close_reason = ""

    async def __aenter__(self) -> AudioStream:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        # The key goes in a header, never the URL; the URL is used exactly as the server gave it.
        self._ws = await connect(self.url, additional_headers={"X-API-Key": self._api_key}, max_size=2**20)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self._ws), name="lipsync-audio-reader")
        if self._declare_format:
            await self._send_json({"type": "config", **self.audio_format.to_json()})

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` for every server message from now on (on the event loop: keep it quick)."""
        self._listeners.append(listener)

    async def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> Event:
        """The server's `ready` message: the session is live and audio is welcome."""
        if self._ready is None:
            raise AudioStreamError("the audio stream is not connected: use `async with` or connect()")
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except TimeoutError as exc:
            raise WaitTimeoutError(f"no `ready` on the audio WebSocket within {timeout_s:.0f} s") from exc

    # --- sending --------------------------------------------------------------------------

    async def send_pcm(self, pcm: bytes) -> None:
        """Send audio in the declared format; any number of whole sample frames."""
        frame_bytes = self.audio_format.bytes_per_sample_frame
        if len(pcm) % frame_bytes:
            raise ValueError(
                f"{len(pcm)} bytes is not a whole number of {frame_bytes}-byte sample frames "
                f"({self.audio_format.encoding}, {self.audio_format.channels} channel(s))"
            )
        step = MAX_CHUNK_BYTES - MAX_CHUNK_BYTES % frame_bytes
        for offset in range(0, len(pcm), step):
            await self._send(pcm[offset : offset + step])

    async def set_format(self, audio_format: AudioFormat) -> None:
        """Declare the PCM that follows (a `config` message); the open utterance keeps what was sent."""
        await self._send_json({"type": "config", **audio_format.to_json()})
        self.audio_format = audio_format

    async def end_utterance(self) -> None:
        """The utterance is complete: its tail plays now and `playback_finished` follows."""
        await self._send_json({"type": "end_of_utterance"})

    async def interrupt(self) -> None:
        """Barge-in: everything queued is flushed and the avatar returns to idle."""
        await self._send_json({"type": "interrupt"})

    async def request_stats(self) -> None:
        await self._send_json({"type": "stats"})

    async def stream_pcm(
        self, pcm: bytes, *, chunk_ms: int = DEFAULT_CHUNK_MS, realtime: bool = True
    ) -> None:
        """Send one utterance in `chunk_ms` pieces (at real-time pace unless `realtime=False`), then end
        it."""
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        fmt = self.audio_format
        chunk_bytes = max(1, fmt.sample_rate_hz * chunk_ms // 1000) * fmt.bytes_per_sample_frame
        started_s = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), chunk_bytes)):
            if realtime:
                await asyncio.sleep(max(0.0, started_s + index * chunk_ms / 1000 - time.monotonic()))
            await self.send_pcm(pcm[offset : offset + chunk_bytes])
        await self.end_utterance()

    # --- receiving ------------------------------------------------------------------------

    async def next_event(self, kinds: str | Iterable[str], *, timeout_s: float = 30.0) -> Event:
        """The next server message whose `type` is in `kinds`; others before it are skipped.

        An `error` message raises `AudioStreamError` (unless `error` is asked for), and so does
        the socket closing.
        """
        wanted = {kinds} if isinstance(kinds, str) else set(kinds)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self._events.get(), max(0.0, remaining))
            except TimeoutError as exc:
                raise WaitTimeoutError(
                    f"no {'/'.join(sorted(wanted))} on the audio WebSocket within {timeout_s} s"
                ) from exc
            if event is None:
                self._enqueue(None)  # every later wait sees the close too
                raise AudioStreamError(f"the audio WebSocket closed: {self.close_reason}", code="closed")
            kind = event.get("type")
            if kind in wanted:
                return event
            if kind == "error":
                raise AudioStreamError(str(event.get("message", "")), code=str(event.get("code", "error")))

    async def events(self) -> AsyncIterator[Event]:
        """Every server message, in order, until the socket closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._enqueue(None)
                return
            yield event

    # --- internals ------------------------------------------------------------------------

    def _enqueue(self, event: Event | None) -> None:
        if self._events.full():
            self._events.get_nowait()  # the oldest goes: nobody is reading them
        self._events.put_nowait(event)

    def _connection(self) -> ClientConnection:
        if self._ws is None:
            raise AudioStreamError("the audio stream is not connected: use `async with` or connect()")
        return self._ws

    async def _send_json(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message))

    async def _send(self, message: bytes | str) -> None:
        """One message; a closed socket is an `AudioStreamError` with code `closed` (reconnect to go on)."""
        try:
            await self._connection().send(message)
        except ConnectionClosed as exc:
            raise AudioStreamError(f"the audio WebSocket closed: {exc}", code="closed") from exc

    async def _read(self, ws: ClientConnection) -> None:
        assert self._ready is not None
        try:
            async for message in ws:
                if not isinstance(message, str):
                    continue  # the server sends text only; a binary frame means nothing here
                try:
                    event = json.loads(message)
                except ValueError:
                    logger.warning("audio WebSocket: a non-JSON text message was ignored")
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "ready" and not self._ready.done():
                    self._ready.set_result(event)
                if event.get("type") == "error" and not self._ready.done():
                    self._ready.set_exception(
                        AudioStreamError(str(event.get("message", "")), code=str(event.get("code", "error")))
                    )
                    # Retrieved here: a caller that never waits must not log it as lost.
                    self._ready.exception()
                for listener in list(self._listeners):
                    try:
                        listener(event)
                    except Exception:
                        logger.exception(
                            "audio event listener failed", extra={"event_type": event.get("type")}
                        )
                self._enqueue(event)
        except ConnectionClosed:
            pass
        finally:
            code = ws.close_code
            self.close_reason = (
                f"code {code} {ws.close_reason or ''}".strip() if code is not None else "connection lost"
            )
            if not self._ready.done():
                self._ready.set_exception(
                    AudioStreamError(f"the audio WebSocket closed: {self.close_reason}", code="closed")
                )
                self._ready.exception()  # retrieved here: a caller that never waits must not log it as lost
            self._enqueue(None)
