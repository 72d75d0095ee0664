"""Format sanity for a client that streams in real time: does the audio arrive at its declared rate?

A client that declares `pacing=realtime` promises to send audio as it is produced, one second
of audio per second. If it declared the wrong sample rate (44.1 kHz PCM sent as 16 kHz), its
audio arrives at 2.76 "seconds" per second and plays slowed down, and nothing in the samples
themselves says so. `RateWatch` measures the arrival rate over a sliding window of continuous
streaming and flags a rate that stays outside [`low_ratio`, `high_ratio`] × the declared one
for `window_s`. A pause longer than `max_gap_s` restarts the window (between utterances a
real-time client sends nothing, which says nothing about its rate). Bursty clients that send
ahead of real time (allowed: see the buffer limit) simply do not declare `pacing=realtime`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RateVerdict:
    declared_rate_hz: int
    arrival_rate_hz: float  # source sample frames per second of arrival, over the window
    window_s: float

    @property
    def ratio(self) -> float:
        return self.arrival_rate_hz / self.declared_rate_hz


class RateWatch:
    def __init__(
        self,
        *,
        window_s: float = 5.0,
        high_ratio: float = 1.5,
        low_ratio: float = 0.6,
        max_gap_s: float = 1.0,
    ) -> None:
        self.window_s = window_s
        self.high_ratio = high_ratio
        self.low_ratio = low_ratio
        self.max_gap_s = max_gap_s
        self._arrivals: deque[tuple[float, int]] = deque()  # (arrival time, sample frames) of each message
        self.suspect: RateVerdict | None = None  # the current verdict while the rate is off, else None

    def reset(self) -> None:
        self._arrivals.clear()

    def observe(self, at_s: float, frames: int, declared_rate_hz: int) -> RateVerdict | None:
        """Record one message; returns a verdict when the rate has just been found off (once per episode)."""
        if self._arrivals and at_s - self._arrivals[-1][0] > self.max_gap_s:
            self._arrivals.clear()
        self._arrivals.append((at_s, frames))
        while len(self._arrivals) > 1 and at_s - self._arrivals[1][0] >= self.window_s:
            self._arrivals.popleft()
        span_s = at_s - self._arrivals[0][0]
        if span_s < self.window_s:
            return None
        # Frames that arrived after the window's first message, over the time since it: the first message's
        # own frames were produced before it arrived.
        frames_after = sum(count for _, count in list(self._arrivals)[1:])
        verdict = RateVerdict(declared_rate_hz, frames_after / span_s, span_s)
        off = not self.low_ratio <= verdict.ratio <= self.high_ratio
        if not off:
            self.suspect = None
            return None
        fresh = self.suspect is None
        self.suspect = verdict
        return verdict if fresh else None
