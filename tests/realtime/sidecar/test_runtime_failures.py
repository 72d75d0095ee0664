"""Failure and teardown paths: a dead clock surfaces, teardown always closes publishers, and audio that
arrives
while a session or its connection is ending is counted (rejected), never lost from the accounting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from infra.process import free_port
from realtime.host import (
    OpenedOutput,
    OutputTarget,
    PreparedAvatar,
    RunLimits,
    SessionEndReason,
)
from realtime.ingest.agents import AgentAudioBridge
from realtime.ingest.connection import AudioConnection
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.input import AudioInput
from realtime.outputs.errors import OutputError
from realtime.outputs.registry import LIVEKIT, RTMP, RtmpTarget
from realtime.outputs.switch import SwitchableOutput
from realtime.sidecar.config import ServerConfig
from realtime.sidecar.engine_port import EngineStatus
from realtime.sidecar.host import HostedSession, SidecarHost
from realtime.sidecar.render_lane import RenderLane
from realtime.sidecar.runtime import SessionRuntime
from tests.realtime.sidecar.test_runtime import until
from tests.support.recording import RecordingPublisher

WIDTH_PX, HEIGHT_PX = 32, 32


class BreakingAvatar:
    """Idle frames until tick `fail_at_tick`, then the engine fails (as a broken avatar cache would)."""

    width_px = WIDTH_PX
    height_px = HEIGHT_PX

    def __init__(self, fail_at_tick: int) -> None:
        self.fail_at_tick = fail_at_tick

    def idle_frame(self, tick: int) -> np.ndarray:
        if tick >= self.fail_at_tick:
            raise RuntimeError(f"idle frame {tick} is unreadable")
        return np.zeros((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8)


class SilentStream:
    """An utterance stream that never gets a frame ready (nothing is rendered here)."""

    def push_audio(self, samples_16k: np.ndarray) -> None:
        del samples_16k

    def end(self) -> None:
        pass

    def ready_frame_count(self) -> int:
        return 0

    def render_requests(self, frame_indices: list[int], ticks: list[int]) -> Sequence[Any]:
        raise AssertionError("nothing is rendered in these tests")

    def close(self) -> None:
        pass


class BreakingEngine:
    lookahead_ms = 80

    def __init__(self, fail_at_tick: int) -> None:
        self.avatar = BreakingAvatar(fail_at_tick)

    def open_utterance(self) -> SilentStream:
        return SilentStream()


def _no_render(requests: Sequence[Any]) -> list[np.ndarray]:
    raise AssertionError("nothing is rendered in these tests")


@pytest.fixture
def lane() -> Any:
    lane = RenderLane(_no_render)
    yield lane
    lane.close()


async def test_a_dead_clock_is_reported_and_does_not_break_stop(lane: RenderLane, caplog: Any) -> None:
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    runtime = SessionRuntime("clock-dies", BreakingEngine(fail_at_tick=3), [publisher], lane)
    with caplog.at_level(logging.ERROR, logger="realtime.sidecar.runtime"):
        await runtime.start()
        await until(lambda: not runtime.running, timeout_s=5.0)
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert len(publisher.ticks) == 3
    assert "clock-clock-dies failed" in runtime.last_error and "unreadable" in runtime.last_error
    assert any(record.getMessage() == "session task failed" for record in caplog.records)
    await runtime.stop()  # must not re-raise the clock's exception: teardown goes on after it


async def test_run_session_ends_runtime_failed_when_the_clock_dies(lane: RenderLane) -> None:
    """Without this the session looked live (no frames, no audio) until its idle timeout or maximum
    duration."""
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    runtime = SessionRuntime("dies", BreakingEngine(fail_at_tick=3), [publisher], lane)
    host.sessions["dies"] = HostedSession("dies", runtime=runtime, publishers=[publisher])
    await runtime.start()
    try:
        end = await asyncio.wait_for(
            host.run_session(
                "dies", RunLimits(idle_timeout_s=60.0, max_duration_s=60.0), lambda _stats: None
            ),
            5.0,
        )
    finally:
        await host.teardown("dies")
    assert end.reason is SessionEndReason.RUNTIME_FAILED
    assert "clock-dies failed" in end.detail and "unreadable" in end.detail


async def test_audio_after_stop_is_rejected_and_counted_not_left_pending(lane: RenderLane) -> None:
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    runtime = SessionRuntime("stopped", BreakingEngine(fail_at_tick=10**9), [publisher], lane)
    await runtime.start()
    audio_input = AudioInput(runtime, "ws")
    audio_input.push(np.zeros(640, dtype="<i2").tobytes())  # accepted while live
    await runtime.stop()  # teardown; the client's socket is not closed yet
    with pytest.raises(IngestError) as exc:
        audio_input.push(np.zeros(1600, dtype="<i2").tobytes())
    assert exc.value.code is IngestErrorCode.SESSION_ENDED and exc.value.fatal
    stats = runtime.stats()
    assert stats.audio_samples_pending == 0
    assert (stats.audio_samples_received, stats.audio_samples_flushed, stats.audio_samples_rejected) == (
        640 + 1600,
        640,
        1600,
    )
    audio_input.close()


class FailingBridge:
    def __init__(self) -> None:
        self.close_calls = 0

    async def close(self) -> None:
        self.close_calls += 1
        raise ConnectionError("agent room already gone")


class FailingStopRuntime:
    def __init__(self) -> None:
        self.stop_calls = 0

    async def stop(self) -> None:
        self.stop_calls += 1
        raise RuntimeError("stop failed")


class NoEngine:
    def info(self) -> EngineStatus:
        return EngineStatus(name="none", device="cpu", warm=True)


async def test_teardown_closes_publishers_when_earlier_steps_fail() -> None:
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    bridge, runtime = FailingBridge(), FailingStopRuntime()
    host.sessions["s"] = HostedSession(
        "s",
        runtime=runtime,  # type: ignore[arg-type]
        publishers=[publisher],
        bridge=bridge,  # type: ignore[arg-type]
    )
    await host.teardown("s")
    assert bridge.close_calls == 1 and runtime.stop_calls == 1
    assert not publisher.stats().connected, "the publisher was left connected"
    assert "s" not in host.sessions


class ReplacedWhileReceiving:
    """A socket whose connection is replaced by a newer one while a binary message is on its way in."""

    application_state = "connected"

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.connection: AudioConnection | None = None
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        assert self.connection is not None
        await self.connection._close(
            IngestError(IngestErrorCode.REPLACED, "a newer audio connection took over")
        )
        return {"type": "websocket.receive", "bytes": self.payload}

    async def send_json(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def close(self, code: int, reason: str = "") -> None:
        del code, reason


async def test_audio_arriving_while_the_connection_closes_is_counted_as_rejected(lane: RenderLane) -> None:
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    runtime = SessionRuntime("replaced", BreakingEngine(fail_at_tick=10**9), [publisher], lane)
    await runtime.start()
    try:
        socket = ReplacedWhileReceiving(np.zeros(960, dtype="<i2").tobytes())
        host = SidecarHost(NoEngine())  # type: ignore[arg-type]
        connection = AudioConnection(socket, host, "replaced", ServerConfig(), {})  # type: ignore[arg-type]
        socket.connection = connection
        connection.input = AudioInput(runtime, "ws")
        await connection._receive_loop()
        assert [m["code"] for m in socket.sent if m.get("type") == "error"] == ["replaced"]
        stats = runtime.stats()
        assert (stats.audio_samples_received, stats.audio_samples_rejected, stats.audio_samples_pending) == (
            960,
            960,
            0,
        )
        assert connection.input.errors["replaced"] == 1
    finally:
        await runtime.stop()


class CountingBridge:
    def __init__(self) -> None:
        self.close_calls = 0

    async def close(self) -> None:
        self.close_calls += 1


async def test_a_failed_output_switch_keeps_the_agent_bridge() -> None:
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    current = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    live = SwitchableOutput(current)
    await live.start()
    bridge = CountingBridge()
    host.sessions["s"] = HostedSession(
        "s",
        prepared=PreparedAvatar("", Path("."), 1, WIDTH_PX, HEIGHT_PX, False),
        runtime=object(),  # type: ignore[arg-type]
        publishers=[live],
        live_output=live,
        bridge=bridge,  # type: ignore[arg-type]
    )
    refused = OutputTarget(RTMP.name, RtmpTarget(f"rtmp://127.0.0.1:{free_port()}/live/stream"))
    with pytest.raises(OutputError):
        await host.switch_output("s", refused)  # nothing listens there: the new output cannot open
    assert live.current is current and live.switches == 0
    assert host.sessions["s"].bridge is bridge and bridge.close_calls == 0, "the agent lost its audio path"


class ClearedThenSupersededStream:
    """An agent's lk.audio_stream: one chunk, a chunk after the agent's clear, then it stays open."""

    def __init__(self, before_clear: bytes, after_clear: bytes) -> None:
        self.info = SimpleNamespace(attributes={"sample_rate": "16000", "num_channels": "1"})
        self.before_clear, self.after_clear = before_clear, after_clear
        self.cleared = asyncio.Event()
        self.after_clear_read = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.before_clear
        await self.cleared.wait()
        yield self.after_clear
        self.after_clear_read.set()
        await asyncio.Event().wait()  # the stream's trailer never comes: a newer stream supersedes it


async def test_agent_audio_after_a_clear_is_counted_when_its_stream_is_superseded(lane: RenderLane) -> None:
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    runtime = SessionRuntime("agent", BreakingEngine(fail_at_tick=10**9), [publisher], lane)
    await runtime.start()
    try:
        bridge = AgentAudioBridge(runtime, "agent-identity")
        stream = ClearedThenSupersededStream(np.zeros(640, "<i2").tobytes(), np.zeros(320, "<i2").tobytes())
        reading = asyncio.create_task(bridge._read_stream(stream))  # type: ignore[arg-type]
        await until(lambda: runtime.timeline.accounting.received == 640, timeout_s=5.0)
        runtime.interrupt()  # lk.clear_buffer
        stream.cleared.set()
        await asyncio.wait_for(stream.after_clear_read.wait(), timeout=5.0)
        reading.cancel()  # as `_on_stream` does when the agent's next segment arrives
        with pytest.raises(asyncio.CancelledError):
            await reading
        stats = runtime.stats()
        assert (stats.audio_samples_received, stats.audio_samples_flushed, stats.audio_samples_pending) == (
            640 + 320,
            640 + 320,
            0,
        )
    finally:
        await runtime.stop()


class InterruptFails(RecordingPublisher):
    def interrupt(self, idle_frame: Any) -> None:
        raise RuntimeError("output gone")


async def test_one_output_failing_an_interrupt_does_not_spare_the_others(lane: RenderLane) -> None:
    failing, recording = InterruptFails(WIDTH_PX, HEIGHT_PX), RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    runtime = SessionRuntime("cut", BreakingEngine(fail_at_tick=10**9), [failing, recording], lane)
    runtime.interrupt()
    assert recording.interrupted_at == [-1], "the second output was not cut"
    assert "interrupt failed: output gone" in runtime.last_error


class OpenSessionFails(NoEngine):
    def open_session(self, avatar: object) -> Any:
        raise RuntimeError("avatar handle is stale")


async def test_outputs_started_for_a_session_that_cannot_open_are_closed() -> None:
    host = SidecarHost(OpenSessionFails())  # type: ignore[arg-type]
    host.sessions["s"] = HostedSession("s", avatar=object())
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    with pytest.raises(RuntimeError, match="stale"):
        await host.start_publishing("s", [publisher], OpenedOutput(LIVEKIT.name, "room"))
    assert not publisher.stats().connected, "the started output was left open with no session to close it"
    assert host.sessions["s"].runtime is None


class ClosedStream(SilentStream):
    """Frames look ready, but the stream was closed before the lane ran their job (an utterance that finished
    playing under load while its last jobs still waited)."""

    def __init__(self) -> None:
        self.asked = 0

    def ready_frame_count(self) -> int:
        return 30

    def render_requests(self, frame_indices: list[int], ticks: list[int]) -> Sequence[Any]:
        from realtime.sidecar.engine_port import UtteranceClosed

        self.asked += 1
        raise UtteranceClosed("closed")


class ClosedStreamEngine(BreakingEngine):
    def __init__(self) -> None:
        super().__init__(fail_at_tick=10**9)
        self.stream = ClosedStream()

    def open_utterance(self) -> ClosedStream:
        return self.stream


async def test_jobs_of_a_closed_utterance_are_not_render_errors(lane: RenderLane) -> None:
    publisher = RecordingPublisher(WIDTH_PX, HEIGHT_PX)
    await publisher.start()
    engine = ClosedStreamEngine()
    runtime = SessionRuntime("closed", engine, [publisher], lane)
    await runtime.start()
    try:
        AudioInput(runtime, "ws").push(np.zeros(16_000, dtype="<i2").tobytes())
        await until(lambda: engine.stream.asked > 0, timeout_s=5.0)
        assert runtime.counters.render_errors == 0 and not runtime.last_error
    finally:
        await runtime.stop()
