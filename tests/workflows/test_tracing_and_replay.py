"""Cross-cutting checks: one trace from the caller to the activities, and the replay gate really bites."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Replayer

from infra.temporal import TemporalDevServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.divergent_workflow import DivergentSessionWorkflow
from tests.support.outputs import output_request
from tests.support.temporal_harness import Harness, replay_all
from workflows.session import SessionWorkflow

pytestmark = pytest.mark.service


async def test_one_trace_runs_from_the_caller_through_the_workflow_to_the_activity(
    temporal_dev_server: TemporalDevServerConfig, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("lipsync-test")
    client = await Client.connect(temporal_dev_server.target, interceptors=[TracingInterceptor(tracer)])
    async with Harness(client, tmp_path) as harness:
        # The private address is refused by the SSRF guard: a quick, fully traced session.
        request = harness.request(
            "http://10.9.9.9/avatar.zip", output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x"))
        )
        with tracer.start_as_current_span("POST /v1/sessions") as root:
            handle = await harness.start(request)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    trace_id = root.get_span_context().trace_id
    names = {span.name for span in exporter.get_finished_spans() if span.context.trace_id == trace_id}
    assert {
        "StartWorkflow:SessionWorkflow",
        "RunWorkflow:SessionWorkflow",
        "StartActivity:fetch_assets",
        "RunActivity:fetch_assets",
    } <= names, names


async def test_replay_gate_detects_a_nondeterministic_change(harness: Harness, avatar_url: str) -> None:
    request = harness.request(
        "http://10.9.9.9/a.zip", output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x"))
    )
    handle = await harness.start(request)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    history = await handle.fetch_history()
    assert await replay_all(harness.client, [handle.id]) == 1  # the real workflow replays cleanly
    result = await Replayer(workflows=[DivergentSessionWorkflow]).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is not None  # ...and a divergent one does not


def test_session_workflow_is_importable_in_the_sandbox() -> None:
    """Workflow modules import only temporalio and their contracts (validated when a worker registers
    them)."""
    import ast

    for module in (
        "workflows/session.py",
        "workflows/placement.py",
        "workflows/contracts.py",
        "workflows/policy.py",
    ):
        tree = ast.parse(Path(module).read_text())
        imported = {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        } | {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert imported <= {
            "__future__",
            "temporalio",
            "workflows",
            "asyncio",
            "contextlib",
            "dataclasses",
            "datetime",
            "enum",
            "typing",
        }, (module, imported)
    assert SessionWorkflow is not None
