"""Format sanity: a real-time stream whose audio arrives far from its declared rate is flagged.

`RateWatch` with injected arrival times (no sleeps), then the whole path on a running sidecar:
44.1 kHz PCM sent in real time but declared 16 kHz with `pacing=realtime` gets a
`suspect_sample_rate` warning on the WebSocket (the connection stays open), in the session's
stats, and the sidecar's per-session stats show the connection's declared format.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import websockets

from realtime.ingest.ratewatch import RateWatch
from tests.realtime.ingest.test_ws_audio import expect_closed, expect_error, recv_json, s16, session, tone
from tests.support.credentials import service_headers
from tests.support.recording import RecordingPublisher
from tests.support.sidecar_harness import RunningSidecar

__all__ = ["session"]  # the fixture, used by name


def stream(
    watch: RateWatch, *, seconds: float, real_rate_hz: int, declared_hz: int, start_s: float = 0.0
) -> list:
    """100 ms messages of `real_rate_hz` audio arriving in real time; returns the verdicts."""
    verdicts = []
    for index in range(int(seconds * 10)):
        verdict = watch.observe(start_s + index * 0.1, real_rate_hz // 10, declared_hz)
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


def test_a_stream_at_its_declared_rate_is_not_flagged() -> None:
    watch = RateWatch()
    assert stream(watch, seconds=20, real_rate_hz=24_000, declared_hz=24_000) == []
    assert watch.suspect is None


def test_a_wrong_declared_rate_is_flagged_once_after_the_window() -> None:
    watch = RateWatch()
    assert stream(watch, seconds=4.9, real_rate_hz=44_100, declared_hz=16_000) == []  # not 5 s yet
    verdicts = stream(watch, seconds=5, real_rate_hz=44_100, declared_hz=16_000, start_s=4.9)
    assert len(verdicts) == 1  # once per episode, not once per message
    assert verdicts[0].arrival_rate_hz == pytest.approx(44_100, rel=0.01)
    assert verdicts[0].ratio > 1.5
    # Too slow is flagged too: 8 kHz PCM declared 16 kHz.
    slow = RateWatch()
    assert len(stream(slow, seconds=6, real_rate_hz=8_000, declared_hz=16_000)) == 1


def test_pauses_restart_the_window_and_a_normal_rate_clears_the_flag() -> None:
    watch = RateWatch()
    # Utterances of 3 s with 2 s pauses: never 5 s of continuous streaming, so never judged.
    for start in range(0, 30, 5):
        assert stream(watch, seconds=3, real_rate_hz=44_100, declared_hz=16_000, start_s=start) == []
    stream(watch, seconds=6, real_rate_hz=44_100, declared_hz=16_000, start_s=40)
    assert watch.suspect is not None
    stream(watch, seconds=6, real_rate_hz=16_000, declared_hz=16_000, start_s=46.1)
    assert watch.suspect is None


async def test_a_real_time_stream_declared_at_the_wrong_rate_gets_a_warning(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, _ = session
    pcm = s16(tone(5.6, rate_hz=44_100))
    chunk = 4410 * 2  # 100 ms of the real 44.1 kHz audio
    url = sidecar.audio_url(session_id, sample_rate=16_000, pacing="realtime")
    async with websockets.connect(url) as ws:
        await recv_json(ws)  # ready
        started = time.monotonic()
        warning = None
        for index, offset in enumerate(range(0, len(pcm), chunk)):
            await asyncio.sleep(max(0.0, started + index * 0.1 - time.monotonic()))
            await ws.send(pcm[offset : offset + chunk])
            try:
                while warning is None:
                    message = json.loads(await asyncio.wait_for(ws.recv(), timeout=0.001))
                    if message["type"] == "warning":
                        warning = message
            except TimeoutError:
                pass
        if warning is None:
            message = await recv_json(ws, timeout_s=2.0)
            warning = message if message["type"] == "warning" else None
        await ws.send(json.dumps({"type": "stats"}))
        stats = await recv_json(ws)
        while stats["type"] != "stats":
            stats = await recv_json(ws)
        async with httpx.AsyncClient(trust_env=False, headers=service_headers()) as client:
            sidecar_stats = (await client.get(f"{sidecar.base_url}/v1/sessions/{session_id}/stats")).json()
        await ws.send(json.dumps({"type": "interrupt"}))
    assert warning is not None and warning["code"] == "suspect_sample_rate", warning
    assert warning["declared_sample_rate"] == 16_000
    assert warning["arrival_rate_hz"] == pytest.approx(44_100, rel=0.05)
    assert stats["extra"]["ws_suspect_sample_rate"] == 1.0
    assert sidecar_stats["audio_input"] == {
        "format": {"sample_rate": 16_000, "encoding": "s16le", "channels": 1},
        "pacing": "realtime",
        "messages_accepted": int(np.ceil(len(pcm) / chunk)),
    }


async def test_an_unknown_pacing_is_a_bad_config(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, _ = session
    async with websockets.connect(sidecar.audio_url(session_id, pacing="turbo")) as ws:
        await expect_error(ws, "bad_config")
        await expect_closed(ws, 1008)
