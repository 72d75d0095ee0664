"""bench.publish_cost: the per-thread CPU reading, the timing wrapper, and its arguments."""

from __future__ import annotations

import argparse
import time

import pytest

from bench.publish_cost import _handoffs, _Timed, parse_args


def test_the_timer_counts_calls_wall_and_cpu_and_passes_results_and_errors_through() -> None:
    def work(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    timed = _Timed(work)
    assert timed(0.02) == "done"
    assert timed.calls == 1 and timed.wall_s >= 0.02 and timed.cpu_s < timed.wall_s

    def fail() -> None:
        raise RuntimeError("source closed")

    failing = _Timed(fail)
    with pytest.raises(RuntimeError):
        failing()
    assert failing.calls == 1
    timed.reset()
    assert (timed.calls, timed.wall_s, timed.cpu_s) == (0, 0.0, 0.0)


def test_arguments() -> None:
    args = parse_args(
        ["--json", "out.json", "--sessions", "4,12", "--frame-px", "1280x720", "--handoff", "loop"]
    )
    assert (args.sessions, args.frame_px, args.handoff) == ([4, 12], (1280, 720), ["loop"])
    assert parse_args(["--json", "out.json"]).handoff == ["thread", "loop"]
    with pytest.raises(argparse.ArgumentTypeError, match="thread or loop"):
        _handoffs("executor")
