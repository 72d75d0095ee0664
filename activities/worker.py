"""The control-plane Temporal worker: Session and Placement workflows plus the control activities (fetch and
validate assets, place sessions, release slots).

One assembly, used by `lipsync worker` (infra/cli/worker.py) and by the tests' harness, so what the tests run
is what production runs. It lives in `activities` because it joins the workflows (below it) with the
activities; GPU work never runs here: it goes to each sidecar's own queue (activities/sidecar_worker.py).
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.control import ControlActivities, ControlConfig
from workflows.placement import PlacementWorkflow
from workflows.session import SessionWorkflow
from workflows.temporal_client import worker_tracing_interceptors

# Workflow-side modules that hold only immutable definitions (dataclasses, enums, constants): the sandbox
# shares them instead of importing them again for every workflow run, which would otherwise be most of a
# new session's first workflow task. Modules with mutable state must never be listed.
SANDBOX_PASSTHROUGH_MODULES = ("workflows.contracts", "workflows.policy", "workflows.search_attributes")


def build_control_worker(client: Client, config: ControlConfig) -> Worker:
    """The worker for `config.task_queue`; run it with `async with` (replicas share the queue)."""
    restrictions = SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH_MODULES)
    return Worker(
        client,
        task_queue=config.task_queue,
        workflows=[SessionWorkflow, PlacementWorkflow],
        activities=ControlActivities(config).definitions(),
        interceptors=worker_tracing_interceptors(client),
        workflow_runner=SandboxedWorkflowRunner(restrictions=restrictions),
    )
