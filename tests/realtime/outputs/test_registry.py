"""The output registry: each kind declared once, and a kind registered by a test alone goes the whole real
path.

The `memory` kind below exists only in this file (no production module names it). It is admitted
by the real sidecar activity, opened by the real `SidecarHost` whose session clock feeds it frames
and audio, and chosen by the real `SessionWorkflow` as the fallback after a failed RTMP output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.sidecar import SidecarActivities, SidecarWorkerConfig
from api.policy_file import DEFAULT_POLICIES_PATH, PolicyError, load_policies
from realtime.host import AvatarAsset
from realtime.ingest.resample import ConvertedAudio
from realtime.outputs.base import PublisherStats, PublishTick
from realtime.outputs.registry import (
    LIVEKIT,
    OUTPUTS,
    RTMP,
    AdmissionContext,
    LiveKitParams,
    OpenedPublisher,
    OutputKind,
    OutputKindUnknown,
    OutputParamsInvalid,
    PublisherContext,
    RtmpTarget,
)
from realtime.sidecar.config import HostConfig, SidecarSettings
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.process import build_host
from tests.support import media
from tests.support.temporal_harness import Harness, fast_policy, wait_for_status
from workflows.client import stop_session
from workflows.contracts import (
    EndReason,
    OpenOutputInput,
    OutputRequest,
    OutputSpec,
    Phase,
    SidecarCall,
)

MEMORY = "memory-test"
TIMELINE_RATE_HZ = 16_000
PLAYOUT_RATE_HZ = 48_000


@dataclass(frozen=True)
class MemoryParams:
    label: str
    refuse: bool = False  # the publisher fails to start (an output that cannot be reached)


@dataclass(frozen=True)
class MemoryTarget:
    label: str
    session_id: str
    refuse: bool


@dataclass
class MemoryPublisher:
    """Keeps what the session clock hands it; records its own start and close."""

    target: MemoryTarget
    width_px: int
    height_px: int
    ticks: list[PublishTick] = field(default_factory=list)
    speech_samples: int = 0
    speech_expected: int | None = None  # `heard` is set once this much speech (16 kHz samples) arrived
    heard: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    closed: bool = False
    name: str = MEMORY

    async def start(self) -> None:
        if self.target.refuse:
            raise ConnectionRefusedError(f"{self.target.label} refuses")
        self.started = True

    async def publish(self, tick: PublishTick) -> None:
        self.ticks.append(tick)
        self.speech_samples += tick.speech_samples
        if self.speech_expected is not None and self.speech_samples >= self.speech_expected:
            self.heard.set()

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        del idle_frame

    async def close(self) -> None:
        self.closed = True

    def stats(self) -> PublisherStats:
        return PublisherStats(name=self.name, connected=self.started and not self.closed)


OPENED: list[MemoryPublisher] = []


async def _admit(params: MemoryParams, context: AdmissionContext) -> MemoryTarget:
    return MemoryTarget(label=params.label, session_id=context.session_id, refuse=params.refuse)


def _open(target: MemoryTarget, context: PublisherContext) -> OpenedPublisher:
    publisher = MemoryPublisher(target, context.width_px, context.height_px)
    OPENED.append(publisher)
    return OpenedPublisher(publisher, f"memory:{target.label}")


@pytest.fixture
def memory_kind() -> Iterator[str]:
    OUTPUTS.register(
        OutputKind(name=MEMORY, params_type=MemoryParams, admit=_admit, open=_open, target_type=MemoryTarget)
    )
    OPENED.clear()
    try:
        yield MEMORY
    finally:
        OUTPUTS.unregister(MEMORY)


# --- the registry itself -----------------------------------------------------------------------------------


def test_builtin_kinds_are_registered_under_the_names_the_shipped_policy_uses() -> None:
    assert {LIVEKIT.name, RTMP.name} <= set(OUTPUTS.names())
    assert load_policies(DEFAULT_POLICIES_PATH).outputs.fallback_order == [LIVEKIT.name, RTMP.name]


def test_a_kind_is_declared_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        OUTPUTS.register(RTMP)


def test_unknown_kinds_are_refused_by_the_registry_and_the_policy() -> None:
    with pytest.raises(OutputKindUnknown) as unknown:
        OUTPUTS.get("smtp")
    assert unknown.value.code == "output_kind_unknown" and "livekit" in unknown.value.message
    with pytest.raises(PolicyError, match=r"outputs\.fallback_order\[1\].*must be one of"):
        fast_policy(outputs__fallback_order=["rtmp", MEMORY])


def test_params_round_trip_and_bad_params_name_the_field() -> None:
    params = LiveKitParams(url="ws://lk:7880", identity="avatar", publish_on_behalf="agent")
    assert LIVEKIT.parse(LIVEKIT.to_params(params)) == params
    assert RTMP.parse({"url": "rtmp://h/app/key"}) == RtmpTarget("rtmp://h/app/key")
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "'url' is required"),
        ({"url": 5}, "'url' must be"),
        ({"url": "rtmp://h/a/k", "key": "x"}, "unknown parameter(s) ['key']"),
    ]
    for raw, problem in cases:
        with pytest.raises(OutputParamsInvalid) as invalid:
            RTMP.parse(raw)
        assert invalid.value.code == "output_params_invalid" and problem in invalid.value.message
    with pytest.raises(OutputParamsInvalid, match="'publish_audio' must be"):
        LIVEKIT.parse({"url": "ws://lk", "identity": "a", "publish_audio": "yes"})
    with pytest.raises(OutputParamsInvalid, match="takes LiveKitParams"):
        LIVEKIT.to_params(RtmpTarget("rtmp://h/a/k"))  # type: ignore[arg-type]  # the wrong type on purpose


# --- a test-only kind through the real sidecar activity and host -------------------------------------------


@pytest.fixture
async def sidecar_host(tmp_path: Path) -> AsyncIterator[SidecarHost]:
    settings = SidecarSettings(
        engine="preview",
        cache_dir=tmp_path / "cache",
        host=HostConfig(sidecar_id="t", task_queue="t", slots_total=1),
    )
    host = build_host(settings)
    try:
        yield host
    finally:
        await host.close()


async def test_a_kind_registered_by_a_test_is_admitted_opened_and_fed_frames_and_audio(
    memory_kind: str, sidecar_host: SidecarHost, tmp_path: Path
) -> None:
    avatar = tmp_path / "avatar.zip"
    avatar.write_bytes(media.frames_zip())
    prepared = await sidecar_host.prepare_avatar("s1", AvatarAsset(avatar, "frames_zip", ""), lambda _p: None)
    activities = SidecarActivities(
        sidecar_host, SidecarWorkerConfig.for_host(sidecar_host, tmp_path / "assets"), incarnation="now"
    )
    request = OpenOutputInput(
        call=SidecarCall("s1", incarnation="now"),
        spec=OutputSpec(memory_kind, {"label": "a"}),
        room="r",
        record=False,
    )
    opened = await ActivityEnvironment().run(activities.open_output, request)
    assert (opened.kind, opened.detail) == (memory_kind, "memory:a")
    [publisher] = OPENED
    assert publisher.started and publisher.target == MemoryTarget("a", "s1", refuse=False)
    assert (publisher.width_px, publisher.height_px) == (prepared.width_px, prepared.height_px)

    runtime = sidecar_host.runtime("s1")
    assert runtime is not None
    speech_s = 0.4
    timeline_t = np.arange(int(speech_s * TIMELINE_RATE_HZ)) / TIMELINE_RATE_HZ
    playout_t = np.arange(int(speech_s * PLAYOUT_RATE_HZ)) / PLAYOUT_RATE_HZ
    tone = ConvertedAudio(
        (0.3 * np.sin(2 * np.pi * 220 * timeline_t)).astype(np.float32),
        (0.3 * np.sin(2 * np.pi * 220 * playout_t)).astype(np.float32),
    )
    publisher.speech_expected = len(timeline_t)
    runtime.ingest(tone, "test", time.monotonic())
    runtime.end_utterance()
    await asyncio.wait_for(publisher.heard.wait(), timeout=20.0)
    speech_ticks = [tick for tick in publisher.ticks if tick.speech_samples > 0]
    assert sum(tick.speech_samples for tick in speech_ticks) == len(
        timeline_t
    )  # every sample of speech arrived
    assert all(np.abs(tick.audio_playout).max() > 0.1 for tick in speech_ticks)  # ...as audible audio
    frames = [tick.frame_index for tick in publisher.ticks]
    assert frames == list(range(frames[0], frames[0] + len(frames)))  # one frame per tick, none skipped
    assert publisher.ticks[0].frame_rgb.shape == (prepared.height_px, prepared.width_px, 3)

    await sidecar_host.teardown("s1")
    assert publisher.closed


async def test_bad_params_of_a_registered_kind_fail_open_output_with_their_code(
    memory_kind: str, sidecar_host: SidecarHost, tmp_path: Path
) -> None:
    activities = SidecarActivities(
        sidecar_host, SidecarWorkerConfig.for_host(sidecar_host, tmp_path / "assets"), incarnation="now"
    )
    for spec, code in [
        (OutputSpec(memory_kind, {"label": 3}), "output_params_invalid"),
        (OutputSpec("smtp", {}), "output_kind_unknown"),
    ]:
        request = OpenOutputInput(
            call=SidecarCall("s1", incarnation="now"), spec=spec, room="r", record=False
        )
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment().run(activities.open_output, request)
        assert refused.value.type == code and refused.value.non_retryable
    assert OPENED == []


# --- a test-only kind chosen by the real workflow as the fallback
# ---------------------------------------------


@pytest.mark.service
async def test_the_workflow_falls_back_to_a_kind_registered_by_a_test(
    memory_kind: str, harness: Harness, avatar_url: str
) -> None:
    await harness.add_sidecar("gpu0")
    specs = [
        OutputSpec(memory_kind, {"label": "refusing", "refuse": True}),
        OutputSpec(RTMP.name, {"url": "rtmp://127.0.0.1:1/live/x"}),  # nothing listens there
        OutputSpec(memory_kind, {"label": "fallback"}),
    ]
    request = harness.request(avatar_url, OutputRequest(specs=specs))
    handle = await harness.start(request, fast_policy(outputs__fallback_order=[RTMP.name, memory_kind]))

    live = await wait_for_status(handle, lambda s: s.phase is Phase.LIVE, timeout_s=60)
    attempts = [(a.kind, a.ok, a.error.code if a.error else None) for a in live.output_attempts]
    assert attempts == [
        ("rtmp", False, "output_open_failed"),
        (memory_kind, False, "output_open_failed"),
        (memory_kind, True, None),
    ]
    assert (live.output, live.output_detail) == (memory_kind, "memory:fallback")
    assert [p.target.label for p in OPENED] == [
        "refusing",
        "fallback",
    ]  # the loopback host opened it for real
    await stop_session(harness.client, request.session_id)
    result = await handle.result()
    assert result.end_reason is EndReason.STOPPED and result.output == memory_kind
