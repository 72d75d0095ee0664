"""`WS /v1/sessions/{id}/audio` on the API: the session's audio, relayed to the sidecar that serves it.

A caller gets `audio_ws_url` in the 201 of `POST /v1/sessions`, before the session has been
placed on a sidecar, so that URL points here. The relay waits until the session's sidecar has
its avatar ready (phase `warming_up` or `opening_output`) or the session is `live`, connects to
the sidecar's `/v1/sessions/{id}/audio` with the same query (format parameters) — the sidecar
holds such an early connection until the output opens and then sends `ready`, so the caller
hears of it at once, with no status polling meanwhile — then passes messages both ways
unchanged: the protocol is the sidecar's (docs/audio-protocol.md). An early connection that the
sidecar closes before `ready` (the session moved to another sidecar, or its output never opened
there) is not the caller's end: the relay goes back to waiting, and connects to that sidecar
again only once the session is `live`. While waiting it sends nothing; the sidecar's
`ready` message is the caller's signal to stream, but audio sent earlier is kept (up to
`EARLY_BUFFER_MAX_BYTES`) and forwarded first, in order — as the sidecar itself would accept
it. If the session fails before `live`, the caller gets `{"type": "error", "code",
"message"}` and the close code `realtime.ingest.ws_close` gives that code (1011 for a failed session).

The relay registry also serves `POST /v1/sessions/{id}/interrupt` (an `interrupt` message
injected upstream) and `/debug/audio` (bytes and messages relayed, connection state).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import websockets
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection

from api.auth import API_KEY_HEADER
from api.sidecars import SidecarDirectory
from realtime.ingest.ws_close import CLOSE_NORMAL, ws_close_code
from workflows.contracts import TERMINAL_PHASES, Phase, SessionStatus
from workflows.sidecar_tokens import AUDIO_TOKEN_PARAM

logger = logging.getLogger(__name__)

# Close codes that mean the connection broke without a close frame (RFC 6455 7.4.1: never sent on the wire).
_NO_CLOSE_FRAME_CODES = frozenset({1006, 1015})
_CLOSE_NO_STATUS = 1005  # a close frame without a code: a normal end, sent on as 1000
# A close frame's reason is at most 123 bytes of UTF-8.
_MAX_CLOSE_REASON_BYTES = 123
STATUS_POLL_S = 0.2
# Once the output is opening, live is one step away: poll closer, so the caller's `ready` is not held back by
# most of a poll period (the earlier phases take longer, and polling them faster would only load Temporal).
# Only where the early connection is not possible (its sidecar refused it); otherwise the sidecar says `ready`
# itself.
STATUS_POLL_NEAR_LIVE_S = 0.05
# Phases in which the session's sidecar hosts it (its avatar is prepared) but the output is not open yet: the
# relay connects then, and the sidecar sends `ready` when the output opens.
EARLY_CONNECT_PHASES = frozenset({Phase.WARMING_UP, Phase.OPENING_OUTPUT})
# The sidecar's refusal of a connection for a session it does not (or no longer) host, or whose output did
# not open within its wait.
_REFUSED_UNKNOWN_SESSION = "unknown_session"
# The sidecar enforces its own, smaller limit with a typed error.
UPSTREAM_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
EARLY_BUFFER_MAX_BYTES = 16 * 1024 * 1024  # audio held while waiting for `live` (8 min of s16le 16 kHz)
# Once live, at most this much waits for a slow sidecar; past it the relay stops reading from the caller, so
# TCP flow control slows the caller down instead of this process buffering without bound.
LIVE_QUEUE_MAX_BYTES = 4 * 1024 * 1024

StatusOf = Callable[[str], Awaitable[SessionStatus | None]]
ClientMessage = MutableMapping[str, Any]  # an ASGI websocket.receive message


@dataclass
class RelayState:
    session_id: str
    state: str = "waiting_for_live"  # waiting_for_live | connected | closed | failed
    sidecar: str = ""
    upstream_url: str = ""
    opened_at_s: float = field(default_factory=time.time)
    connected_at_s: float | None = None
    closed_at_s: float | None = None
    bytes_to_sidecar: int = 0
    early_bytes: int = 0  # sent by the caller before the sidecar was connected (forwarded first)
    queued_bytes: int = 0  # received from the caller, not yet sent to the sidecar
    reader_pauses: int = 0  # times the relay stopped reading the caller because the sidecar fell behind
    early_connects: int = 0  # connections made before `live` (the sidecar says `ready` once the output opens)
    early_refusals: int = 0  # of those, closed by the sidecar before `ready` (the relay waited again)
    binary_messages_to_sidecar: int = 0
    text_messages_to_sidecar: int = 0
    messages_to_client: int = 0
    last_client_message_at_s: float | None = None
    last_server_message: dict[str, Any] | None = None  # the sidecar's latest non-stats message
    close_reason: str = ""
    upstream: ClientConnection | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "upstream"}


class RelayRegistry:
    """The relays this API process holds, by session id (the latest connection per session)."""

    def __init__(self) -> None:
        self.active: dict[str, RelayState] = {}
        self.recent: dict[str, RelayState] = {}  # closed relays, for /debug/audio (bounded)

    def add(self, relay: RelayState) -> None:
        self.active[relay.session_id] = relay

    def remove(self, relay: RelayState) -> None:
        if self.active.get(relay.session_id) is relay:
            del self.active[relay.session_id]
        self.recent[relay.session_id] = relay
        while len(self.recent) > 256:
            self.recent.pop(next(iter(self.recent)))

    async def interrupt(self, session_id: str) -> bool:
        relay = self.active.get(session_id)
        if relay is None or relay.upstream is None:
            return False
        await relay.upstream.send(json.dumps({"type": "interrupt"}))
        relay.text_messages_to_sidecar += 1
        return True


def presented_ws_key(websocket: WebSocket) -> str | None:
    key = websocket.headers.get(API_KEY_HEADER) or websocket.query_params.get("api_key")
    if key:
        return key
    scheme, _, value = websocket.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def relay_audio(
    websocket: WebSocket,
    session_id: str,
    *,
    status_of: StatusOf,
    sidecars: SidecarDirectory,
    registry: RelayRegistry,
    live_wait_s: float,
    traceparent: dict[str, str],
) -> None:
    await websocket.accept()
    relay = RelayState(session_id=session_id)
    registry.add(relay)
    # One reader for the whole connection: it notices a caller that leaves while we wait,
    # and keeps what the caller sends before the sidecar is connected, in order.
    inbox: asyncio.Queue[ClientMessage | None] = asyncio.Queue()
    drained = asyncio.Event()  # set whenever the queue is back under LIVE_QUEUE_MAX_BYTES
    reader = asyncio.create_task(_read_client(websocket, inbox, relay, drained))
    try:
        started_s = time.monotonic()
        refused: set[str] = set()  # sidecars that closed an early connection: connect there only once live
        while True:
            found = await _wait_until_live(
                websocket,
                session_id,
                status_of,
                live_wait_s=live_wait_s,
                relay=relay,
                reader=reader,
                early_to=lambda sidecar_id: sidecar_id not in refused,
                started_s=started_s,
            )
            if found is None:
                return
            sidecar, early = found
            base = sidecars.ws_url(sidecar)
            if base is None:
                await _fail(
                    websocket,
                    relay,
                    "sidecar_unknown",
                    f"sidecar {sidecar!r} is not in LIPSYNC_SIDECAR_URLS",
                )
                return
            # The session is in the upstream path; `session_id` is the seed route's way of naming it
            # (`/audio`). The caller's credential stays here: upstream, the relay carries the service
            # credential.
            query = {
                k: v
                for k, v in websocket.query_params.items()
                if k not in ("api_key", "session_id", AUDIO_TOKEN_PARAM)
            }
            relay.sidecar = sidecar
            relay.upstream_url = f"{base}/v1/sessions/{session_id}/audio" + (
                f"?{urlencode(query)}" if query else ""
            )
            try:
                upstream = await websockets.connect(
                    relay.upstream_url,
                    additional_headers={**traceparent, **sidecars.service_headers()},
                    max_size=UPSTREAM_MAX_MESSAGE_BYTES,
                )
            except (OSError, websockets.WebSocketException) as exc:
                if early:
                    refused.add(sidecar)
                    relay.early_refusals += 1
                    continue
                await _fail(websocket, relay, "sidecar_unreachable", f"{relay.upstream_url}: {exc}")
                return
            if early:
                relay.early_connects += 1
            first = await _first_upstream_message(upstream, reader)
            if first is _CLIENT_LEFT:
                with contextlib.suppress(Exception):
                    await upstream.close()
                return
            if early and _refused_before_ready(first):
                # Not the caller's end: the session moved, or its output did not open there in time.
                refused.add(sidecar)
                relay.early_refusals += 1
                with contextlib.suppress(Exception):
                    await upstream.close()
                continue
            break
        relay.upstream = upstream
        relay.state = "connected"
        relay.connected_at_s = time.time()
        if isinstance(first, (str, bytes)):
            await _to_client(websocket, relay, first)
        async with upstream:
            await _pump(websocket, upstream, relay, inbox, drained)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if relay.state != "failed":
            relay.state = "closed"
        relay.closed_at_s = time.time()
        relay.upstream = None
        registry.remove(relay)
        if websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_NORMAL)


def _message_bytes(message: ClientMessage) -> int:
    return len(message.get("bytes") or (message.get("text") or "").encode())


async def _read_client(
    websocket: WebSocket,
    inbox: asyncio.Queue[ClientMessage | None],
    relay: RelayState,
    drained: asyncio.Event,
) -> None:
    """Every client message into `inbox`; None once the client has gone. Bounded: before live by closing the
    connection past EARLY_BUFFER_MAX_BYTES, once live by pausing until the sidecar has taken enough."""
    try:
        while True:
            try:
                message = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                relay.close_reason = relay.close_reason or "client closed"
                return
            relay.last_client_message_at_s = time.time()
            size = _message_bytes(message)
            if relay.upstream is None:
                # Text waits in the same queue as PCM, so it counts too: the hold must stay bounded.
                relay.early_bytes += size
                if relay.early_bytes > EARLY_BUFFER_MAX_BYTES:
                    relay.close_reason = "early_buffer_full"
                    return
            inbox.put_nowait(message)
            relay.queued_bytes += size
            if relay.upstream is not None and relay.queued_bytes > LIVE_QUEUE_MAX_BYTES:
                relay.reader_pauses += 1
                while relay.queued_bytes > LIVE_QUEUE_MAX_BYTES:
                    drained.clear()
                    await drained.wait()
    finally:
        inbox.put_nowait(None)


def _taken(relay: RelayState, message: ClientMessage, drained: asyncio.Event) -> None:
    """`message` left the queue for the sidecar: a paused reader may go on once the queue is small again."""
    relay.queued_bytes -= _message_bytes(message)
    if relay.queued_bytes <= LIVE_QUEUE_MAX_BYTES:
        drained.set()


_CLIENT_LEFT = object()  # the caller left while the relay waited for the sidecar's first message
_UPSTREAM_CLOSED = object()  # the sidecar closed before sending anything


async def _first_upstream_message(upstream: ClientConnection, reader: asyncio.Task[None]) -> object:
    """The sidecar's first message (`ready`, or the error it closes with), unless the caller leaves first."""
    receiving = asyncio.ensure_future(upstream.recv())
    await asyncio.wait({receiving, reader}, return_when=asyncio.FIRST_COMPLETED)
    if not receiving.done():
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await receiving
        return _CLIENT_LEFT
    try:
        return receiving.result()
    except websockets.ConnectionClosed:
        return _UPSTREAM_CLOSED


