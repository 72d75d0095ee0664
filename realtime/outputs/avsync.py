"""Send-side A/V anchoring for an audio source that WebRTC pulls in 10 ms blocks.

The LiveKit `AudioSource` keeps a queue that its own timer drains 10 ms at a time; when the
queue is empty at a pull it sends silence. So a sample captured now enters WebRTC at
`max(end of queue, now)`: a tick whose audio comes late (a stalled event loop, a starved
CPU) lets silence in and every later sample goes out that much later; a pull thread that
falls behind real time (CPU starvation, a stopped process) leaves the queue deeper than the
publisher meant. Either way the audio slips against the video, which is captured on the
session clock, and nothing brings it back.

`SourceClock` models that queue in the source's own time: the position is the audio the
source has handed to WebRTC (speech and silence), extrapolated at real-time rate from the
last measurement of the sender's `total_samples_duration`, which counts exactly that. From
it the publisher predicts when the next captured sample enters WebRTC and compares it with
where the tick belongs on the session clock (its anchor: deadline + headroom):

- audio late (prediction after the anchor): the late head of the tick's audio is dropped,
  so the rest enters WebRTC at its anchor (whole 10 ms blocks; a tick later than its own
  length is dropped whole and the next one is re-anchored). In speech, an error of up to two
  frames waits for the next silent tick, so that silence is dropped rather than words;
- audio early (the queue is shallower than the anchor wants, e.g. after the clock restarted
  past a stall or after an interrupt): silence is queued in front of it.

Errors under `tolerance_samples` are left alone (a 10 ms pull cannot be split), so the audio
stays within one pull block of its anchor and the decision never oscillates.

Positions are integer samples at the source's rate, so the accounting of what was dropped
and padded is exact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnchorDecision:
    drop_samples: int  # samples dropped from the head of the tick's audio (it would enter WebRTC late)
    pad_samples: int  # silence queued in front of it (it would enter WebRTC early)
    error_ms: (
        float  # where its first sample would have entered WebRTC vs its anchor, before correcting (+ = late)
    )
    start_s: float  # predicted time (monotonic) at which the first kept sample enters WebRTC


class SourceClock:
    """The audio source's queue, modelled in the source's time (see the module docstring)."""

    jump_blocks = 2  # a measurement further than this from the model replaces it (see `calibrate`)
    nudge_weight = 0.25  # how much a nearer one moves it

    def __init__(self, rate_hz: int, block_samples: int, capacity_samples: int | None = None) -> None:
        self.rate_hz = rate_hz
        self.block_samples = block_samples
        # The most the source can hold (it takes a capture while it has room for it, twice its queue size, and
        # completes it once back under its queue size): a measurement implying a deeper queue means the count
        # stopped while the source went on (see calibrate).
        self.capacity_samples = capacity_samples
        self.rebases = 0
        self._base_position = 0  # samples handed to WebRTC at `_base_at_s`
        self._base_at_s: float | None = None
        self._queue_end = 0  # source position at which the last captured sample enters WebRTC
        # Source position at which the last captured speech has entered WebRTC (see `speech_queued`).
        self._speech_end = 0
        self._first_calibration = False
        self._catching_up = False
        self.calibrations = 0
        self.last_calibration_error_ms = 0.0  # measured position minus the extrapolated one

    @property
    def started(self) -> bool:
        return self._base_at_s is not None

    def start(self, now_s: float) -> None:
        """A new sender started counting the source's audio (its track was published): position 0; what the
        source holds stays queued (nothing on the very first start)."""
        queued = self.queued_samples(now_s) if self.started else 0
        speech_left = max(0, self._speech_end - self.position(now_s)) if self.started else 0
        self._base_position = 0
        self._base_at_s = now_s
        self._queue_end = queued
        self._speech_end = speech_left
        self._first_calibration = True

    def position(self, now_s: float) -> int:
        if self._base_at_s is None:
            return self._queue_end  # not pulled yet: nothing leaves the queue
        return self._base_position + round((now_s - self._base_at_s) * self.rate_hz)

    def calibrate(self, pulled_samples: int, at_s: float) -> None:
        """The sender measured `pulled_samples` handed to WebRTC at `at_s`: extrapolate from there on.

        The count moves in whole pulls, so the position between two pulls is taken half a block on; a pull
        thread also runs a few ms behind and catches up in turn. A measurement within `jump_blocks` of the
        model only nudges it (that jitter must not make the publisher drop speech); a larger one (a stall,
        a starved or stopped pull thread) is taken at once.

        The sender starts counting when its transport is up, a little after the track was published: the
        first measurement after `start` only sets where the count stands (the queue keeps its modelled
        depth), so that offset is never mistaken for a slip."""
        if self._base_at_s is None:
            return
        measured = pulled_samples + self.block_samples // 2
        error = measured - self.position(at_s)
        self.last_calibration_error_ms = error * 1000.0 / self.rate_hz
        queued = self.queued_samples(at_s)
        if self._first_calibration:
            self._first_calibration = False
            self._queue_end += error
            self._speech_end += error
        elif abs(error) <= self.jump_blocks * self.block_samples:
            measured = self.position(at_s) + round(error * self.nudge_weight)
        elif error < 0 and self.capacity_samples is not None and queued - error > self.capacity_samples:
            # The sender stopped counting (its transport was down or resuming) while the source kept draining:
            # a queue that deep cannot exist. Only where the count stands is taken, as on the first
            # measurement.
            self._queue_end += error
            self._speech_end += error
            self.rebases += 1
        self._base_position = measured
        self._base_at_s = at_s
        self.calibrations += 1

    def queued_samples(self, now_s: float) -> int:
        return max(0, self._queue_end - self.position(now_s))

    def captured(self, samples: int, now_s: float) -> None:
        self._queue_end = max(self._queue_end, self.position(now_s)) + samples

    def cleared(self, now_s: float) -> None:
        self._queue_end = self.position(now_s)
        self._speech_end = min(self._speech_end, self._queue_end)

    def speech_captured(self) -> None:
        """The capture just made carries speech: it is queued until the source has handed all of it over."""
        self._speech_end = self._queue_end

    def speech_queued(self, now_s: float) -> bool:
        """Speech captured earlier has not all entered WebRTC yet, in the source's own time (so a pull thread
        that fell behind real time keeps it queued for longer)."""
        return self.position(now_s) < self._speech_end

    def predicted_start_s(self, now_s: float) -> float:
        """When a sample captured now would enter WebRTC."""
        return now_s + self.queued_samples(now_s) / self.rate_hz

    def plan(
        self,
        anchor_s: float,
        tick_samples: int,
        now_s: float,
        *,
        tolerance_samples: int,
        max_pad_samples: int,
        late_speech_tolerance_samples: int = 0,
    ) -> AnchorDecision:
        """How to queue a tick whose first sample belongs in WebRTC at `anchor_s`.

        `late_speech_tolerance_samples` (for a tick that carries speech): audio this little late is kept and
        the
        correction waits for the next silent tick, whose silence is dropped instead of words. Audio a little
        late
        is the side of lip sync viewers tolerate best; a larger error is corrected at once."""
        start_s = self.predicted_start_s(now_s)
        error = round((start_s - anchor_s) * self.rate_hz)
        drop = pad = 0
        if error >= late_speech_tolerance_samples:
            self._catching_up = True  # a large error is corrected all the way, over as many ticks as it takes
        elif error < tolerance_samples:
            self._catching_up = False
        if tolerance_samples <= error < late_speech_tolerance_samples and not self._catching_up:
            pass
        elif error >= tolerance_samples:
            drop = min(tick_samples, self._blocks(error))
        elif error <= -tolerance_samples:
            room = max(0, max_pad_samples - self.queued_samples(now_s))
            pad = min(self._blocks(-error), room - room % self.block_samples)
        return AnchorDecision(
            drop_samples=drop,
            pad_samples=pad,
            error_ms=error * 1000.0 / self.rate_hz,
            start_s=start_s + pad / self.rate_hz,
        )

    def _blocks(self, samples: int) -> int:
        """`samples` rounded to the nearest whole pull block."""
        return round(samples / self.block_samples) * self.block_samples
