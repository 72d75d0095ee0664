"""A live output that can be switched (LiveKit -> RTMP) without restarting the session.

The session runtime keeps publishing to this one object; `switch_to` starts the new output
first (so a failed switch leaves the old one in place), swaps it in between two ticks, then
closes the old one. Stats add up across every output the session has used, so the sample
accounting still holds after a switch, and `switches` makes the change visible (`switch_backs`:
those of them that returned to the session's first output once it was reachable again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from realtime.outputs.base import Publisher, PublisherStats, PublishTick

logger = logging.getLogger(__name__)

# Counters that add up across every output the session has used.
_SUMMED_COUNTERS = (
    "frames_published",
    "frames_dropped",
    "audio_samples_published",
    "audio_samples_dropped",
    "playout_samples_published",
    "reconnects",
)


class SwitchableOutput:
    def __init__(self, initial: Publisher) -> None:
        self._current = initial
        self._retired = PublisherStats(name="retired")
        # Outputs swapped out whose close is still running: their counters still count.
        self._closing: list[Publisher] = []
        self.switches = 0
        self.switch_backs = 0
        self.history: list[str] = [initial.name]

    @property
    def name(self) -> str:
        return self._current.name

    @property
    def current(self) -> Publisher:
        return self._current

    async def start(self) -> None:
        await self._current.start()

    def playout_delay_s(self) -> float:
        """The current output's (0 for one that does not report it): the session's playback events wait for
        it."""
        delay = getattr(self._current, "playout_delay_s", None)
        return float(delay()) if callable(delay) else 0.0

    def speech_heard_at_s(self, utterance_id: int) -> float | None:
        """The current output's (None for one that does not say): when the utterance's last speech sample
        is heard."""
        heard_at = getattr(self._current, "speech_heard_at_s", None)
        value = heard_at(utterance_id) if callable(heard_at) else None
        return None if value is None else float(value)

    async def publish(self, tick: PublishTick) -> None:
        await self._current.publish(tick)

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        self._current.interrupt(idle_frame)

    async def switch_to(
        self, replacement: Publisher, *, started: bool = False, switch_back: bool = False
    ) -> None:
        """Start `replacement` (raises if it cannot open: the current output stays), then retire the current
        one.

        started: the caller started it already (a standby connected while the current output was down).
        switch_back: it is the session's first output again, counted apart from fallbacks."""
        if not started:
            await replacement.start()
        # The swap and its counters happen together, with no await between: a stats sample taken while the
        # old output closes already shows the new name *and* the switch that put it there.
        old, self._current = self._current, replacement
        self._closing.append(old)
        self.switches += 1
        self.switch_backs += int(switch_back)
        self.history.append(replacement.name)
        try:
            await old.close()
        except Exception:
            # The session is on the new output already; a failed close may leave the old one connected: say
            # so.
            logger.exception("closing the replaced output failed", extra={"output": old.name})
        final = old.stats()
        self._closing.remove(old)
        self._retire(final)
        logger.info(
            "output switched",
            extra={
                "from": old.name,
                "to": replacement.name,
                "switches": self.switches,
                "switch_back": switch_back,
            },
        )

    def _retire(self, final: PublisherStats) -> None:
        for counter in _SUMMED_COUNTERS:
            setattr(self._retired, counter, getattr(self._retired, counter) + getattr(final, counter))

    async def close(self) -> None:
        await self._current.close()

    def stats(self) -> PublisherStats:
        current = self._current.stats()
        summed = PublisherStats(name="summed")
        for part in (self._retired, current, *(closing.stats() for closing in self._closing)):
            for counter in _SUMMED_COUNTERS:
                setattr(summed, counter, getattr(summed, counter) + getattr(part, counter))
        return PublisherStats(
            name=current.name,
            connected=current.connected,
            frames_published=summed.frames_published,
            frames_dropped=summed.frames_dropped,
            audio_samples_published=summed.audio_samples_published,
            audio_samples_dropped=summed.audio_samples_dropped,
            playout_samples_published=summed.playout_samples_published,
            reconnects=summed.reconnects,
            last_error=current.last_error,
            extra={
                **current.extra,
                "switches": float(self.switches),
                "switch_backs": float(self.switch_backs),
            },
        )
