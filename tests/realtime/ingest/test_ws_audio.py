"""The audio WebSocket against a running sidecar: the contract, and a typed error for every bad input.

Each session's output is a RecordingPublisher, so the tests see exactly what was published;
after every case the sample accounting must still add up.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from realtime.sidecar.host import SidecarHost
from tests.support.credentials import audio_token, service_headers
from tests.support.recording import RecordingPublisher
from tests.support.sidecar_harness import RunningSidecar, SpeechClip, open_recorded_session


async def recv_json(ws: ClientConnection, timeout_s: float = 5.0) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), timeout=timeout_s)
    assert isinstance(message, str), "the server sends text (JSON) messages only"
    document = json.loads(message)
    assert isinstance(document, dict)
    return document


async def recv_until(ws: ClientConnection, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        message = await recv_json(ws, max(0.1, deadline - time.monotonic()))
        if message["type"] == kind:
            return message
        assert message["type"] != "error", message


async def request_stats(ws: ClientConnection) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "stats"}))
    return await recv_until(ws, "stats")


def assert_adds_up(stats: dict[str, Any]) -> None:
    assert stats["audio_samples_received"] == (
        stats["audio_samples_rendered"]
        + stats["audio_samples_pending"]
        + stats["audio_samples_rejected"]
        + stats["audio_samples_flushed"]
    ), stats


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    message = await recv_until_error(ws)
    assert message["code"] == code, message
    assert isinstance(message["message"], str) and len(message["message"]) > 10
    return message


async def recv_until_error(ws: ClientConnection) -> dict[str, Any]:
    while True:
        message = await recv_json(ws)
        if message["type"] == "error":
            return message


async def expect_closed(ws: ClientConnection, code: int) -> None:
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), timeout=5)
    assert ws.close_code == code


@pytest.fixture
async def session(
    sidecar: RunningSidecar, avatar_zip_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, RecordingPublisher]]:
    session_id = request.node.name.replace("[", "-").replace("]", "")[:60]
    recorder = await open_recorded_session(sidecar, session_id, avatar_zip_path)
    yield session_id, recorder
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    await host.teardown(session_id)


def tone(seconds: float, rate_hz: int = 16_000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def s16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def test_ready_speech_playback_events_and_stats(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher], speech: SpeechClip
) -> None:
    session_id, recorder = session
    # espeak's native rate (22 050 Hz) declared in the query: the sidecar resamples with soxr.
    async with websockets.connect(sidecar.audio_url(session_id, sample_rate=speech.rate_hz)) as ws:
        ready = await recv_json(ws)
        assert ready == {
            "type": "ready",
            "session_id": session_id,
            "format": {"sample_rate": speech.rate_hz, "encoding": "s16le", "channels": 1},
            "max_message_bytes": sidecar.settings.server.max_message_bytes,
            "buffer_limit_ms": 60_000,
            "lookahead_ms": 80,
            "frame_rate_fps": 25,
        }
        pcm = speech.pcm.tobytes()
        chunk = speech.rate_hz // 10 * 2  # 100 ms
        for start in range(0, len(pcm), chunk):
            await ws.send(pcm[start : start + chunk])
        await ws.send(json.dumps({"type": "end_of_utterance"}))
        started = await recv_until(ws, "playback_started")
        finished = await recv_until(ws, "playback_finished", timeout_s=20)
        assert finished["utterance_id"] == started["utterance_id"]
        assert finished["interrupted"] is False
        assert finished["playback_position"] == pytest.approx(speech.duration_s, abs=0.001)
        speech_ticks = recorder.speech_ticks(started["utterance_id"])
        assert speech_ticks[0].frame_index == started["frame_id"]
        stats = await request_stats(ws)
        assert stats["session_id"] == session_id
        assert stats["audio_samples_received"] == speech.timeline_samples()
        assert (
            stats["audio_samples_rendered"] == stats["audio_samples_published"] == speech.timeline_samples()
        )
        assert stats["audio_samples_rejected"] == 0
        assert_adds_up(stats)
    # The same numbers over HTTP.
    async with httpx.AsyncClient(base_url=sidecar.base_url, headers=service_headers()) as client:
        response = await client.get(f"/v1/sessions/{session_id}/stats")
        assert response.status_code == 200
        assert response.json()["audio_samples_rendered"] == speech.timeline_samples()
        health = (await client.get("/healthz")).json()
        assert health["status"] == "ok"
        assert health["engine"]["name"] == "preview" and health["engine"]["warm"] is True
        assert session_id in health["sessions"]
        assert health["capacity"]["slots_total"] == 4
        lane = health["render_lane"]
        assert lane["frames_rendered"] > 0 and lane["batches"] > 0 and lane["frames_skipped_late"] >= 0
        assert lane["batch_ms_by_bucket"] and set(lane["stage_s"]) == {"prepare", "pulls", "render"}
        # The collector's pauses (realtime.heap): timed since the sidecar serves; what its warm-up froze.
        gc_report = health["gc"]
        assert len(gc_report["collections_by_generation"]) == 3
        assert sum(gc_report["collections_by_generation"]) > 0  # a session rendered: young collections ran
        assert gc_report["frozen_objects"] > 0
        missing = await client.get("/v1/sessions/nobody/stats")
        assert missing.status_code == 404


async def test_config_message_f32le_stereo_48k(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, recorder = session
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        await ws.send(
            json.dumps({"type": "config", "sample_rate": 48000, "encoding": "f32le", "channels": 2})
        )
        applied = await recv_until(ws, "config_applied")
        assert applied["format"] == {"sample_rate": 48000, "encoding": "f32le", "channels": 2}
        left = tone(1.0, 48_000)
        stereo = np.stack([left, left], axis=1).astype("<f4")  # interleaved L R
        await ws.send(stereo.tobytes())
        await ws.send(json.dumps({"type": "end_of_utterance"}))
        finished = await recv_until(ws, "playback_finished", timeout_s=10)
        assert finished["playback_position"] == pytest.approx(1.0, abs=0.001)
        stats = await request_stats(ws)
        assert stats["audio_samples_rendered"] == 16_000
        assert_adds_up(stats)
    played = np.concatenate([t.audio_playout for t in recorder.speech_ticks()])
    assert np.abs(played[4800:-4800]).max() == pytest.approx(0.3, abs=0.01)


async def test_seed_address_and_takeover_by_a_second_connection(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, _ = session
    seed_url = f"{sidecar.ws_base}/audio?session_id={session_id}&token={audio_token(session_id)}"
    async with websockets.connect(seed_url) as first:
        assert (await recv_json(first))["type"] == "ready"
        async with websockets.connect(seed_url) as second:
            await expect_error(first, "replaced")
            await expect_closed(first, 1008)
            assert (await recv_json(second))["type"] == "ready"
            await second.send(s16(tone(0.2)))
            await second.send(json.dumps({"type": "end_of_utterance"}))
            assert (await recv_until(second, "playback_finished"))["interrupted"] is False


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"encoding": "mp3"}, "unknown_encoding"),
        ({"sample_rate": "abc"}, "bad_config"),
        ({"sample_rate": "2000"}, "bad_config"),
        ({"channels": "0"}, "bad_config"),
        ({"bits": "16"}, "bad_config"),
        ({"stats_interval_ms": "soon"}, "bad_config"),
        ({"stats_interval_ms": "1"}, "bad_config"),  # a stats flood
        ({"stats_interval_ms": "-5"}, "bad_config"),
    ],
)
async def test_bad_config_in_the_query_is_refused_and_closed(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher], query: dict[str, str], code: str
) -> None:
    session_id, _ = session
    async with websockets.connect(sidecar.audio_url(session_id, **query)) as ws:
        await expect_error(ws, code)
        await expect_closed(ws, 1008)


async def test_unknown_session_is_refused(sidecar: RunningSidecar) -> None:
    async with websockets.connect(sidecar.audio_url("no-such-session")) as ws:
        await expect_error(ws, "unknown_session")
        await expect_closed(ws, 1008)


async def test_bad_config_message_is_fatal_and_the_session_lives_on(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, recorder = session
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        await ws.send(json.dumps({"type": "config", "encoding": "opus"}))
        await expect_error(ws, "unknown_encoding")
        await expect_closed(ws, 1008)
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        await ws.send(json.dumps({"type": "config", "sample_rate": 0}))
        await expect_error(ws, "bad_config")
        await expect_closed(ws, 1008)
    ticks = len(recorder.ticks)
    await asyncio.sleep(0.2)
    assert len(recorder.ticks) > ticks  # the session's clock never stopped


async def test_a_defect_while_handling_audio_is_an_internal_error_not_a_silent_drop(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    from realtime.ingest.input import AudioInput

    def broken_push(self: AudioInput, payload: bytes) -> None:
        raise RuntimeError("simulated defect")

    session_id, recorder = session
    monkeypatch.setattr(AudioInput, "push", broken_push)
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        await ws.send(s16(tone(0.1)))
        await expect_error(ws, "internal_error")
        await expect_closed(ws, 1011)
    ticks = len(recorder.ticks)
    await asyncio.sleep(0.2)
    assert len(recorder.ticks) > ticks  # the session's clock never stopped


async def test_each_bad_message_gets_its_error_and_the_connection_goes_on(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, _ = session
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        expected_rejected = 0

        await ws.send(b"\x01" * 641)  # odd byte count: 320 whole samples + 1 byte
        error = await expect_error(ws, "misaligned_pcm")
        assert "641 bytes" in error["message"]
        expected_rejected += 320

        for text, code in [
            ("{oops", "bad_json"),
            ("[1]", "bad_json"),
            ('{"type":"dance"}', "unknown_message_type"),
            ('{"type":"interrupt","x":1}', "bad_json"),
        ]:
            await ws.send(text)
            await expect_error(ws, code)

        too_big = b"\x00\x00" * (sidecar.settings.server.max_message_bytes // 2 + 1)
        await ws.send(too_big)
        await expect_error(ws, "message_too_large")
        expected_rejected += len(too_big) // 2

        # Floats: NaN / inf, and int16-scaled values, in f32le.
        await ws.send(json.dumps({"type": "config", "encoding": "f32le"}))
        await recv_until(ws, "config_applied")
        for bad, code in [
            (np.nan, "non_finite_samples"),
            (np.inf, "non_finite_samples"),
            (2000.0, "samples_out_of_range"),
        ]:
            samples = tone(0.05)
            samples[100] = bad
            await ws.send(samples.astype("<f4").tobytes())
            await expect_error(ws, code)
            expected_rejected += len(samples)

        # Still open, still accepting: good audio plays.
        good = tone(0.3)
        await ws.send(good.astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "end_of_utterance"}))
        finished = await recv_until(ws, "playback_finished")
        assert finished["playback_position"] == pytest.approx(0.3)
        stats = await request_stats(ws)
        assert stats["audio_samples_rejected"] == expected_rejected
        assert stats["audio_samples_rendered"] == len(good)
        assert_adds_up(stats)


async def test_a_burst_beyond_the_buffer_limit_is_refused_not_dropped(
    sidecar: RunningSidecar, session: tuple[str, RecordingPublisher]
) -> None:
    session_id, _ = session
    async with websockets.connect(sidecar.audio_url(session_id)) as ws:
        await recv_until(ws, "ready")
        chunk = s16(tone(25.0))  # 800 kB, under the message limit
        await ws.send(chunk)
        await ws.send(chunk)  # 50 s buffered: within the 60 s limit
        await ws.send(chunk)  # 75 s: over it
        error = await expect_error(ws, "buffer_full")
        assert "60000 ms limit" in error["message"]
        stats = await request_stats(ws)
        assert stats["audio_samples_rejected"] == 25 * 16_000
        assert stats["audio_samples_received"] == 75 * 16_000
        assert_adds_up(stats)
        # Interrupt flushes the queue: the flushed samples are accounted, and playback says so.
        await ws.send(json.dumps({"type": "interrupt"}))
        finished = await recv_until(ws, "playback_finished")
        assert finished["interrupted"] is True
        stats = await request_stats(ws)
        assert stats["audio_samples_pending"] == 0
        assert stats["audio_samples_flushed"] > 45 * 16_000
        assert_adds_up(stats)


async def test_session_end_closes_the_audio_socket(sidecar: RunningSidecar, avatar_zip_path: Path) -> None:
    await open_recorded_session(sidecar, "ending", avatar_zip_path)
    host = sidecar.host
    assert isinstance(host, SidecarHost)
    async with websockets.connect(sidecar.audio_url("ending")) as ws:
        await recv_until(ws, "ready")
        await host.teardown("ending")
        await expect_error(ws, "session_ended")
        await expect_closed(ws, 1001)
