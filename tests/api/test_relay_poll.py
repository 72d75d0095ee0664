"""The audio relay's wait for `live`: it polls closer once the output is opening (live is one step away)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from fastapi import WebSocket

from api.audio_relay import STATUS_POLL_NEAR_LIVE_S, STATUS_POLL_S, RelayState, _wait_until_live
from workflows.contracts import Phase, SessionStatus

WINDOW_S = 0.8  # how long the session stays in the polled phase before it goes live


async def polls_during(phase: Phase) -> int:
    """How many status reads the relay makes while the session is in `phase` for WINDOW_S, then live."""
    live_at = time.monotonic() + WINDOW_S
    reads: list[float] = []

    async def status_of(session_id: str) -> SessionStatus:
        now = time.monotonic()
        reads.append(now)
        status = SessionStatus(session_id=session_id, room="r")
        status.phase = Phase.LIVE if now >= live_at else phase
        status.sidecar = "sc-1" if status.phase is Phase.LIVE else ""
        return status

    reader = asyncio.create_task(asyncio.sleep(30))  # a caller that stays connected
    try:
        # The websocket is only written to when the wait fails, which this scripted status never makes it do.
        found = await _wait_until_live(
            cast(WebSocket, cast(Any, None)),
            "s-1",
            status_of,
            live_wait_s=10,
            relay=RelayState("s-1"),
            reader=reader,
        )
    finally:
        reader.cancel()
    assert found == ("sc-1", False)  # live (no sidecar named before, so no early connection)
    return sum(1 for at in reads if at < live_at)


async def test_near_live_the_relay_polls_closer() -> None:
    assert STATUS_POLL_NEAR_LIVE_S < STATUS_POLL_S
    # At the slow period at most WINDOW_S / STATUS_POLL_S + 1 reads fit in the window.
    assert await polls_during(Phase.OPENING_OUTPUT) > WINDOW_S / STATUS_POLL_S + 1
    assert await polls_during(Phase.PLACING) <= WINDOW_S / STATUS_POLL_S + 1
