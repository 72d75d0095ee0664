"""The sidecar's own output failover (realtime.sidecar.failover.OutputWatch), its rules one by one.

The outputs are in-memory publishers whose connection state the test sets, as LiveKit's SDK or
RTMP's writer set theirs; tests/workflows/test_livekit_failover.py runs the same watch against a
real livekit-server and nginx-rtmp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from realtime.host import OpenedOutput, OutputTarget
from realtime.outputs.base import SERVER_UNREACHABLE, Publisher
from realtime.outputs.switch import SwitchableOutput
from realtime.sidecar.failover import FailoverPlan, OutputWatch
from tests.support.recording import RecordingPublisher

DOWN_TIMEOUT_S = 0.3


class Output(RecordingPublisher):
    """An output of one kind; `refuse` makes its start fail as an unreachable server's does."""

    def __init__(self, kind: str, *, refuse: bool = False, connect_s: float = 0.0) -> None:
        super().__init__(16, 16)
        self.name = kind
        self.refuse = refuse
        self.connect_s = connect_s
        self.started = self.closed = False

    async def start(self) -> None:
        if self.refuse:
            raise ConnectionRefusedError(f"{self.name} server unreachable")
        await asyncio.sleep(self.connect_s)
        self.started = True
        await super().start()

    async def close(self) -> None:
        self.closed = True
        await super().close()

    def drop(self, *, unreachable: bool = False) -> None:
        self._stats.connected = False
        if unreachable:  # as LiveKit's probe or RTMP's failed reconnect report a server that is gone
            self._stats.extra[SERVER_UNREACHABLE] = 1.0


class World:
    def __init__(self, *, refuse: frozenset[str] = frozenset(), switch_back_retry_s: float = 0.0) -> None:
        self.first = Output("livekit")
        self.live = SwitchableOutput(self.first)
        self.made: list[Output] = []
        self.switched: list[str] = []
        self.failed: list[str] = []
        self.refuse = set(refuse)
        self.stopping = False
        self.down_timeout_s = DOWN_TIMEOUT_S
        self.connect_s = 0.0  # how long each output made here takes to start
        self.plan = FailoverPlan(
            [OutputTarget("livekit", None), OutputTarget("rtmp", None)],
            switch_back_retry_s=switch_back_retry_s,
        )

    def make(self, target: OutputTarget) -> tuple[Publisher, OpenedOutput]:
        output = Output(target.kind, refuse=target.kind in self.refuse, connect_s=self.connect_s)
        self.made.append(output)
        return output, OpenedOutput(target.kind, f"{target.kind}-detail")

    async def on_switched(self, publisher: Publisher, opened: OpenedOutput) -> None:
        self.switched.append(opened.kind)

    def watch(self) -> OutputWatch:
        return OutputWatch(
            "s",
            self.live,
            self.plan,
            self.make,
            down_timeout_s=lambda: self.down_timeout_s,
            stopping=lambda: self.stopping,
            on_switched=self.on_switched,
            on_failed=self.failed.append,
        )


@pytest.fixture
def world() -> Iterator[World]:
    yield World()