def _refused_before_ready(first: object) -> bool:
    """Whether an early connection's first event is the sidecar turning it away (not the session's end)."""
    if first is _UPSTREAM_CLOSED:
        return True
    if not isinstance(first, str):
        return False
    with contextlib.suppress(ValueError):
        document = json.loads(first)
        return (
            isinstance(document, dict)
            and document.get("type") == "error"
            and document.get("code") == _REFUSED_UNKNOWN_SESSION
        )
    return False


async def _to_client(websocket: WebSocket, relay: RelayState, message: str | bytes) -> None:
    """One sidecar message to the caller, counted (its latest non-stats message kept for /debug/audio)."""
    relay.messages_to_client += 1
    if isinstance(message, bytes):
        await websocket.send_bytes(message)
        return
    await websocket.send_text(message)
    with contextlib.suppress(ValueError):
        document = json.loads(message)
        if isinstance(document, dict) and document.get("type") != "stats":
            relay.last_server_message = document


async def _wait_until_live(
    websocket: WebSocket,
    session_id: str,
    status_of: StatusOf,
    *,
    live_wait_s: float,
    relay: RelayState,
    reader: asyncio.Task[None],
    early_to: Callable[[str], bool] = lambda _sidecar_id: False,
    started_s: float | None = None,
) -> tuple[str, bool] | None:
    """(sidecar, early) once the session is live there, or earlier (early=True) once its sidecar hosts it
    (EARLY_CONNECT_PHASES) and `early_to(sidecar)` allows; None after failing the caller (or it left)."""
    deadline = (started_s if started_s is not None else time.monotonic()) + live_wait_s
    while True:
        if reader.done():
            if relay.close_reason == "early_buffer_full":
                await _fail(
                    websocket,
                    relay,
                    "buffer_full",
                    f"more than {EARLY_BUFFER_MAX_BYTES} bytes of audio before the session went live",
                )
            return None  # the caller left before the session went live
        status = await status_of(session_id)
        if status is None:
            await _fail(websocket, relay, "not_found", f"no session {session_id!r}")
            return None
        if status.phase == Phase.LIVE and status.sidecar:
            return str(status.sidecar), False
        if status.phase in EARLY_CONNECT_PHASES and status.sidecar and early_to(str(status.sidecar)):
            return str(status.sidecar), True
        if status.phase in TERMINAL_PHASES or status.phase in (Phase.STOPPING, Phase.TEARING_DOWN):
            error = status.error
            code = error.code if error else "session_ended"
            message = error.message if error else f"session {session_id} is {status.phase.value}"
            await _fail(websocket, relay, code, message)
            return None
        if time.monotonic() > deadline:
            await _fail(
                websocket,
                relay,
                "not_live",
                f"session {session_id} did not go live within {live_wait_s:.0f} s (phase "
                f"{status.phase.value})",
            )
            return None
        poll_s = STATUS_POLL_NEAR_LIVE_S if status.phase == Phase.OPENING_OUTPUT else STATUS_POLL_S
        await asyncio.wait({reader}, timeout=poll_s)


