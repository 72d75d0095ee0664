"""The workflow contracts mirror a few realtime.host values instead of importing them; keep them equal."""

from __future__ import annotations

from realtime.host import OutputKind as HostOutputKind
from realtime.host import SessionEndReason
from workflows.contracts import EndReason, OutputKind
from workflows.policy import OutputKindName


def test_output_kinds_match() -> None:
    assert {k.value for k in OutputKind} == {k.value for k in HostOutputKind} == {k.value for k in OutputKindName}


def test_every_host_end_reason_is_a_workflow_end_reason() -> None:
    assert {reason.value for reason in SessionEndReason} <= {reason.value for reason in EndReason}
