"""Operations: /readyz, /metrics, and the seed-compatible /health, /debug/musetalk, /debug/audio,
/session/start."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.auth import Principal, presented_key, principal_for, require_admin, require_api_key
from api.deps import Services, services, temporal_client
from api.errors import ApiError
from api.metrics import render
from api.models import (
    AvatarIn,
    CreateSessionIn,
    ErrorOut,
    LiveKitOutputIn,
    OutputIn,
    RtmpOutputIn,
    SeedStartIn,
    SessionCreated,
)
from workflows.contracts import placement_registry_id
from workflows.placement import PlacementWorkflow

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])
ServicesDep = Annotated[Services, Depends(services)]
ClientDep = Annotated[Client, Depends(temporal_client)]

# A poller re-polls at least once a minute (long poll); older entries are gone processes.
POLLER_FRESH_S = 90.0
READINESS_TIMEOUT_S = 5.0
# Sidecars whose task queue one readiness check looks up: readiness needs one that polls, and a lookup per
# registered sidecar would grow with the fleet.
MAX_POLLER_LOOKUPS = 8


async def _fresh_pollers(client: Client, queue: str, queue_type: TaskQueueType.ValueType) -> list[str]:
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=queue_type,
        )
    )
    now = time.time()
    return [
        poller.identity
        for poller in response.pollers
        if now - poller.last_access_time.ToSeconds() <= POLLER_FRESH_S
    ]


async def readiness(svc: Services) -> tuple[bool, dict[str, Any]]:
    """Temporal reachable, >= 1 control worker polling, >= 1 registered sidecar polling its own queue."""
    checks: dict[str, Any] = {}
    try:
        client = await svc.temporal.client()
        workflow_pollers = await _fresh_pollers(
            client, svc.settings.control_task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
        )
        checks["temporal"] = {"ok": True, "target": svc.settings.temporal_target}
    except (ApiError, Exception) as exc:
        message = exc.message if isinstance(exc, ApiError) else f"{exc.__class__.__name__}: {exc}"
        checks["temporal"] = {"ok": False, "target": svc.settings.temporal_target, "error": message}
        return False, checks
    checks["control_workers"] = {
        "ok": bool(workflow_pollers),
        "task_queue": svc.settings.control_task_queue,
        "pollers": workflow_pollers,
    }
    sidecars: dict[str, Any] = {}
    settings = svc.settings
    registries = [
        placement_registry_id(settings.placement_workflow_id, pool, shard)
        for pool in settings.placement_pools
        for shard in range(settings.placement_shards)
    ]
    missing: list[str] = []
    poller_lookups = 0
    try:
        snapshots = []
        for registry_id in registries:
            try:
                snapshots.append(
                    await client.get_workflow_handle_for(PlacementWorkflow.run, registry_id).query(
                        PlacementWorkflow.snapshot
                    )
                )
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                missing.append(registry_id)  # no sidecar has registered with this shard yet
        records = [(record, snapshot.now_s) for snapshot in snapshots for record in snapshot.sidecars]
        for record, now_s in records:
            sidecars[record.sidecar_id] = {
                "ok": False,
                "task_queue": record.task_queue,
                "pollers": None,  # not looked up (see below)
                "lease_ok": record.lease_expires_at_s > now_s,
                "slots_total": record.slots_total,
                "sessions": len(record.sessions),
            }
        # One task-queue lookup per sidecar would grow with the fleet: look up at most
        # MAX_POLLER_LOOKUPS, the leased ones placement would fill first (most free slots), and stop
        # at the first that polls.
        candidates = sorted(
            (record for record, now_s in records if record.lease_expires_at_s > now_s and not record.suspect),
            key=lambda record: (len(record.sessions) - record.slots_total, record.sidecar_id),
        )
        for record in candidates[:MAX_POLLER_LOOKUPS]:
            pollers = await _fresh_pollers(client, record.task_queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
            poller_lookups += 1
            entry = sidecars[record.sidecar_id]
            entry["pollers"], entry["ok"] = pollers, bool(pollers)
            if pollers:
                break
        placement_error = (
            f"no placement registry exists yet (no sidecar has registered): {', '.join(missing)}"
            if len(missing) == len(registries)
            else None
        )
    except Exception as exc:
        placement_error = f"{exc.__class__.__name__}: {exc}"
    checks["sidecars"] = {
        "ok": any(entry["ok"] for entry in sidecars.values()),
        "registered": sidecars,
        "poller_lookups": poller_lookups,
        **({"error": placement_error} if placement_error else {}),
    }
    ready = all(check["ok"] for check in checks.values())
    return ready, checks


def _is_admin(request: Request) -> bool:
    """Whether the caller sent an admin key: only then do the health routes show their checks (addresses,
    worker identities, engine details); anyone else gets the bare answer."""
    presented = presented_key(request.headers)
    principal: Principal | None = principal_for(request.app.state.settings, presented) if presented else None
    return principal is not None and principal.admin


@router.get(
    "/readyz",
    responses={503: {"description": "not ready; with an admin key, the body says which check failed"}},
)
async def readyz(svc: ServicesDep, request: Request) -> JSONResponse:
    age_s = 0.0
    try:
        (ready, checks), age_s = await asyncio.wait_for(
            svc.readiness.get(lambda: readiness(svc)), timeout=READINESS_TIMEOUT_S
        )
    except TimeoutError:
        ready, checks = (
            False,
            {"timeout": {"ok": False, "error": f"checks took over {READINESS_TIMEOUT_S} s"}},
        )
    body: dict[str, Any] = {"ready": ready}
    if _is_admin(request):
        body["checks"] = checks
        body["checks_age_s"] = round(age_s, 3)  # answers are shared between probes for a bounded time
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_admin)])
async def metrics(svc: ServicesDep) -> Response:
    """Prometheus text. Admin only: the per-session series name every tenant's sessions (scrape with the admin
    key as `Authorization: Bearer`)."""
    try:
        client: Client | None = await svc.temporal.client()
    except ApiError:
        client = None
    body = await render(svc.metrics, client, svc.sidecars)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(svc: ServicesDep, request: Request) -> dict[str, Any]:
    """The seed's health: always 200 while the API serves; says whether a session could start now (with an
    admin key: the checks and each sidecar's engine)."""
    try:
        (ready, checks), _ = await asyncio.wait_for(
            svc.readiness.get(lambda: readiness(svc)), timeout=READINESS_TIMEOUT_S
        )
    except TimeoutError:
        ready, checks = False, {}
    if not _is_admin(request):
        return {"status": "ok", "ready": ready}
    sidecars = await svc.sidecars.all_health()
    engines = {
        sidecar_id: document.get("engine", document.get("error")) for sidecar_id, document in sidecars.items()
    }
    caches = {
        sidecar_id: document.get("caches")
        for sidecar_id, document in sidecars.items()
        if "caches" in document
    }
    return {"status": "ok", "ready": ready, "checks": checks, "engines": engines, "caches": caches}


