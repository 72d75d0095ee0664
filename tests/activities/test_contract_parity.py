"""The workflow contracts mirror a few realtime.host values instead of importing them; keep them equal."""

from __future__ import annotations

from realtime.host import SessionEndReason
from workflows.contracts import EndReason


def test_every_host_end_reason_is_a_workflow_end_reason() -> None:
    assert {reason.value for reason in SessionEndReason} <= {reason.value for reason in EndReason}
