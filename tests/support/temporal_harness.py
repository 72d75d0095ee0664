"""One isolated orchestration world per test on a real Temporal server.

Its own control queue and PlacementWorkflow id (tests never share slots), the production
control worker (`activities.worker.build_control_worker`), in-process sidecars running the
production sidecar worker (`activities.sidecar_worker.run_sidecar_worker`) around the test
host, and — at close — a `Replayer` pass over every workflow history the test produced
(every run of every workflow id it touched), so a nondeterminism fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer, Worker

from activities.control import ControlConfig
from activities.placement_client import Placer
from activities.sidecar import SidecarActivities, SidecarWorkerConfig
from activities.sidecar_worker import placement_registration, run_sidecar_worker
from activities.worker import build_control_worker
from api.policy_file import load_policies
from infra.paths import PROJECT_ROOT
from tests.support.session_host import LoopbackSessionHost
from workflows import search_attributes
from workflows.client import start_session
from workflows.contracts import (
    DEFAULT_POOL,
    TERMINAL_PHASES,
    AvatarKind,
    AvatarSource,
    ErrorCode,
    OutputRequest,
    Phase,
    PlacementSnapshot,
    SessionRequest,
    SessionStatus,
    placement_registry_id,
    sidecar_task_queue,
)
from workflows.placement import PlacementWorkflow
from workflows.policy import SessionPolicy
from workflows.session import SessionWorkflow

logger = logging.getLogger(__name__)

LOOPBACK_ONLY = ["127.0.0.1/32"]

# Where every failing replay's history is also written: pytest rotates its own temporary directories away,
# and a nondeterminism seen once (e.g. only under a loaded whole-suite run) needs its history replayed again.
FAILED_REPLAY_DIR = PROJECT_ROOT / "build" / "failed-replays"

# Short timeouts so the suite stays fast; everything else comes from infra/policies.yaml.
FAST_POLICY_OVERRIDES: dict[str, Any] = {
    "session.idle_timeout_s": 120.0,
    "session.max_duration_s": 300.0,
    "session.stats_interval_s": 0.25,
    "session.stats_report_interval_s": 0.5,
    "session.stop_grace_s": 2.0,
    "assets.fetch.allow_networks": LOOPBACK_ONLY,
    "outputs.rtmp_allow_networks": LOOPBACK_ONLY,  # nginx-rtmp runs on loopback
    "assets.fetch.connect_timeout_s": 1.0,
    "assets.fetch.read_timeout_s": 1.0,
    "assets.fetch.total_timeout_s": 3.0,
    "assets.fetch.max_bytes": 8 * 1024 * 1024,
    "assets.zip.max_uncompressed_bytes": 5 * 1024 * 1024,
    "assets.zip.max_compression_ratio": 50.0,
    "assets.frames.max_frames": 40,
    "assets.frames.min_side_px": 64,
    "assets.video.max_frames": 40,
    "assets.video.max_duration_s": 10.0,
}
for _name in ("fetch_assets", "validate_assets", "place_session", "release_slot"):
    FAST_POLICY_OVERRIDES[f"activities.{_name}.retry.initial_interval_s"] = 0.2
    FAST_POLICY_OVERRIDES[f"activities.{_name}.retry.maximum_interval_s"] = 0.5
FAST_POLICY_OVERRIDES["activities.fetch_assets.retry.maximum_attempts"] = 2
FAST_POLICY_OVERRIDES["activities.place_session.retry.maximum_attempts"] = 5
for _name in ("prepare_avatar", "warm_up", "open_output", "stop_session", "teardown"):
    FAST_POLICY_OVERRIDES[f"activities.{_name}.schedule_to_start_s"] = 2.0
    FAST_POLICY_OVERRIDES[f"activities.{_name}.heartbeat_timeout_s"] = 1.5
FAST_POLICY_OVERRIDES["activities.run_session.schedule_to_start_s"] = 2.0
FAST_POLICY_OVERRIDES["activities.run_session.heartbeat_timeout_s"] = 1.5
# Temporal stays up in most tests: a live sidecar picks the reconcile up at once, a dead one never does.
FAST_POLICY_OVERRIDES["activities.run_session.reconcile_s"] = 1.5


def fast_policy(**overrides: Any) -> SessionPolicy:
    """infra/policies.yaml with FAST_POLICY_OVERRIDES and `overrides` (dotted keys with `__` for dots)."""
    merged = dict(FAST_POLICY_OVERRIDES)
    merged.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_policies(overrides=merged)


async def _registered(sidecar_id: str, task: asyncio.Task[None], registered: asyncio.Event) -> None:
    """Wait until the sidecar served by `task` has registered; its error if it failed first."""
    waiter = asyncio.create_task(registered.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task.done():
            task.result()  # raises the worker's error
        raise TimeoutError(f"sidecar {sidecar_id} did not register within 30 s")


class Harness:
    def __init__(
        self,
        client: Client,
        root: Path,
        *,
        lease_s: float = 3.0,
        registration_interval_s: float = 0.5,
        livekit_credentials: tuple[str, str] = ("", ""),
        shards: int = 1,
        pools: tuple[str, ...] = (DEFAULT_POOL,),
    ) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.client = client
        self.control_queue = f"control-{suffix}"
        self.placement_id = f"placement-{suffix}"
        self.asset_dir = root / "assets"
        self.cache_dir = root / "avatar-cache"
        self.lease_s = lease_s
        self.registration_interval_s = registration_interval_s
        self.suffix = suffix
        # Named in every failure the harness raises (a chaos test puts its seed here, so a rare failure
        # replays).
        self.failure_context = ""
        self._root = root
        self.livekit_api_key, self.livekit_api_secret = livekit_credentials
        self.hosts: dict[str, LoopbackSessionHost] = {}
        self.shards = shards
        self.pools = pools
        # Every registry of every pool the world uses: replayed at close like the sessions.
        self.registry_ids = [
            placement_registry_id(self.placement_id, pool, shard) for pool in pools for shard in range(shards)
        ]
        self.workflow_ids: list[str] = list(self.registry_ids)
        self._sidecar_tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Harness:
        await self._start_control_worker()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for sidecar_id in list(self._sidecar_tasks):
            await self.stop_sidecar(sidecar_id)
        await self._stack.aclose()
        if exc_info[0] is None:
            await replay_all(
                self.client, self.workflow_ids, failure_context=self.failure_context, history_dir=self._root
            )

    async def _start_control_worker(self) -> None:
        config = ControlConfig(
            asset_dir=self.asset_dir,
            placement_workflow_id=self.placement_id,
            task_queue=self.control_queue,
            shards=self.shards,
        )
        self._control_worker = await self._stack.enter_async_context(
            build_control_worker(self.client, config)
        )

    async def restart_control_worker(self) -> None:
        """Stop the control worker (its workflows are evicted from its cache) and start a fresh one."""
        await self._control_worker.shutdown()
        await self._start_control_worker()

    def sidecar_id(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    async def add_sidecar(
        self, name: str, *, slots: int = 2, pool: str = DEFAULT_POOL, **host_options: Any
    ) -> LoopbackSessionHost:
        sidecar_id = self.sidecar_id(name)
        host = LoopbackSessionHost(
            sidecar_id, sidecar_task_queue(sidecar_id), slots, self.cache_dir, **host_options
        )
        config = self._worker_config(host, pool)
        shutdown, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run_sidecar_worker(self.client, host, config, shutdown=shutdown, ready=ready)
        )
        await _registered(sidecar_id, task, ready)
        self.hosts[sidecar_id] = host
        self._sidecar_tasks[sidecar_id] = (task, shutdown)
        return host

    async def add_late_polling_sidecar(
        self, name: str, *, polls_after_s: float | None, slots: int = 2
    ) -> LoopbackSessionHost:
        """A sidecar registered with placement at once whose queue is first polled `polls_after_s` later
        (None: never): a live sidecar whose pollers still back off after a Temporal outage, or, never
        polling, a process whose worker is wedged while its registration goes on. The real sidecar worker
        registers only once it polls (`run_sidecar_worker`), so this one is put together from the same
        parts here."""
        sidecar_id = self.sidecar_id(name)
        host = LoopbackSessionHost(sidecar_id, sidecar_task_queue(sidecar_id), slots, self.cache_dir)
        config = self._worker_config(host, DEFAULT_POOL)
        placer = Placer(self.client, self.placement_id, self.control_queue, shards=self.shards)
        incarnation = uuid.uuid4().hex
        activities = SidecarActivities(host, config, incarnation)
        shutdown, registered = asyncio.Event(), asyncio.Event()

        async def serve() -> None:
            async with placement_registration(placer, host, config, incarnation, activities.sessions_held):
                registered.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(shutdown.wait(), polls_after_s)  # None: until shut down
                if not shutdown.is_set():
                    async with Worker(
                        self.client, task_queue=config.queue, activities=activities.definitions()
                    ):
                        await shutdown.wait()

        task = asyncio.create_task(serve())
        await _registered(sidecar_id, task, registered)
        self.hosts[sidecar_id] = host
        self._sidecar_tasks[sidecar_id] = (task, shutdown)
        return host

    def _worker_config(self, host: LoopbackSessionHost, pool: str) -> SidecarWorkerConfig:
        return SidecarWorkerConfig.for_host(
            host,
            self.asset_dir,
            control_task_queue=self.control_queue,
            placement_workflow_id=self.placement_id,
            placement_shards=self.shards,
            pool=pool,
            lease_s=self.lease_s,
            registration_interval_s=self.registration_interval_s,
            livekit_api_key=self.livekit_api_key,
            livekit_api_secret=self.livekit_api_secret,
        )

    async def stop_sidecar(self, sidecar_id: str) -> None:
        task, shutdown = self._sidecar_tasks.pop(sidecar_id)
        shutdown.set()
        await asyncio.wait_for(task, timeout=30)

    async def start(
        self, request: SessionRequest, policy: SessionPolicy | None = None
    ) -> WorkflowHandle[SessionWorkflow, Any]:
        handle = await start_session(
            self.client, request, policy or fast_policy(), task_queue=self.control_queue
        )
        self.workflow_ids.append(handle.id)
        return handle

    def request(
        self,
        avatar_url: str,
        output: OutputRequest,
        *,
        kind: AvatarKind = AvatarKind.FRAMES_ZIP,
        session_id: str | None = None,
    ) -> SessionRequest:
        session_id = session_id or f"s-{uuid.uuid4().hex[:10]}"
        return SessionRequest(
            session_id=session_id,
            room=f"room-{session_id}",
            avatar=AvatarSource(url=avatar_url, kind=kind),
            output=output,
        )

    async def snapshot(self) -> PlacementSnapshot:
        handle = self.client.get_workflow_handle_for(PlacementWorkflow.run, self.placement_id)
        return await handle.query(PlacementWorkflow.snapshot)

    async def slots_held(self) -> dict[str, list[str]]:
        """sidecar id -> sessions holding its slots, over every registry of the world's pools."""
        from temporalio.service import RPCError, RPCStatusCode

        held: dict[str, list[str]] = {}
        for registry_id in self.registry_ids:
            handle = self.client.get_workflow_handle_for(PlacementWorkflow.run, registry_id)
            try:
                snapshot = await handle.query(PlacementWorkflow.snapshot)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                continue  # no sidecar registered with this shard
            for record in snapshot.sidecars:
                held[record.sidecar_id] = list(record.sessions)
        return held

    async def snapshot_or_empty(self) -> PlacementSnapshot:
        """The snapshot, or an empty one while no sidecar has registered (the registry does not exist yet)."""
        from temporalio.service import RPCError, RPCStatusCode

        try:
            return await self.snapshot()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return PlacementSnapshot(sidecars=[], reclaimed_sessions=0, now_s=0.0)


