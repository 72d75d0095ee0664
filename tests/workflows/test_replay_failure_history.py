"""A failing determinism replay keeps the history that failed, outside pytest's rotating temporary dirs.

A nondeterminism that shows only under load (a whole-suite run on busy cores) cannot be studied without the
history that the workflow code failed to replay: the harness writes it to a stable directory and names it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory

from tests.support.temporal_harness import FAILED_REPLAY_DIR, replay_histories

RECORDED = Path(__file__).parent / "data" / "session-history-before-output-specs.json"


def _with_first_activity_renamed(text: str) -> str:
    """The recorded history with its first scheduled activity renamed: the code cannot replay it."""
    history = json.loads(text)
    scheduled = next(e for e in history["events"] if e["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED")
    scheduled["activityTaskScheduledEventAttributes"]["activityType"]["name"] = "not_an_activity_of_this_code"
    return json.dumps(history)


def test_failed_replays_are_kept_under_the_build_directory() -> None:
    assert FAILED_REPLAY_DIR.parts[-2:] == ("build", "failed-replays")


async def test_a_failing_replay_saves_its_history_where_the_error_says(tmp_path: Path) -> None:
    text = await asyncio.to_thread(RECORDED.read_text)
    good = WorkflowHistory.from_json("recorded-session", text)
    broken = WorkflowHistory.from_json("tampered-session", _with_first_activity_renamed(text))
    kept, test_dir = tmp_path / "kept", tmp_path / "test"
    test_dir.mkdir()

    assert await replay_histories([good], failed_replay_dir=kept) == 1
    assert not kept.exists()  # nothing is written for a clean replay

    with pytest.raises(AssertionError, match="Nondeterminism") as failure:
        await replay_histories(
            [good, broken], history_dir=test_dir, failed_replay_dir=kept, failure_context="seed 7"
        )
    [saved] = list(kept.iterdir())
    assert saved.name == f"tampered-session.{broken.run_id}.history.json"
    assert str(saved) in str(failure.value) and str(test_dir / saved.name) in str(failure.value)
    assert "seed 7" in str(failure.value)
    # What was saved is the failing history itself: it fails the same way when replayed from the file.
    again = WorkflowHistory.from_json("tampered-session", await asyncio.to_thread(saved.read_text))
    with pytest.raises(AssertionError, match="Nondeterminism"):
        await replay_histories([again], failed_replay_dir=tmp_path / "again")
