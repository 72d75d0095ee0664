"""`lipsync_client.AudioStream` against a local WebSocket server: listeners see every event, the queue is
bounded."""

from __future__ import annotations

import asyncio
import json

from lipsync_client import AudioStream
from lipsync_client.audio import MAX_QUEUED_EVENTS
from websockets.asyncio.server import ServerConnection, serve

EVENTS = MAX_QUEUED_EVENTS + 10


async def test_listeners_see_every_event_and_the_queue_keeps_the_newest() -> None:
    received_headers: list[str | None] = []
    binary: list[bytes] = []

    async def handler(ws: ServerConnection) -> None:
        received_headers.append(ws.request.headers.get("X-API-Key") if ws.request else None)
        await ws.send(json.dumps({"type": "ready", "session_id": "s"}))
        binary.append(bytes(await ws.recv()))  # type: ignore[arg-type]
        for n in range(EVENTS):
            await ws.send(json.dumps({"type": "stats", "n": n}))
        await ws.close(1001, "session_ended")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        seen: list[int] = []
        async with AudioStream(f"ws://127.0.0.1:{port}/audio?token=t", api_key="k") as audio:
            audio.add_listener(lambda event: seen.append(int(event.get("n", -1))))
            assert (await audio.wait_ready(5))["session_id"] == "s"
            await audio.send_pcm(b"\x01\x00" * 160)
            # All arrived and nobody read the queue yet (the stream exposes its close as a reason, not an
            # event).
            while len(seen) < EVENTS or not audio.close_reason:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            queued = [int(event["n"]) async for event in audio.events() if event["type"] == "stats"]
    assert received_headers == ["k"] and binary == [b"\x01\x00" * 160]
    assert seen[-EVENTS:] == list(range(EVENTS))  # listeners: everything, in order
    # The queue: only the newest (the close took one more slot), still in order.
    assert queued == list(range(EVENTS - MAX_QUEUED_EVENTS + 1, EVENTS))
    assert audio.close_reason == "code 1001 session_ended"


async def test_next_event_raises_on_a_server_error_and_on_close() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "error", "code": "misaligned_pcm", "message": "odd byte count"}))
        await asyncio.sleep(0.2)
        await ws.close(1008, "unknown_session")

    from lipsync_client import AudioStreamError

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with AudioStream(f"ws://127.0.0.1:{port}/audio", api_key="k") as audio:
            try:
                await audio.next_event("playback_finished", timeout_s=5)
            except AudioStreamError as exc:
                first = exc
            try:
                await audio.next_event("playback_finished", timeout_s=5)
            except AudioStreamError as exc:
                second = exc
            try:
                await audio.send_pcm(b"\x00\x00")
            except AudioStreamError as exc:  # a send on a closed socket: reconnect to go on
                third = exc
    assert first.code == "misaligned_pcm" and first.message == "odd byte count"
    assert second.code == "closed" and "1008 unknown_session" in second.message
    assert third.code == "closed"
