"""Output failover on the sidecar: the live output watched per session, the next admitted output switched to
locally, and the session's first output retried in the background to switch back.

Rules:
- The live output is down while it reports itself not connected (LiveKit: the SDK lost its signal
  connection; RTMP: a write failed) and gone for good once it was removed on purpose (`final_disconnect`).
- From the first moment it is down, the next output of the session's fallback order is started beside it,
  so that the switch costs no connect time when the down time reaches the host's `output_down_timeout_s`;
  should the output come back first, the standby is closed again.
- Past that timeout the session moves to the started standby under its running clock; at once (as soon as
  the standby has opened) for a final disconnect or an output that reports its server unreachable
  (`SERVER_UNREACHABLE`: the timeout is for a transport that may resume, and a refused one will not).
  With none that opens, the session ends `output_failed` (the workflow's own fallback, switch_output,
  stays the backstop).
- The switch is made here, not by the workflow, so failover never waits on the control plane (a round trip
  through Temporal and a worker, or an outage of either); the workflow learns of it from the stats report
  the switch sends at once.
- With a switch-back interval, while the session is on a later output its first output is tried again
  (a fresh connection) at that interval; once it opens the session moves back to it, counted as a
  `switch_back` rather than a fallback. A first output removed on purpose is not tried again. Switch back
  allowed, a fallback that dies tries the outputs before it too, once those after it failed.
- Every failover and switch back leaves its steps in `FailoverPlan.timings` (the session's stats report
  carries them): when the watch saw the output down and when the session moved, as wall-clock instants an
  observer on the same host can set against its own (e.g. when it killed the server), and the durations
  between them on the sidecar's monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from realtime.host import OpenedOutput, OutputTarget
from realtime.outputs.base import SERVER_UNREACHABLE, Publisher
from realtime.outputs.switch import SwitchableOutput

logger = logging.getLogger(__name__)

# How often the live output's state is read: a fraction of the detection budget, and a dict read each time.
WATCH_INTERVAL_S = 0.05

MakePublisher = Callable[[OutputTarget], tuple[Publisher, OpenedOutput]]


@dataclass
class FailoverPlan:
    """A session's admitted outputs in the policy's fallback order; `targets[0]` is its first output."""

    targets: list[OutputTarget]
    current: int = 0  # the live output's position in `targets`
    switch_back_retry_s: float = 0.0  # 0: a session that failed over stays on its fallback
    first_removed: bool = False  # the first output was closed on purpose (room closed, avatar removed)
    failures: list[str] = field(
        default_factory=list
    )  # the latest outputs that failed to open, for the end detail
    # The latest failover's and switch back's steps (see the module docstring), names carrying their unit.
    timings: dict[str, float] = field(default_factory=dict)


class OutputWatch:
    """Watches one session's live output and moves it (see the module docstring)."""

    def __init__(
        self,
        session_id: str,
        live: SwitchableOutput,
        plan: FailoverPlan,
        make_publisher: MakePublisher,
        *,
        down_timeout_s: Callable[[], float],
        stopping: Callable[[], bool],
        on_switched: Callable[[Publisher, OpenedOutput], Awaitable[None]],
        on_failed: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.session_id = session_id
        self.live = live
        self.plan = plan
        self._make_publisher = make_publisher
        self._down_timeout_s = down_timeout_s
        self._stopping = stopping
        self._on_switched = on_switched
        self._on_failed = on_failed
        self._clock = clock
        self._wall_clock = wall_clock
        self._down_at_unix_s = 0.0
        self._standby_connect_s = 0.0
        self._standby: asyncio.Task[tuple[int, Publisher, OpenedOutput] | None] | None = None

    async def run(self) -> None:
        down_since_s: float | None = None
        next_switch_back_s = self._clock() + self.plan.switch_back_retry_s
        try:
            while not self._stopping():
                now_s = self._clock()
                stats = self.live.stats()
                final = bool(stats.extra.get("final_disconnect"))
                unreachable = bool(stats.extra.get(SERVER_UNREACHABLE))
                if stats.connected and not final:
                    down_since_s = None
                    await self._drop_standby()
                    if self._may_switch_back() and now_s >= next_switch_back_s:
                        await self._try_switch_back()
                        next_switch_back_s = self._clock() + self.plan.switch_back_retry_s
                else:
                    if down_since_s is None:
                        down_since_s = now_s
                        self._down_at_unix_s = self._wall_clock()
                        logger.warning(
                            "live output down; starting the next output as standby",
                            extra={
                                "session_id": self.session_id,
                                "output": stats.name,
                                "error": stats.last_error,
                            },
                        )
                    if self._standby is None:
                        self._standby = asyncio.create_task(self._start_next())
                    if final or unreachable or now_s - down_since_s >= self._down_timeout_s():
                        if self.plan.current == 0 and final:
                            self.plan.first_removed = True
                        self.plan.timings["failover_waited_timeout"] = float(not (final or unreachable))
                        self.plan.timings["failover_server_unreachable"] = float(unreachable)
                        if not await self._fail_over(down_since_s, stats.last_error):
                            return
                        down_since_s = None
                        next_switch_back_s = self._clock() + self.plan.switch_back_retry_s
                        continue
                await asyncio.sleep(WATCH_INTERVAL_S)
        finally:
            await self._drop_standby()

    def _may_switch_back(self) -> bool:
        plan = self.plan
        return plan.current > 0 and plan.switch_back_retry_s > 0 and not plan.first_removed

    def _candidates(self) -> list[int]:
        """The outputs after the live one in fallback order; with switch back allowed, then the ones before it
        (a fallback dying while the first output is back need not wait for the next switch-back retry)."""
        plan = self.plan
        later = list(range(plan.current + 1, len(plan.targets)))
        if plan.switch_back_retry_s <= 0:
            return later
        return later + [index for index in range(plan.current) if not (index == 0 and plan.first_removed)]

    async def _start_next(self) -> tuple[int, Publisher, OpenedOutput] | None:
        """Start the first candidate output that opens; None when none does."""
        self.plan.failures = []
        for index in self._candidates():
            target = self.plan.targets[index]
            publisher: Publisher | None = None
            began_s = self._clock()
            try:
                publisher, opened = self._make_publisher(target)
                await publisher.start()
            except Exception as exc:  # every output kind raises its own typed error; each gets its chance
                self.plan.failures.append(f"{target.kind}: {exc}")
                logger.warning(
                    "standby output failed to open",
                    extra={"session_id": self.session_id, "output": target.kind, "error": str(exc)},
                )
                if publisher is not None:
                    await _close_quietly(publisher, self.session_id)
                continue
            self._standby_connect_s = self._clock() - began_s
            return index, publisher, opened
        return None

    async def _fail_over(self, down_since_s: float, error: str) -> bool:
        """Move to the started standby (waiting for it to finish connecting); False when there is none."""
        assert self._standby is not None
        started = await asyncio.shield(self._standby)  # a teardown meanwhile: `run`'s cleanup closes it
        self._standby = None
        if started is None:
            tried = "; ".join(self.plan.failures) or "no further output in the session's fallback order"
            self._on_failed(
                f"the live output failed ({error or 'disconnected'}) and no fallback opened: {tried}"
            )
            return False
        index, publisher, opened = started
        if self._stopping():
            await _close_quietly(publisher, self.session_id)
            return False
        self._record_switch("failover", down_since_s)
        await self.live.switch_to(publisher, started=True)
        self.plan.current = index
        await self._on_switched(publisher, opened)
        logger.warning(
            "output failed over on the sidecar",
            extra={"session_id": self.session_id, "to": opened.kind, **self.plan.timings},
        )
        return True

    def _record_switch(self, step: str, since_s: float) -> None:
        """The steps of the switch about to be made (`step`: failover or switch_back), taken before the swap
        so that the stats report the swap triggers carries them."""
        timings = self.plan.timings
        timings[f"{step}_count"] = timings.get(f"{step}_count", 0.0) + 1.0
        timings[f"{step}_switched_at_unix_s"] = self._wall_clock()
        timings[f"{step}_standby_connect_s"] = round(self._standby_connect_s, 3)
        if step == "failover":
            timings["failover_detected_at_unix_s"] = self._down_at_unix_s
            timings["failover_down_to_switch_s"] = round(self._clock() - since_s, 3)

    async def _try_switch_back(self) -> None:
        target = self.plan.targets[0]
        publisher: Publisher | None = None
        began_s = self._clock()
        try:
            publisher, opened = self._make_publisher(target)
            await publisher.start()
        except asyncio.CancelledError:
            if publisher is not None:
                await _close_quietly(publisher, self.session_id)
            raise
        except Exception as exc:
            logger.info(
                "first output still unavailable; staying on the fallback",
                extra={"session_id": self.session_id, "output": target.kind, "error": str(exc)},
            )
            if publisher is not None:
                await _close_quietly(publisher, self.session_id)
            return
        if self._stopping():
            await _close_quietly(publisher, self.session_id)
            return
        self._standby_connect_s = self._clock() - began_s
        self._record_switch("switch_back", began_s)
        await self.live.switch_to(publisher, started=True, switch_back=True)
        self.plan.current = 0
        await self._on_switched(publisher, opened)
        logger.info(
            "switched back to the first output", extra={"session_id": self.session_id, "to": opened.kind}
        )

    async def _drop_standby(self) -> None:
        """Close the standby. A start in progress is awaited, not cancelled: an output's connect runs partly
        off the event loop (RTMP's in a thread) and would finish after a cancel with nobody to close it."""
        task, self._standby = self._standby, None
        if task is None:
            return
        started = await asyncio.shield(task)
        if started is not None:
            await _close_quietly(started[1], self.session_id)


async def _close_quietly(publisher: Publisher, session_id: str) -> None:
    try:
        await publisher.close()
    except Exception:
        logger.exception("closing an unused output failed", extra={"session_id": session_id})