async def register_search_attributes(client: Client) -> None:
    """The dev-server fixture registers them at start; the time-skipping server needs it done over the API."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
    from temporalio.service import RPCError

    request = AddSearchAttributesRequest(
        namespace=client.namespace,
        search_attributes={
            key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in search_attributes.ALL_KEYS
        },
    )
    try:
        await client.operator_service.add_search_attributes(request)
    except RPCError as exc:
        if "already" not in str(exc).lower():
            raise


async def wait_for_status(
    handle: WorkflowHandle[SessionWorkflow, Any],
    predicate: Any,
    *,
    timeout_s: float = 30.0,
    poll_s: float = 0.1,
) -> SessionStatus:
    """Poll `status` until predicate(status) holds (queries do not unlock time skipping)."""
    deadline = time.monotonic() + timeout_s
    status = await handle.query(SessionWorkflow.status)
    while not predicate(status):
        if time.monotonic() > deadline:
            raise AssertionError(f"status predicate not met within {timeout_s} s; last status: {status}")
        await asyncio.sleep(poll_s)
        status = await handle.query(SessionWorkflow.status)
    return status


async def failed_with(
    handle: WorkflowHandle[SessionWorkflow, Any], code: ErrorCode
) -> tuple[ApplicationError, SessionStatus]:
    """Wait for the session to fail with `code`: its result raises an ApplicationError of that type and its
    final
    status is FAILED with that error code. Returns the cause and the status for the test's own checks."""
    try:
        await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
    else:
        raise AssertionError(f"the session did not fail (expected {code.value})")
    assert isinstance(cause, ApplicationError) and cause.type == code.value, cause
    status = await handle.query(SessionWorkflow.status)
    assert status.phase is Phase.FAILED and status.error is not None and status.error.code == code.value, (
        status
    )
    return cause, status


