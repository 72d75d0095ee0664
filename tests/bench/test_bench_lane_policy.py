"""`bench.lane_policy`: one short run end to end, and how it pools the runs of a level."""

from __future__ import annotations

from bench.lane_policy import parse_args, run, summarise


async def test_a_short_run_reports_each_level_and_client_start() -> None:
    args = parse_args(
        [
            *("--json", "unused.json", "--sessions", "2", "--client-start", "staggered,lockstep"),
            *("--seeds", "1", "--duration-s", "1.5", "--utterance-s", "0.8", "--gap-s", "0.4"),
        ]
    )
    document = await run(args)
    assert document["benchmark"] == "lane_policy"
    assert set(document["summary"]) == {"staggered_2", "lockstep_2"}
    for row in document["results"]:
        assert row["ttff_ms"], row  # every session spoke at least once
        assert row["speech_frames"] > 0
        # each session's first utterance starts a turn; any later one counts as a turn only if it was
        assert 2 <= len(row["turn_ttff_ms"]) <= len(row["ttff_ms"])
        assert set(row["turn_ttff_ms"]) <= set(row["ttff_ms"])
    assert document["settings"]["batch_ms_by_bucket"]["64"] == round(0.8 * 136.77, 2)


def test_the_summary_pools_every_utterance_of_a_level_over_its_runs() -> None:
    rows = [
        {
            "client_start": "staggered",
            "sessions": 4,
            "ttff_ms": [100.0, 200.0],
            "turn_ttff_ms": [100.0],
            "dropped_frames": 1,
            "utterance_start_deferred_ticks": 2,
            "clock_resyncs": 3,
            "gc_long_pauses": [[1.5, 2, 240.0], [2.0, 1, 12.0]],
        },
        {
            "client_start": "staggered",
            "sessions": 4,
            "ttff_ms": [300.0],
            "turn_ttff_ms": [300.0],
            "dropped_frames": 0,
            "utterance_start_deferred_ticks": 1,
            "clock_resyncs": 0,
            "gc_long_pauses": [[4.0, 2, 210.0]],
        },
    ]
    summary = summarise(rows)["staggered_4"]
    assert summary["utterances"] == 3
    assert summary["ttff_ms_p50"] == 200.0
    assert summary["turn_utterances"] == 2
    assert summary["turn_ttff_ms_p50"] == 200.0  # of 100 and 300
    assert summary["dropped_frames"] == 1
    assert summary["utterance_start_deferred_ticks"] == 3
    assert summary["clock_resyncs"] == 3
    assert summary["gc_long_pauses"] == 3
    assert summary["gc_pause_ms_max"] == 240.0
    assert summary["runs"] == 2