async def _fail(websocket: WebSocket, relay: RelayState, code: str, message: str) -> None:
    """Send a fatal `error` and close with the code's close code (`ws_close_code`)."""
    relay.state = "failed"
    relay.close_reason = f"{code}: {message}"
    with contextlib.suppress(Exception):
        await websocket.send_json({"type": "error", "code": code, "message": message, "fatal": True})
        await websocket.close(ws_close_code(code), reason=_close_reason(code))


def _close_reason(reason: str) -> str:
    """`reason` cut to what a close frame carries, on a character boundary."""
    return reason.encode()[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


async def _pump(
    websocket: WebSocket,
    upstream: ClientConnection,
    relay: RelayState,
    inbox: asyncio.Queue[ClientMessage | None],
    drained: asyncio.Event,
) -> None:
    async def client_to_sidecar() -> None:
        while (message := await inbox.get()) is not None:
            _taken(relay, message, drained)
            if message.get("bytes") is not None:
                data: bytes = message["bytes"]
                relay.bytes_to_sidecar += len(data)
                relay.binary_messages_to_sidecar += 1
                await upstream.send(data)
            elif message.get("text") is not None:
                relay.text_messages_to_sidecar += 1
                await upstream.send(message["text"])

    async def sidecar_to_client() -> None:
        try:
            async for message in upstream:
                await _to_client(websocket, relay, message)
        except websockets.ConnectionClosed:
            pass
        code, reason = upstream.close_code, upstream.close_reason or ""
        relay.close_reason = relay.close_reason or f"sidecar closed ({code} {reason})".strip()
        if websocket.application_state == WebSocketState.DISCONNECTED:
            return
        if code is None or code in _NO_CLOSE_FRAME_CODES:
            # No close frame: the sidecar process or its host died mid-session. The caller must be able to
            # tell that from a normal end, so it gets a typed error and a non-1000 close.
            await _fail(
                websocket,
                relay,
                "sidecar_gone",
                f"the connection to sidecar {relay.sidecar!r} broke without a close ({code}): it stopped or "
                "died",
            )
            return
        with contextlib.suppress(Exception):
            # The sidecar's own code and reason, e.g. 1008 `unknown_session`, reach the caller unchanged.
            await websocket.close(
                CLOSE_NORMAL if code == _CLOSE_NO_STATUS else code,
                reason=_close_reason(reason),
            )

    tasks = [asyncio.create_task(client_to_sidecar()), asyncio.create_task(sidecar_to_client())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    if tasks[0] in done:
        # The caller is done sending: close upstream (what was sent still plays on the sidecar).
        with contextlib.suppress(Exception):
            await upstream.close()
    for task in pending:
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=5.0)
    for task in tasks:
        if not task.done():
            task.cancel()
    for task in done:
        if task.exception() is not None:
            logger.warning("audio relay ended with an error", extra={"error": repr(task.exception())})