@router.get("/debug/musetalk", dependencies=[Depends(require_admin)])
async def debug_musetalk(svc: ServicesDep) -> dict[str, Any]:
    """`lipsync models check --json` for this host's model dir, plus what each sidecar's engine actually
    runs."""
    # The API loads the engine's model-dir check only when an admin asks for it.
    from realtime.engine.musetalk.check import check_document  # noqa: PLC0415 (MuseTalk's check loads the engine's weight tooling: only on /debug)

    document = await asyncio.to_thread(check_document, svc.settings.model_dir, "auto")
    sidecars = await svc.sidecars.all_health()
    document["sidecars"] = {
        sidecar_id: {"engine": doc.get("engine"), "error": doc.get("error")}
        for sidecar_id, doc in sidecars.items()
    }
    return document


@router.get("/debug/audio")
async def debug_audio(
    svc: ServicesDep,
    client: ClientDep,
    principal: Annotated[Principal, Depends(require_api_key)],
    session_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Per-session audio path: the API relay (bytes in), the sidecar's ingest accounting, publisher state.
    One session: its owner (or an admin); every session: an admin only."""
    if session_id is not None:
        await svc.sessions.ensure_owner(client, session_id, principal)
        return await _audio_debug_one(svc, client, session_id)
    if not principal.admin:
        raise ApiError("admin_only", "every session's audio path needs an admin key; pass session_id")
    sidecars = await svc.sidecars.all_health()
    live = {
        sid: {"sidecar": sidecar_id, "sidecar_stats": stats}
        for sidecar_id, document in sidecars.items()
        for sid, stats in (document.get("sessions") or {}).items()
    }
    for sid, relay in {**svc.relays.recent, **svc.relays.active}.items():
        live.setdefault(sid, {})["relay"] = relay.as_dict()
    return {
        "sessions": live,
        "sidecars_unreachable": {k: v["error"] for k, v in sidecars.items() if "error" in v},
    }


async def _audio_debug_one(svc: Services, client: Client, session_id: str) -> dict[str, Any]:
    status, _ = await svc.sessions.status(client, session_id)
    relay = svc.relays.active.get(session_id) or svc.relays.recent.get(session_id)
    stats = await svc.sidecars.session_stats(status.sidecar, session_id) if status.sidecar else None
    extra = (stats or {}).get("extra") or {}
    publishers = {
        key.removesuffix("_connected"): {
            "connected": bool(value),
            "frames_published": extra.get(key.removesuffix("connected") + "frames_published"),
            "frames_dropped": extra.get(key.removesuffix("connected") + "frames_dropped"),
            "audio_samples_published": extra.get(key.removesuffix("connected") + "audio_samples_published"),
        }
        for key, value in extra.items()
        if key.endswith("_connected")
    }
    return {
        "session_id": session_id,
        "phase": status.phase.value,
        "sidecar": status.sidecar,
        "output": status.output,
        "relay": relay.as_dict() if relay else None,
        "ingest": stats,
        "publishers": publishers,
        # Live from the sidecar while it answers; the workflow's last heartbeat (up to its interval old)
        # otherwise.
        "workflow_stats": stats if stats is not None else status.stats,
        "workflow_stats_source": "sidecar" if stats is not None else "heartbeat",
        "error": {"code": status.error.code, "message": status.error.message} if status.error else None,
    }


@router.post(
    "/session/start",
    status_code=200,
    response_model=SessionCreated,
    responses={400: {"model": ErrorOut}, 409: {"model": ErrorOut}},
)
async def seed_session_start(
    body: SeedStartIn,
    request: Request,
    client: ClientDep,
    principal: Annotated[Principal, Depends(require_api_key)],
) -> SessionCreated:
    """The seed orchestrator's call, mapped onto POST /v1/sessions (same response body)."""
    if not body.connect_livekit and body.rtmp_url is None:
        raise ApiError("validation_error", "connect_livekit is false and there is no rtmp_url: no output")
    if (body.frames_zip_url is None) == (body.idle_video_url is None):
        raise ApiError("validation_error", "give exactly one of frames_zip_url or idle_video_url")
    create = CreateSessionIn(
        session_id=body.session_id,
        avatar=AvatarIn(frames_zip_url=body.frames_zip_url, idle_video_url=body.idle_video_url),
        output=OutputIn(
            livekit=LiveKitOutputIn(room=body.room) if body.connect_livekit else None,
            rtmp=RtmpOutputIn(url=body.rtmp_url) if body.rtmp_url else None,
            record=body.record,
        ),
    )
    svc = services(request)
    created = await svc.sessions.create(client, create, principal)
    svc.metrics.sessions_started.labels(result="started").inc()
    return created
