"""One audio source feeding a session (a WS connection, or an agent's byte streams).

It owns the source's format and resamplers and applies every check before audio reaches
the timeline: message size, sample alignment, finite in-range floats, the session's
buffer limit. Anything refused is counted as rejected (16 kHz samples) before the error
is raised, so the session's accounting adds up whatever the client sends.

Utterances end on `end_of_utterance` (or a byte stream's close), when the source goes
away, or — so a client that never says so is not left hanging — after
`utterance_gap_ms` without audio (an implicit end: the tail plays with silence padding).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_UTTERANCE_GAP_MS, PcmFormat
from realtime.ingest.ratewatch import RateVerdict, RateWatch
from realtime.ingest.resample import AudioConverter
from realtime.ingest.session import IngestSession

logger = logging.getLogger(__name__)

# The gap is confirmed by a second timer this long after the first: when the first fires at the end of an
# event-loop stall (GC, a GIL-holding thread, a CPU stall), audio the client sent meanwhile may still sit
# unread in the socket, and the loop reads it before the confirming timer runs. A confirming timer that is
# itself late by more than this found another stall, and looks again.
GAP_CONFIRM_S = 0.05


class AudioInput:
    def __init__(
        self,
        runtime: IngestSession,
        source: str,
        pcm_format: PcmFormat | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        utterance_gap_ms: int = DEFAULT_UTTERANCE_GAP_MS,
        realtime_paced: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.source = source
        self.max_message_bytes = max_message_bytes
        self.utterance_gap_ms = utterance_gap_ms
        self.gap_checks_deferred = 0  # gap timers that found the loop stalled and looked again
        self.converter = AudioConverter(pcm_format or PcmFormat())
        self._generation = runtime.timeline.generation
        self._first_byte_at_s: float | None = None
        self._gap_timer: asyncio.TimerHandle | None = None
        self.messages_accepted = 0
        self.errors: Counter[str] = Counter()
        self.implicit_ends = 0
        self._clock = clock
        # The client said it streams in real time (`pacing=realtime`): its arrival rate is checked.
        self.rate_watch = RateWatch() if realtime_paced else None
        # New suspect_sample_rate verdicts; the connection takes them and warns its client.
        self.rate_warnings: list[RateVerdict] = []

    @property
    def pcm_format(self) -> PcmFormat:
        return self.converter.pcm_format

    def set_format(self, pcm_format: PcmFormat) -> None:
        """Switch formats; audio still inside the old resamplers is flushed into the open utterance first."""
        if pcm_format == self.converter.pcm_format:
            return
        self._sync_generation()
        self._ingest_tail()
        self.converter = AudioConverter(pcm_format)
        if self.rate_watch is not None:
            self.rate_watch.reset()  # a new declared rate: judged afresh

    def push(self, payload: bytes) -> None:
        """Accept one binary message, or count it as rejected and raise IngestError."""
        received_at_s = self._clock()
        self._sync_generation()
        pcm_format = self.converter.pcm_format
        whole_frames = len(payload) // pcm_format.bytes_per_frame
        if len(payload) > self.max_message_bytes:
            self._reject(
                IngestError(
                    IngestErrorCode.MESSAGE_TOO_LARGE,
                    f"binary message of {len(payload)} bytes exceeds "
                    f"the {self.max_message_bytes}-byte limit; "
                    "send audio in smaller messages (20-100 ms each is typical)",
                    rejected_samples=pcm_format.to_timeline_samples(whole_frames),
                )
            )
        try:
            mono, clipped = self.converter.decode(payload)
            self._check_accepting(pcm_format.to_timeline_samples(len(mono)))
        except IngestError as exc:
            self._reject(exc)
        if len(mono) == 0:
            return
        if self._first_byte_at_s is None:
            self._first_byte_at_s = received_at_s
        audio = self.converter.convert(mono, clipped)
        self.runtime.ingest(audio, self.source, self._first_byte_at_s)
        self.messages_accepted += 1
        self._watch_rate(received_at_s, len(mono))
        self._arm_gap_timer()

    def _watch_rate(self, received_at_s: float, frames: int) -> None:
        if self.rate_watch is None:
            return
        declared_hz = self.converter.pcm_format.sample_rate_hz
        verdict = self.rate_watch.observe(received_at_s, frames, declared_hz)
        warnings = self.runtime.ingest_warnings
        if self.rate_watch.suspect is None:
            warnings.pop(f"{self.source}_suspect_sample_rate", None)
            return
        warnings[f"{self.source}_suspect_sample_rate"] = 1.0
        warnings[f"{self.source}_arrival_rate_hz"] = round(self.rate_watch.suspect.arrival_rate_hz, 1)
        if verdict is not None:
            self.rate_warnings.append(verdict)
            logger.warning(
                "audio arrives at %.0f samples/s on a real-time stream declared %d Hz: is sample_rate wrong?",
                verdict.arrival_rate_hz,
                declared_hz,
                extra={"session_id": self.runtime.session_id, "source": self.source},
            )

    def push_samples(self, mono: np.ndarray) -> None:
        """Already-decoded mono float32 at this input's rate (agent byte streams); raises BUFFER_FULL."""
        self._sync_generation()
        try:
            self._check_accepting(self.converter.pcm_format.to_timeline_samples(len(mono)))
        except IngestError as exc:
            self._reject(exc)
        if len(mono) == 0:
            return
        if self._first_byte_at_s is None:
            self._first_byte_at_s = time.monotonic()
        self.runtime.ingest(self.converter.convert(mono), self.source, self._first_byte_at_s)
        self._arm_gap_timer()

    def reject(self, error: IngestError) -> None:
        """Count an error found outside `push` (e.g. a bad byte-stream tail) and raise it."""
        self._reject(error)

    def end_utterance(self) -> int | None:
        """The client says the utterance is complete: flush the resamplers and let the tail play."""
        self._cancel_gap_timer()
        self._sync_generation()
        self._ingest_tail()
        self._first_byte_at_s = None
        return self.runtime.end_utterance()

    def interrupt(self) -> None:
        self._cancel_gap_timer()
        self.runtime.interrupt()
        self._sync_generation()

    def settle(self) -> None:
        """Account now for what an interrupt caught inside this input's resamplers (received + flushed)."""
        self._sync_generation()

    def close(self) -> None:
        """The source went away: what it sent still plays (its open utterance ends here)."""
        if self.runtime.timeline.open_utterance is not None or self.converter.holding:
            self.end_utterance()
        self._cancel_gap_timer()

    # ---- internals ------------------------------------------------------------------------

    def _check_accepting(self, timeline_samples: int) -> None:
        """Raise (rejecting `timeline_samples`) when the session has stopped or its buffer is full."""
        if self.runtime.stopped:
            # Its clock is gone: queued audio would stay pending for ever, so it is refused and counted here.
            raise IngestError(
                IngestErrorCode.SESSION_ENDED,
                f"session {self.runtime.session_id} has ended; the message was rejected",
                rejected_samples=timeline_samples,
                fatal=True,
            )
        self.runtime.timeline.check_capacity(timeline_samples)

    def _reject(self, error: IngestError) -> None:
        self.errors[str(error.code)] += 1
        if error.rejected_samples:
            self.runtime.timeline.reject(error.rejected_samples)
        raise error

    def _sync_generation(self) -> None:
        """After an interrupt (from any source), drop what this input's resamplers still hold."""
        generation = self.runtime.timeline.generation
        if generation != self._generation:
            self._generation = generation
            self.runtime.timeline.discard_held(self.converter.reset())
            self._first_byte_at_s = None

    def _ingest_tail(self) -> None:
        tail = self.converter.flush()
        if tail.timeline.size or tail.playout.size:
            self.runtime.ingest(tail, self.source, self._first_byte_at_s or time.monotonic())

    def _arm_gap_timer(self) -> None:
        if self.utterance_gap_ms <= 0:
            return
        self._cancel_gap_timer()
        gap_s = self.utterance_gap_ms / 1000.0
        self._start_gap_timer(max(0.0, gap_s - GAP_CONFIRM_S), confirming=False)

    def _start_gap_timer(self, delay_s: float, *, confirming: bool) -> None:
        loop = asyncio.get_running_loop()
        self._gap_timer = loop.call_later(delay_s, self._on_gap, loop.time() + delay_s, confirming)

    def _cancel_gap_timer(self) -> None:
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _on_gap(self, due_s: float, confirming: bool) -> None:
        self._gap_timer = None
        if not confirming:
            self._start_gap_timer(GAP_CONFIRM_S, confirming=True)
            return
        late_s = asyncio.get_running_loop().time() - due_s
        if late_s > GAP_CONFIRM_S:
            self.gap_checks_deferred += 1
            logger.info(
                "utterance gap check %.0f ms late (the event loop stalled): checking again once queued audio "
                "is read",
                late_s * 1000.0,
                extra={"source": self.source},
            )
            self._start_gap_timer(GAP_CONFIRM_S, confirming=True)
            return
        if self.runtime.timeline.open_utterance is not None or self.converter.holding:
            self.implicit_ends += 1
            logger.info(
                "no audio for %d ms: ending the utterance",
                self.utterance_gap_ms,
                extra={"source": self.source},
            )
            self.end_utterance()
