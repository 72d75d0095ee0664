"""Which utterances' TTFF a caller hears (`RuntimeSamples.turn_ttff_ms`): one that arrives while its session
still plays the last one starts when that one ends, so its "TTFF" is that wait; only an utterance planned on
an idle session starts a turn."""

from __future__ import annotations

from realtime.sidecar.config import RuntimeConfig
from tests.support.lane_sim import SimResult, simulate

BATCH_MS = {1: 2.0, 2: 3.0, 4: 4.0, 8: 6.0, 16: 10.0}  # a fast device: the leads stay short


async def _one_session(gap_s: float) -> SimResult:
    return await simulate(
        1,
        BATCH_MS,
        RuntimeConfig(),
        duration_s=2.2,
        utterance_s=0.8,
        gap_s=gap_s,
        max_batch_frames=16,
        burst_s=0.4,  # the client's sends end 0.4 s before its audio does
        pipelined=True,
    )


async def test_an_utterance_sent_while_the_last_one_plays_is_not_a_turn() -> None:
    # The next utterance's first message comes 0.1 s after the last one's last, 0.3 s and more before that
    # one's audio ends: it queues behind it.
    result = await _one_session(gap_s=0.1)
    assert len(result.ttff_ms) >= 3
    assert result.turn_ttff_ms == result.ttff_ms[:1]  # the call's first utterance only
    # What the queued ones count as TTFF is the rest of the one playing: longer than the first's lead.
    assert min(result.ttff_ms[1:]) > result.ttff_ms[0]
    assert result.dropped_frames == 0


async def test_an_utterance_sent_after_the_last_one_played_out_starts_a_turn() -> None:
    result = await _one_session(gap_s=0.7)  # 0.3 s of silence between the two, as heard
    assert len(result.ttff_ms) >= 2
    assert result.turn_ttff_ms == result.ttff_ms
    # A lead and a tick on an idle lane (40-80 ms here; room for a loaded machine's event loop); with the
    # short gap, a queued utterance waits 0.3 s of the last one's audio and more.
    assert max(result.turn_ttff_ms) < 250.0
    assert result.dropped_frames == 0
