"""A one-activity workflow for the Temporal smoke test (its own module: the sandbox imports it)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

from workflows import search_attributes


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class ShoutWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        # Proves the project's search attributes are registered on the dev server.
        workflow.upsert_search_attributes([search_attributes.PHASE.value_set("shouting")])
        return await workflow.execute_activity(shout, text, start_to_close_timeout=timedelta(seconds=10))


@workflow.defn
class NapWorkflow:
    """Sleeps for hours of workflow time: finishes at once only on a time-skipping server."""

    @workflow.run
    async def run(self, hours: int) -> str:
        await workflow.sleep(timedelta(hours=hours))
        return "rested"