async def wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_dead_output_moves_to_the_standby_started_when_it_dropped(world: World) -> None:
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    started = asyncio.get_running_loop().time()
    world.first.drop()
    await wait_until(lambda: bool(world.made) and world.made[0].started)
    standby_after_s = asyncio.get_running_loop().time() - started
    assert standby_after_s < DOWN_TIMEOUT_S, "the standby waited for the timeout instead of starting at once"
    assert world.live.name == "livekit", "switched before the output-down timeout"
    await wait_until(lambda: world.switched == ["rtmp"])
    assert DOWN_TIMEOUT_S <= asyncio.get_running_loop().time() - started < DOWN_TIMEOUT_S + 0.5
    assert world.live.current is world.made[0] and world.first.closed and world.plan.current == 1
    assert world.live.switches == 1 and world.live.switch_backs == 0
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_the_failover_steps_are_recorded_on_the_sidecars_clocks(world: World) -> None:
    world.connect_s = 0.1
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    dropped_unix_s = time.time()
    world.first.drop()
    await wait_until(lambda: world.switched == ["rtmp"])
    steps = world.plan.timings
    assert steps["failover_count"] == 1.0 and steps["failover_waited_timeout"] == 1.0, steps
    assert steps["failover_server_unreachable"] == 0.0, steps
    # Seen down within the watch's interval (and a loaded loop's lag); switched at the timeout.
    assert 0.0 <= steps["failover_detected_at_unix_s"] - dropped_unix_s < 0.5, steps
    assert DOWN_TIMEOUT_S <= steps["failover_down_to_switch_s"] < DOWN_TIMEOUT_S + 0.5, steps
    # The wall-clock instants and the monotonic duration tell the same story (to the rounding, 1 ms).
    wall_s = steps["failover_switched_at_unix_s"] - steps["failover_detected_at_unix_s"]
    assert abs(wall_s - steps["failover_down_to_switch_s"]) < 0.05, steps
    assert 0.1 <= steps["failover_standby_connect_s"] < DOWN_TIMEOUT_S, steps
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_an_output_whose_server_is_unreachable_moves_once_the_standby_opens_without_the_timeout(
    world: World,
) -> None:
    world.down_timeout_s = 60.0  # never reached in this test: only the unreachable report can move it
    world.connect_s = 0.1
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await asyncio.sleep(0.3)
    assert world.switched == [] and world.made[0].started, "a slow transport must wait for the timeout"
    world.first.drop(unreachable=True)  # the probe found nothing listening at the server's address
    await wait_until(lambda: world.switched == ["rtmp"], timeout_s=5.0)
    steps = world.plan.timings
    assert steps["failover_waited_timeout"] == 0.0 and steps["failover_server_unreachable"] == 1.0, steps
    # Not a removal on purpose: the first output may come back, so switch back stays possible.
    assert not world.plan.first_removed and world.live.name == "rtmp"
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_an_output_back_within_the_timeout_keeps_the_session_and_closes_the_standby(
    world: World,
) -> None:
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await wait_until(lambda: bool(world.made) and world.made[0].started)
    await world.first.start()  # the SDK resumed the connection
    await wait_until(lambda: world.made[0].closed)
    await asyncio.sleep(DOWN_TIMEOUT_S)
    assert world.switched == [] and world.live.current is world.first and world.live.switches == 0
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_with_no_fallback_that_opens_the_session_ends_output_failed_with_the_reason() -> None:
    world = World(refuse=frozenset({"rtmp"}))
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await asyncio.wait_for(task, 5)  # the watch ends with the session's output
    assert len(world.failed) == 1 and "rtmp: rtmp server unreachable" in world.failed[0], world.failed
    # The refused output was closed after its failed start: a half-open connection is not left behind.
    assert world.switched == [] and world.made[0].closed and not world.made[0].started


async def test_the_first_output_is_retried_in_the_background_and_switched_back_to() -> None:
    world = World(refuse=frozenset({"livekit"}), switch_back_retry_s=0.1)
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await wait_until(lambda: world.switched == ["rtmp"])
    await asyncio.sleep(0.35)
    retries = [o for o in world.made if o.name == "livekit"]
    assert len(retries) >= 2 and all(o.closed for o in retries), "failed retries must be closed"
    assert world.live.name == "rtmp"
    world.refuse.clear()  # livekit-server is back
    await wait_until(lambda: world.switched == ["rtmp", "livekit"])
    assert world.live.name == "livekit" and world.plan.current == 0
    assert world.live.switches == 2 and world.live.switch_backs == 1
    assert world.live.stats().extra["switch_backs"] == 1.0
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_without_switch_back_the_session_stays_on_its_fallback(world: World) -> None:
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await wait_until(lambda: world.switched == ["rtmp"])
    await asyncio.sleep(0.5)
    assert [o.name for o in world.made] == ["rtmp"] and world.live.name == "rtmp"
    world.stopping = True
    await asyncio.wait_for(task, 2)


async def test_a_dying_fallback_returns_to_the_first_output_when_switch_back_is_allowed() -> None:
    world = World(refuse=frozenset({"livekit"}), switch_back_retry_s=60.0)  # no retry due during the test
    await world.first.start()
    task = asyncio.create_task(world.watch().run())
    world.first.drop()
    await wait_until(lambda: world.switched == ["rtmp"])
    world.refuse.clear()  # livekit-server is back; then the RTMP ingest dies
    fallback = world.live.current
    assert isinstance(fallback, Output)
    fallback.drop()
    await wait_until(lambda: world.switched == ["rtmp", "livekit"])
    assert world.live.name == "livekit" and world.plan.current == 0 and world.failed == []
    world.stopping = True
    await asyncio.wait_for(task, 2)
