"""bench.stall_neteq: the subscriber's NetEq figures per interval, how long a stall kept them raised, and the
catch-up burst read from the publisher's packets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import stall_neteq
from tests.support.avcheck import JitterSample


def reading(at_s: float, delay_s: float, target_s: float, emitted: int, kind: str = "audio") -> JitterSample:
    return JitterSample(
        at_s=at_s,
        kind=kind,
        jitter_buffer_delay_s=delay_s,
        jitter_buffer_target_delay_s=target_s,
        jitter_buffer_minimum_delay_s=0.0,
        emitted=emitted,
        concealed_samples=emitted // 10,
        removed_for_acceleration=emitted // 100,
        inserted_for_deceleration=0,
    )


def trace(delays_ms: list[float], targets_ms: list[float]) -> list[JitterSample]:
    """Readings 0.1 s apart, 4800 samples played in each interval at the given mean delay and target."""
    samples = [reading(0.0, 0.0, 0.0, 0)]
    for index, (delay_ms, target_ms) in enumerate(zip(delays_ms, targets_ms, strict=True)):
        last = samples[-1]
        samples.append(
            reading(
                0.1 * (index + 1),
                last.jitter_buffer_delay_s + 4800 * delay_ms / 1000.0,
                last.jitter_buffer_target_delay_s + 4800 * target_ms / 1000.0,
                last.emitted + 4800,
            )
        )
    return samples


def test_intervals_are_means_over_what_was_played_and_skip_other_tracks_and_idle_readings() -> None:
    samples = trace([30.0, 250.0], [20.0, 260.0])
    samples.insert(1, reading(0.05, 0.0, 0.0, 0))  # nothing played since the first reading: skipped
    samples.append(reading(0.3, 99.0, 99.0, 10**6, kind="video"))
    intervals = stall_neteq.neteq_intervals(samples)
    assert [round(row.delay_ms, 6) for row in intervals] == [30.0, 250.0]
    assert [round(row.target_ms, 6) for row in intervals] == [20.0, 260.0]
    assert intervals[1].concealed_samples == 480 and intervals[1].accelerated_samples == 48


def test_held_measures_from_the_resume_to_the_last_interval_above_the_level_before_the_stop() -> None:
    # 1 s at 30 ms, the stop (0.25 s), 2 s at 250 ms, then back to 30 ms.
    delays = [30.0] * 10 + [30.0] * 3 + [250.0] * 20 + [30.0] * 20
    intervals = stall_neteq.neteq_intervals(trace(delays, [20.0] * len(delays)))
    level, highest, held = stall_neteq.held_s(
        intervals, lambda row: row.delay_ms, stopped_at_s=1.05, resumed_at_s=1.3, until_s=5.0
    )
    assert level == pytest.approx(30.0) and highest == pytest.approx(250.0)
    assert held == pytest.approx(3.3 - 1.3)  # the last raised interval ends at 3.3 s
    _level, _highest, target_held = stall_neteq.held_s(
        intervals, lambda row: row.target_ms, stopped_at_s=1.05, resumed_at_s=1.3, until_s=5.0
    )
    assert target_held == 0.0  # a target that never rose was not held


def test_held_without_readings_around_the_stall_is_an_error() -> None:
    intervals = stall_neteq.neteq_intervals(trace([30.0] * 5, [20.0] * 5))
    with pytest.raises(ValueError, match="no receive statistics around the stall"):
        stall_neteq.held_s(
            intervals, lambda row: row.delay_ms, stopped_at_s=10.0, resumed_at_s=10.25, until_s=12
        )


def test_the_burst_is_what_left_right_after_the_resume() -> None:
    # On time until 10.0 s; the resume at 10.25 s lets 12 packets go within 0.4 ms; on time again after.
    sent = np.array([9.96, 9.98, 10.0] + [10.2528 + 0.00003 * k for k in range(12)] + [10.26, 10.32, 10.34])
    late = np.array([0.0, 0.0, 0.0] + [240.0 - 20.0 * k for k in range(12)] + [0.0, 0.0, 0.0])
    figures = stall_neteq.burst(late, sent, resumed_at_s=10.25)
    assert figures["packets"] == 12  # not the on-time packet 10 ms after the resume
    assert figures["lateness_ms_max"] == 240.0 and figures["lateness_ms_min"] == 20.0
    assert figures["first_after_resume_ms"] == pytest.approx(2.8)
    assert figures["spread_ms"] == pytest.approx(0.33)
    assert stall_neteq.burst(late, sent, resumed_at_s=11.0) == {"packets": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--after", "0"], "--after must be at least 1"),
        (["--idle-stalls", "-1"], "--idle-stalls at least 0"),
        (["--trace-s", "0"], "--trace-s and --stall-ms positive"),
        (["--stall-ms", "-1"], "--trace-s and --stall-ms positive"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        stall_neteq.main([*argv, "--json", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
