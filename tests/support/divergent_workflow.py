"""A workflow that pretends to be SessionWorkflow but issues other commands (its own module: the sandbox
imports it)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from workflows.contracts import SessionInput, SessionResult


@workflow.defn(name="SessionWorkflow")
class DivergentSessionWorkflow:
    """Same name and input, different commands: what a careless code change would replay as."""

    @workflow.run
    async def run(self, session_input: SessionInput) -> SessionResult:
        await workflow.sleep(timedelta(seconds=1))
        raise RuntimeError("unreachable")