def in_phase(*phases: Phase) -> Any:
    return lambda status: status.phase in phases


def is_terminal(status: SessionStatus) -> bool:
    return status.phase in TERMINAL_PHASES


def determinism_replayer() -> Replayer:
    """A Replayer of the project's workflows for determinism checks (with the workers' tracing interceptor).

    debug_mode turns off the SDK's wall-clock deadlock detector (an activation that does not yield within 2 s
    fails). A replay checks determinism, and on a loaded machine the first activation of a replay (a fresh
    sandbox
    decoding the workflow input) can take longer than that without any fault of the workflow's, and the replay
    then
    fails with "[TMPRL1101] Potential deadlock detected", not a nondeterminism. Live workers keep the
    detector."""
    return Replayer(
        workflows=[SessionWorkflow, PlacementWorkflow], interceptors=[TracingInterceptor()], debug_mode=True
    )


async def replay_all(
    client: Client, workflow_ids: Iterable[str], *, failure_context: str = "", history_dir: Path | None = None
) -> int:
    """Replay every stored run of the given workflow ids; raises on any nondeterminism. Returns runs replayed.

    A failure names the run, the replay error and `failure_context`; the failing history is written as JSON
    (see replay_histories), so it can be replayed again outside the test."""
    histories = []
    for workflow_id in dict.fromkeys(workflow_ids):
        runs: list[str | None] = []
        with contextlib.suppress(Exception):  # servers without visibility listing: latest run only
            runs = [
                execution.run_id async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'")
            ]
        if not runs:
            runs = [None]
        for run_id in runs:
            try:
                histories.append(await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history())
            except Exception as exc:  # a workflow that was never started (e.g. placement unused)
                if "not found" not in str(exc).lower():
                    raise
    return await replay_histories(histories, failure_context=failure_context, history_dir=history_dir)


async def replay_histories(
    histories: Iterable[WorkflowHistory],
    *,
    failure_context: str = "",
    history_dir: Path | None = None,
    failed_replay_dir: Path = FAILED_REPLAY_DIR,
) -> int:
    """Replay the histories with the determinism replayer; raises on the first failure. Returns runs replayed.

    The failing history is written as JSON to `failed_replay_dir` (and to `history_dir` when given) before the
    error is raised, and the error names where."""
    replayer = determinism_replayer()
    replayed = 0
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if result.replay_failure is not None:
            name = f"{history.workflow_id}.{history.run_id}.history.json"
            paths = [
                directory / name for directory in (history_dir, failed_replay_dir) if directory is not None
            ]
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(history.to_json())
            saved = " and ".join(str(path) for path in paths)
            raise AssertionError(
                f"replay of {history.workflow_id} run {history.run_id} failed: {result.replay_failure!r}"
                f"; history saved to {saved}{'; ' + failure_context if failure_context else ''}"
            ) from result.replay_failure
        replayed += 1
    logger.info("replayed %d workflow histories", replayed)
    return replayed
