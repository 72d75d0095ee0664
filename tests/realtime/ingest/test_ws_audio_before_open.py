"""An audio WebSocket opened while its session is still being brought up on this sidecar (avatar prepared,
output not open yet) waits, without a message, and gets `ready` the moment the output opens; a session
that ends or never opens within `output_open_wait_s` is refused with `unknown_session`, as one this sidecar
does not host is at once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.support.sidecar_harness import RunningSidecar, sidecar_settings, start_sidecar, stop_sidecar

# The sidecar's bound on the wait: short, so that the bounded case stays quick, yet long enough that an
# answer well inside it (under half) shows the wait was ended by its event, not by the bound.
OPEN_WAIT_S = 3.0
# Silence from the sidecar while the output is not open: long enough that a `ready` sent too early shows.
QUIET_S = 0.4


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[RunningSidecar]:
    settings = sidecar_settings(tmp_path / "cache")
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, output_open_wait_s=OPEN_WAIT_S)
    )
    running, task = await start_sidecar(settings)
    yield running
    await stop_sidecar(task)


async def first_message(ws: websockets.ClientConnection, timeout_s: float) -> dict[str, Any]:
    document = json.loads(await asyncio.wait_for(ws.recv(), timeout=timeout_s))
    assert isinstance(document, dict)
    return document


async def test_a_connection_before_the_output_opens_gets_ready_when_it_opens(
    sidecar: RunningSidecar, avatar_zip_path: Path
) -> None:
    publisher = await sidecar.prepare_recorded("early", avatar_zip_path)
    async with websockets.connect(sidecar.audio_url("early")) as ws:
        with pytest.raises(TimeoutError):
            await first_message(ws, QUIET_S)  # nothing while the output is not open
        await sidecar.open_recorded("early", publisher)
        opened_s = time.monotonic()
        ready = await first_message(ws, 5.0)
        # Woken by the output opening (an event), not found by polling: well inside the wait's bound.
        assert ready["type"] == "ready", ready
        assert time.monotonic() - opened_s < OPEN_WAIT_S / 2
        await ws.send(json.dumps({"type": "stats"}))
        assert (await first_message(ws, 5.0))["type"] == "stats"  # a working session connection
    await sidecar.sidecar_host.teardown("early")


async def test_a_session_torn_down_before_its_output_opens_refuses_the_waiting_connection(
    sidecar: RunningSidecar, avatar_zip_path: Path
) -> None:
    await sidecar.prepare_recorded("ends-early", avatar_zip_path)
    async with websockets.connect(sidecar.audio_url("ends-early")) as ws:
        with pytest.raises(TimeoutError):
            await first_message(ws, QUIET_S)
        torn_down_s = time.monotonic()
        await sidecar.sidecar_host.teardown("ends-early")
        error = await first_message(ws, 5.0)
        assert error["type"] == "error" and error["code"] == "unknown_session", error
        assert time.monotonic() - torn_down_s < OPEN_WAIT_S / 2  # at the teardown, not at the bound
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout=5)
        assert ws.close_code == 1008


async def test_the_wait_for_an_output_that_never_opens_is_bounded(
    sidecar: RunningSidecar, avatar_zip_path: Path
) -> None:
    await sidecar.prepare_recorded("never-opens", avatar_zip_path)
    async with websockets.connect(sidecar.audio_url("never-opens")) as ws:
        connected_s = time.monotonic()
        error = await first_message(ws, OPEN_WAIT_S + 5.0)
        waited_s = time.monotonic() - connected_s
        assert error["type"] == "error" and error["code"] == "unknown_session", error
        assert f"within {OPEN_WAIT_S:g} s" in error["message"]
        assert OPEN_WAIT_S - 0.1 <= waited_s < OPEN_WAIT_S + 4.0, waited_s
    await sidecar.sidecar_host.teardown("never-opens")


async def test_a_session_not_hosted_here_is_refused_at_once(sidecar: RunningSidecar) -> None:
    async with websockets.connect(sidecar.audio_url("not-here")) as ws:
        connected_s = time.monotonic()
        error = await first_message(ws, 5.0)
        assert error["code"] == "unknown_session", error
        assert time.monotonic() - connected_s < OPEN_WAIT_S  # no wait for a session it does not have
