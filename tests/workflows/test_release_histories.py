"""SessionWorkflow runs started by an earlier release replay on this code (a deploy does not break sessions in
flight).

tests/workflows/data/session-history-before-reconcile-*.json were recorded from real runs of the code
before the control-plane reconcile (commit 596bf85's parent: `tests/workflows/test_session_lifecycle.py`
and `test_host_failure.py` on a dev server): a session stopped while live, one cancelled while live, one
stopped while preparing, and one whose sidecar was lost before it went live (it failed). Their input has
no `reconcile_s` / `control_plane_grace_s` policy fields: decoding it relies on those fields' defaults.
A run whose `run_session` heartbeat timed out while live under the old code is not among them: that path
now reconciles instead of re-placing (different commands), so such a run would not replay.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory

from api.policy_file import load_policies
from tests.support.temporal_harness import determinism_replayer
from workflows.policy import RunActivityPolicy, SessionLimits

HISTORIES = sorted((Path(__file__).parent / "data").glob("session-history-before-reconcile-*.json"))


def test_the_recorded_histories_are_there() -> None:
    assert len(HISTORIES) == 4, HISTORIES


def test_the_defaults_for_older_inputs_are_the_shipped_policy() -> None:
    """An input from before a field existed decodes with the value infra/policies.yaml ships (YAML still lists
    every
    key: the policy loader refuses a missing one)."""
    shipped = load_policies()
    assert (
        SessionLimits.__dataclass_fields__["control_plane_grace_s"].default
        == shipped.session.control_plane_grace_s
    )
    assert (
        RunActivityPolicy.__dataclass_fields__["reconcile_s"].default
        == shipped.activities.run_session.reconcile_s
    )


@pytest.mark.parametrize("path", HISTORIES, ids=lambda path: path.stem)
async def test_a_session_history_from_an_earlier_release_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, await asyncio.to_thread(path.read_text))
    await determinism_replayer().replay_workflow(history)
