"""The dev control API: start and stop a session on this sidecar without Temporal.

`POST /v1/sessions/{id}` runs the lifecycle the workflow runs through the activities, on the
same `SessionHost` calls: prepare_avatar -> warm_up -> open_output -> run_session -> teardown
(`DELETE` is stop_session, then teardown once the run has ended). There is no second
implementation of any step: `DevSessions` only orders the host's calls.

Off unless `ServerConfig.dev_api`; even then it opens avatars only under `dev_avatar_dir` and
publishes only to the LiveKit URLs in `dev_livekit_urls`, and needs the service credential
(the server's gate) like every route but /healthz.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from realtime.errors import LipsyncError
from realtime.host import (
    AvatarAsset,
    OpenedOutput,
    OutputTarget,
    PreparedAvatar,
    PrepareProgress,
    RunLimits,
    SessionEndReason,
    SessionHost,
    WarmUpResult,
)
from realtime.outputs.errors import OutputError
from realtime.outputs.registry import LIVEKIT, LiveKitTarget
from realtime.sidecar.config import ServerConfig
from realtime.sidecar.errors import SidecarError

logger = logging.getLogger(__name__)


class LiveKitBody(BaseModel):
    url: str
    room: str
    identity: str
    token: str
    publish_audio: bool = True
    publish_on_behalf: str | None = None


class DevSessionBody(BaseModel):
    avatar_path: str
    avatar_kind: str = "frames_zip"
    livekit: LiveKitBody
    idle_timeout_s: float = Field(default=300.0, gt=0)
    max_duration_s: float = Field(default=3600.0, gt=0)


@dataclass(frozen=True)
class DevStarted:
    prepared: PreparedAvatar
    warm: WarmUpResult
    opened: OpenedOutput


def _no_progress(_progress: PrepareProgress) -> None:
    """Nobody waits on the dev API's preparation progress (the activity turns it into heartbeats)."""


class DevSessions:
    """Sessions the dev API started, each driven through `host` in the activities' order."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self._runs: dict[str, asyncio.Task[None]] = {}

    async def start(
        self,
        session_id: str,
        asset: AvatarAsset,
        target: OutputTarget,
        limits: RunLimits,
    ) -> DevStarted:
        """Prepare, warm up and open the output, then run the session in the background until it ends.

        A failed step tears the session down (as the workflow does) and raises its error.
        """
        try:
            prepared = await self.host.prepare_avatar(session_id, asset, _no_progress)
            warm = await self.host.warm_up()
            opened = await self.host.open_output(session_id, target)
        except Exception:
            await self.host.teardown(session_id)
            raise
        self._runs[session_id] = asyncio.create_task(self._run_then_teardown(session_id, limits))
        return DevStarted(prepared, warm, opened)

    async def _run_then_teardown(self, session_id: str, limits: RunLimits) -> None:
        try:
            end = await self.host.run_session(session_id, limits, lambda _stats: None)
            logger.info("dev session ended", extra={"session_id": session_id, "reason": str(end.reason)})
        except Exception:
            # Nobody awaits a dev session's run but a stop: its failure (e.g. the host was shut down
            # before the run began) goes to the log, and the teardown below still runs.
            logger.exception("dev session run failed", extra={"session_id": session_id})
        finally:
            await self.host.teardown(session_id)
            self._runs.pop(session_id, None)

    async def stop(self, session_id: str) -> None:
        """Stop the session and wait until it is torn down (a session started elsewhere is torn down here)."""
        await self.host.stop_session(session_id, SessionEndReason.STOPPED)
        run = self._runs.get(session_id)
        if run is not None:
            await run
        else:
            await self.host.teardown(session_id)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def policy_refusal(body: DevSessionBody, config: ServerConfig) -> tuple[JSONResponse | None, Path]:
    """The dev API opens avatars only under `dev_avatar_dir` and publishes only to `dev_livekit_urls`.

    Returns (refusal or None, the resolved avatar path). Symlinks are resolved before the check, so a
    link inside the directory that points out of it is refused too. Every refused path gets the same
    answer, so the refusal says nothing about which files exist.
    """
    root = config.dev_avatar_dir
    path = Path(body.avatar_path).resolve()
    if root is None or not Path(body.avatar_path).is_absolute() or not path.is_relative_to(root.resolve()):
        refusal = JSONResponse(
            _error(
                "avatar_path_refused",
                "avatar_path must be an absolute path inside the sidecar's --dev-avatar-dir"
                + ("" if root is not None else " (none is configured, so the dev API opens no avatar)"),
            ),
            status_code=403,
        )
        return refusal, path
    if body.livekit.url not in config.dev_livekit_urls:
        refusal = JSONResponse(
            _error("livekit_url_refused", "livekit.url is not one of the sidecar's --dev-livekit-url values"),
            status_code=403,
        )
        return refusal, path
    return None, path


def add_dev_api(
    app: FastAPI, host: SessionHost, config: ServerConfig, hosts_session: Callable[[str], bool]
) -> DevSessions:
    """Register the dev routes on `app`; `hosts_session(session_id)` says whether `host` has that session."""
    sessions = DevSessions(host)

    @app.post("/v1/sessions/{session_id}")
    async def dev_start(session_id: str, body: DevSessionBody) -> JSONResponse:
        refused, path = policy_refusal(body, config)
        if refused is not None:
            return refused
        asset = AvatarAsset(path=path, kind=body.avatar_kind, digest_sha256="")
        target = OutputTarget(LIVEKIT.name, LiveKitTarget(**body.livekit.model_dump()))
        limits = RunLimits(idle_timeout_s=body.idle_timeout_s, max_duration_s=body.max_duration_s)
        try:
            started = await sessions.start(session_id, asset, target, limits)
        except (SidecarError, OutputError) as exc:
            return JSONResponse({"code": exc.code, "message": exc.message}, status_code=409)
        except Exception as exc:
            code = exc.code if isinstance(exc, LipsyncError) else "prepare_failed"
            return JSONResponse({"code": code, "message": str(exc)}, status_code=422)
        prepared = started.prepared
        return JSONResponse(
            {
                "session_id": session_id,
                "avatar": dataclasses.asdict(prepared) | {"cache_dir": str(prepared.cache_dir)},
                "engine": dataclasses.asdict(started.warm),
                "output": {"kind": str(started.opened.kind), "detail": started.opened.detail},
                "audio_ws": f"/v1/sessions/{session_id}/audio",
            }
        )

    @app.delete("/v1/sessions/{session_id}")
    async def dev_stop(session_id: str) -> dict[str, Any]:
        if not hosts_session(session_id):
            raise HTTPException(404, detail=_error("unknown_session", f"no session {session_id}"))
        await sessions.stop(session_id)
        return {"session_id": session_id, "stopped": True}

    return sessions
