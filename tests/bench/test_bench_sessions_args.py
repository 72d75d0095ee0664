"""bench.sessions' frame sizes: N or WxH, even and >= 16 px (what video encoders take), and the avatar at that
size."""

from __future__ import annotations

import argparse
import io
import random
import zipfile

import cv2
import numpy as np
import pytest

from bench.sessions import (
    GAP_S,
    UTTERANCE_S,
    _client_starts,
    _ladder_turned,
    avatar_zip,
    client_cycle_s,
    client_start_delays_s,
    frame_px,
    parse_args,
)

CYCLE_S = UTTERANCE_S + GAP_S  # an utterance sent in real time, then the gap


@pytest.mark.parametrize(
    ("text", "size"), [("512", (512, 512)), ("512x512", (512, 512)), ("1280X720", (1280, 720))]
)
def test_frame_sizes_are_a_side_or_width_by_height(text: str, size: tuple[int, int]) -> None:
    assert frame_px(text) == size


@pytest.mark.parametrize("text", ["", "wide", "1280x", "1280x720x2", "8x8", "513x512", "-512"])
def test_other_frame_sizes_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"N or WxH"):
        frame_px(text)


def test_a_wide_avatar_keeps_the_face_square_and_reflects_the_sides() -> None:
    with zipfile.ZipFile(io.BytesIO(avatar_zip(320, 180, count=2))) as archive:
        names = archive.namelist()
        decoded = [cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_COLOR) for n in names]
    frames = [frame for frame in decoded if frame is not None]
    assert len(frames) == 2
    assert all(frame.shape == (180, 320, 3) for frame in frames)
    # The middle 180 columns are the square photo; the 70 columns either side mirror its edges.
    frame = frames[0]
    assert np.array_equal(frame[:, 69::-1], frame[:, 70:140])


def test_lockstep_clients_start_together_and_staggered_ones_spread_over_a_cycle() -> None:
    assert client_start_delays_s("lockstep", 4, random.Random(1), cycle_s=CYCLE_S) == [0.0] * 4
    delays_s = client_start_delays_s("staggered", 200, random.Random(1), cycle_s=CYCLE_S)
    assert all(0.0 <= d <= UTTERANCE_S + GAP_S for d in delays_s)
    # spread over the whole cycle, not bunched: every quarter of it holds some starts
    quarters = {int(d / (UTTERANCE_S + GAP_S) * 4) for d in delays_s}
    assert quarters >= {0, 1, 2, 3}
    # one level's phases are the same from run to run (the level's seed)
    assert client_start_delays_s("staggered", 5, random.Random(7), cycle_s=CYCLE_S) == client_start_delays_s(
        "staggered", 5, random.Random(7), cycle_s=CYCLE_S
    )


def test_staggered_phases_spread_over_the_client_cycle_of_the_gap_asked_for() -> None:
    # 3 s utterances, the first 0.6 s sent at once: 2.4 s of sending, then the gap.
    assert client_cycle_s(0.6, 1.5) == pytest.approx(UTTERANCE_S - 0.6 + 1.5)
    assert client_cycle_s(0.0, 0.4, utterance_s=0.8) == pytest.approx(1.2)
    cycle_s = client_cycle_s(0.6, 1.5)
    delays_s = client_start_delays_s("staggered", 200, random.Random(2), cycle_s=cycle_s)
    assert max(delays_s) <= cycle_s
    assert max(delays_s) > UTTERANCE_S + GAP_S  # the longer cycle is used, not a real-time client's


def test_the_client_gap_defaults_to_the_earlier_runs_and_can_be_asked_for() -> None:
    required = ["--sessions", "4", "--json", "out.json"]
    assert parse_args(required).client_gap_s == GAP_S
    assert parse_args([*required, "--client-gap-s", "1.5"]).client_gap_s == 1.5


def test_client_start_modes_parse_as_a_list_and_unknown_ones_are_refused() -> None:
    required = ["--sessions", "4", "--json", "out.json"]
    args = parse_args([*required, "--client-start", "lockstep,staggered"])
    assert args.client_start == ["lockstep", "staggered"]
    assert parse_args(required).client_start == ["lockstep"]
    with pytest.raises(argparse.ArgumentTypeError, match="lockstep or staggered"):
        _client_starts("poisson")
    with pytest.raises(ValueError, match="expected one of"):
        client_start_delays_s("poisson", 1, random.Random(0), cycle_s=CYCLE_S)


def test_each_client_start_mode_runs_its_own_ladder_until_it_turns() -> None:
    args = argparse.Namespace(all_levels=False)
    rows = [
        {"client_start": "lockstep", "sessions": 4, "ok": True},
        {"client_start": "lockstep", "sessions": 8, "ok": False},
    ]
    assert _ladder_turned(rows, args)  # 8 >= 2 x 4 and failed
    rows.append({"client_start": "staggered", "sessions": 4, "ok": True})
    assert not _ladder_turned(rows, args)  # the staggered ladder starts afresh
    assert not _ladder_turned(rows[:2], argparse.Namespace(all_levels=True))
