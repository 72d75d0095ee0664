"""Session operations behind the HTTP routes: requests -> workflow contracts -> Temporal, and back.

The API is a Temporal *client* only: it starts `SessionWorkflow` (id `session-<id>`), queries
its `status`, sends the `stop` update, and lists sessions through visibility. The policy file
is loaded here (at the first request) and passed in the workflow input with the caller's
per-session limits applied, so each run's policy is in its history.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)
from temporalio.common import TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import Principal
from api.errors import ApiError
from api.livekit_tokens import MAX_ROOM_CHARS
from api.models import (
    CreateSessionIn,
    ErrorOut,
    LiveKitInfo,
    SessionCreated,
    SessionList,
    SessionOut,
    SessionSummary,
)
from api.policy_file import load_policies
from api.settings import DEFAULT_TENANT, ApiSettings
from api.tracing import MEMO_TRACEPARENT, current_traceparent, trace_id_of
from api.url_check import check_asset_url
from realtime.outputs.registry import LIVEKIT, RTMP, LiveKitParams, RtmpTarget
from workflows import search_attributes
from workflows.client import session_handle, start_session, stop_session
from workflows.contracts import (
    SESSION_WORKFLOW_ID_PREFIX,
    AvatarKind,
    AvatarSource,
    ErrorInfo,
    OutputRequest,
    OutputSpec,
    Phase,
    SessionRequest,
    SessionStatus,
    session_workflow_id,
)
from workflows.policy import SessionPolicy
from workflows.session import SessionWorkflow
from workflows.sidecar_tokens import AUDIO_TOKEN_PARAM, mint_audio_token

logger = logging.getLogger(__name__)

MEMO_METADATA = "metadata"
MEMO_AUDIO_QUERY = "audio_query"
LIST_PAGE_SIZE_MAX = 500

# Temporal execution status -> the phase a closed workflow ended in, when its query is unavailable.
_CLOSED_PHASE = {
    WorkflowExecutionStatus.COMPLETED: Phase.COMPLETED,
    WorkflowExecutionStatus.FAILED: Phase.FAILED,
    WorkflowExecutionStatus.CANCELED: Phase.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: Phase.FAILED,
    WorkflowExecutionStatus.TIMED_OUT: Phase.FAILED,
}


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND


def not_found(session_id: str) -> ApiError:
    return ApiError("not_found", f"no session {session_id!r}")


VIEWER_IDENTITY_PREFIX = "viewer-"  # viewer tokens' identities; an avatar identity may not start with it
ROOM_NAMESPACE_SEPARATOR = "."


def tenant_of(attributes: TypedSearchAttributes) -> str:
    """The tenant that started the session (sessions started before tenancy belong to the default tenant)."""
    return attributes.get(search_attributes.TENANT) or DEFAULT_TENANT


def namespaced_room(principal: Principal, requested: str, tenants: frozenset[str]) -> str:
    """The LiveKit room a caller's session publishes into: a named tenant's rooms are `<tenant>.<room>` (the
    prefix is added when missing), so no tenant can publish into or mint viewer tokens for another tenant's
    rooms. The default tenant's rooms are as given, except inside a named tenant's namespace; an admin's
    too."""
    prefix, sep, _ = requested.partition(ROOM_NAMESPACE_SEPARATOR)
    if principal.admin:
        return requested
    if principal.tenant == DEFAULT_TENANT:
        if sep and prefix in tenants:
            raise ApiError("room_not_allowed", f"room {requested!r} is in tenant {prefix!r}'s namespace")
        return requested
    own = principal.tenant + ROOM_NAMESPACE_SEPARATOR
    room = requested if requested.startswith(own) else own + requested
    if len(room) > MAX_ROOM_CHARS:
        raise ApiError(
            "room_too_long",
            f"room {room!r} (with the tenant prefix) exceeds {MAX_ROOM_CHARS} chars",
        )
    return room


class SessionService:
    def __init__(self, settings: ApiSettings, policy: SessionPolicy | None = None) -> None:
        self.settings = settings
        self._policy = policy

    @property
    def policy(self) -> SessionPolicy:
        if self._policy is None:
            self._policy = load_policies(self.settings.policies_path)
        return self._policy

    # --- URLs ----------------------------------------------------------------------------

    def audio_ws_url(self, session_id: str, audio_query: Mapping[str, str] | None = None) -> str:
        """The session's audio WebSocket on this API, with an audio token for it when sidecars are configured:
        a client streams with this URL alone (no API key), until the token expires."""
        base = "ws" + self.settings.public_base_url.removeprefix("http")
        params = dict(audio_query or {})
        if self.settings.sidecar_secret:
            expires_at_s = int(time.time()) + self.settings.audio_token_ttl_s
            params[AUDIO_TOKEN_PARAM] = mint_audio_token(
                self.settings.sidecar_secret,
                session_id,
                expires_at_s,
            )
        query = f"?{urlencode(params)}" if params else ""
        return f"{base}/v1/sessions/{quote(session_id)}/audio{query}"

    def status_url(self, session_id: str) -> str:
        return f"{self.settings.public_base_url}/v1/sessions/{quote(session_id)}"

    def temporal_ui_url(self, session_id: str) -> str:
        workflow_id = quote(session_workflow_id(session_id), safe="")
        namespace = self.settings.temporal_namespace
        return f"{self.settings.temporal_ui_url}/namespaces/{namespace}/workflows/{workflow_id}"

    # --- operations ----------------------------------------------------------------------

    def build_request(
        self, body: CreateSessionIn, principal: Principal | None = None
    ) -> tuple[SessionRequest, SessionPolicy]:
        policy = self.policy
        session_id = body.session_id or secrets.token_hex(8)
        avatar = body.avatar
        if avatar.frames_zip_url is not None:
            source = AvatarSource(url=avatar.frames_zip_url, kind=AvatarKind.FRAMES_ZIP)
            field = "avatar.frames_zip_url"
        else:
            assert avatar.idle_video_url is not None  # the model allows exactly one
            source = AvatarSource(url=avatar.idle_video_url, kind=AvatarKind.IDLE_VIDEO)
            field = "avatar.idle_video_url"
        check_asset_url(source.url, field, list(policy.assets.fetch.allow_networks))
        # The HTTP body names its outputs by field; the workflow takes registered kinds and their parameters.
        specs: list[OutputSpec] = []
        principal = principal or Principal(DEFAULT_TENANT)
        room = namespaced_room(principal, f"lipsync-{session_id}", self.settings.tenants)
        if body.output.livekit is not None:
            room = namespaced_room(principal, body.output.livekit.room, self.settings.tenants)
            identity = body.output.livekit.identity or f"avatar-{session_id}"
            if identity.startswith(VIEWER_IDENTITY_PREFIX):
                raise ApiError(
                    "identity_reserved",
                    f"output.livekit.identity may not start with {VIEWER_IDENTITY_PREFIX!r} (viewer tokens "
                    "use it)",
                )
            livekit = LiveKitParams(
                url=self.settings.sidecar_livekit_url,
                identity=identity,
                publish_audio=body.output.livekit.publish_audio,
                publish_on_behalf=body.output.livekit.publish_on_behalf,
            )
            specs.append(OutputSpec(LIVEKIT.name, LIVEKIT.to_params(livekit)))
        if body.output.rtmp is not None:
            specs.append(OutputSpec(RTMP.name, RTMP.to_params(RtmpTarget(url=body.output.rtmp.url))))
        request = SessionRequest(
            session_id=session_id,
            room=room,
            avatar=source,
            output=OutputRequest(specs=specs, record=body.output.record),
        )
        limits = policy.session
        if body.idle_timeout_s is not None:
            limits = dataclasses.replace(limits, idle_timeout_s=body.idle_timeout_s)
        if body.max_duration_s is not None:
            limits = dataclasses.replace(limits, max_duration_s=body.max_duration_s)
        return request, dataclasses.replace(policy, session=limits)

    async def create(
        self,
        client: Client,
        body: CreateSessionIn,
        principal: Principal | None = None,
    ) -> SessionCreated:
        principal = principal or Principal(DEFAULT_TENANT)
        request, policy = self.build_request(body, principal)
        audio_query = (
            {
                "sample_rate": str(body.audio.sample_rate),
                "encoding": body.audio.encoding,
                "channels": str(body.audio.channels),
            }
            if body.audio is not None
            else {}
        )
        traceparent = current_traceparent().get(MEMO_TRACEPARENT, "")
        memo: dict[str, Any] = {MEMO_TRACEPARENT: traceparent, MEMO_AUDIO_QUERY: audio_query}
        if body.metadata:
            memo[MEMO_METADATA] = body.metadata
        try:
            await start_session(
                client,
                request,
                policy,
                task_queue=self.settings.control_task_queue,
                memo=memo,
                tenant=principal.tenant,
            )
        except WorkflowAlreadyStartedError as exc:
            raise ApiError("session_exists", f"session {request.session_id!r} already exists") from exc
        logger.info("session started", extra={"session_id": request.session_id, "room": request.room})
        livekit = None
        for spec in request.output.offered():
            if spec.kind == LIVEKIT.name:
                identity = LIVEKIT.parse(spec.params).identity
                livekit = LiveKitInfo(url=self.settings.livekit_url, room=request.room, identity=identity)
        return SessionCreated(
            session_id=request.session_id,
            audio_ws_url=self.audio_ws_url(request.session_id, audio_query),
            livekit=livekit,
            status_url=self.status_url(request.session_id),
            trace_id=trace_id_of(traceparent) if traceparent else None,
            temporal_ui_url=self.temporal_ui_url(request.session_id),
        )

    async def memo(
        self,
        client: Client,
        session_id: str,
    ) -> tuple[WorkflowExecutionStatus | None, dict[str, Any]]:
        """The execution's status and memo; 404 when there is no such session."""
        description = await self._describe(client, session_id)
        return description.status, dict(await description.memo())

    async def _describe(self, client: Client, session_id: str) -> WorkflowExecutionDescription:
        """The session's execution description; 404 when there is no such session."""
        try:
            return await session_handle(client, session_id).describe()
        except RPCError as exc:
            if _is_not_found(exc):
                raise not_found(session_id) from exc
            raise

    async def ensure_owner(self, client: Client, session_id: str, principal: Principal) -> None:
        """404 (as for a session that does not exist) unless `principal` owns the session or is an admin."""
        if principal.admin:
            return
        description = await self._describe(client, session_id)
        if not principal.owns(tenant_of(description.typed_search_attributes)):
            raise not_found(session_id)

    async def status(
        self,
        client: Client,
        session_id: str,
    ) -> tuple[SessionStatus, WorkflowExecutionStatus | None]:
        """The workflow's `status` query; for a closed workflow whose query fails, what its history says."""
        status, execution_status, _ = await self.status_and_memo(client, session_id)
        return status, execution_status

    async def status_and_memo(
        self, client: Client, session_id: str
    ) -> tuple[SessionStatus, WorkflowExecutionStatus | None, dict[str, Any]]:
        handle = session_handle(client, session_id)
        # Both at once: a status read is on every poller's path (the relay, clients, the benchmark).
        described, queried = await asyncio.gather(
            handle.describe(), handle.query(SessionWorkflow.status), return_exceptions=True
        )
        if isinstance(described, BaseException):
            if _is_not_found(described):
                raise not_found(session_id) from described
            raise described
        description = described
        if isinstance(queried, SessionStatus):
            status = queried
        elif isinstance(queried, RPCError):
            # No worker to answer the query (e.g. a closed session): say what visibility knows.
            room = description.typed_search_attributes.get(search_attributes.ROOM) or ""
            phase = description.typed_search_attributes.get(search_attributes.PHASE) or Phase.PENDING.value
            status = SessionStatus(session_id=session_id, room=room, phase=Phase(phase))
            if description.status in _CLOSED_PHASE:
                status.phase = _CLOSED_PHASE[description.status]
                status.error = await _failure_of(handle)
        else:
            assert isinstance(queried, BaseException)
            raise queried
        return status, description.status, dict(await description.memo())

    async def light_status(self, client: Client, session_id: str) -> SessionStatus:
        """Phase and sidecar from the execution's search attributes (a server-side read, no query to a
        worker).

        For pollers such as the audio relay: the workflow upserts LipsyncPhase/LipsyncSidecar at
        every phase, so this is current without loading the control worker. An ended session
        gets the full status (its error code).
        """
        description = await self._describe(client, session_id)
        if description.status in _CLOSED_PHASE:
            return (await self.status(client, session_id))[0]
        attributes = description.typed_search_attributes
        status = SessionStatus(
            session_id=session_id,
            room=attributes.get(search_attributes.ROOM) or "",
            phase=Phase(attributes.get(search_attributes.PHASE) or Phase.PENDING.value),
        )
        status.sidecar = attributes.get(search_attributes.SIDECAR) or ""
        status.output = attributes.get(search_attributes.OUTPUT) or ""
        return status

    async def session_out(self, client: Client, session_id: str) -> SessionOut:
        status, execution_status, memo = await self.status_and_memo(client, session_id)
        traceparent = memo.get(MEMO_TRACEPARENT) or ""
        audio_query = memo.get(MEMO_AUDIO_QUERY) or {}
        return SessionOut(
            session_id=status.session_id,
            room=status.room,
            phase=status.phase.value,
            audio_ws_url=self.audio_ws_url(session_id, audio_query if isinstance(audio_query, dict) else {}),
            workflow_status=execution_status.name if execution_status else "UNKNOWN",
            output=status.output,
            output_detail=status.output_detail,
            sidecar=status.sidecar,
            pool=status.pool,
            placement_reason=status.placement_reason,
            stats=status.stats,
            stats_reported_at=status.stats_reported_at,
            error=ErrorOut(code=status.error.code, message=status.error.message) if status.error else None,
            end_reason=status.end_reason.value if status.end_reason else None,
            live_since=status.live_since,
            ended_at=status.ended_at,
            output_attempts=[dataclasses.asdict(attempt) for attempt in status.output_attempts],
            replacements=status.replacements,
            sidecar_losses=[dataclasses.asdict(loss) for loss in status.sidecar_losses],
            reconciles=status.reconciles,
            steps_asked_again=status.steps_asked_again,
            trace_id=trace_id_of(traceparent) if traceparent else None,
            temporal_ui_url=self.temporal_ui_url(session_id),
        )

    async def list(
        self,
        client: Client,
        *,
        room: str | None,
        phase: str | None,
        page_size: int,
        page_token: str | None,
        principal: Principal | None = None,
    ) -> SessionList:
        """Sessions newest first; a tenant sees only its own (an admin, or no principal: every tenant's)."""
        clauses = [f"WorkflowType = '{SessionWorkflow.__name__}'"]
        if principal is not None and not principal.admin:
            clauses.append(f"{search_attributes.TENANT.name} = {json.dumps(principal.tenant)}")
        if room:
            clauses.append(f"{search_attributes.ROOM.name} = {json.dumps(room)}")
        if phase:
            clauses.append(f"{search_attributes.PHASE.name} = {json.dumps(phase)}")
        query = " AND ".join(clauses)
        iterator = client.list_workflows(
            query,
            page_size=page_size,
            next_page_token=_decode_page_token(page_token, query) if page_token else None,
        )
        try:
            await iterator.fetch_next_page()
        except RPCError as exc:
            if exc.status == RPCStatusCode.INVALID_ARGUMENT and page_token:
                raise ApiError("bad_page_token", f"page_token refused by Temporal: {exc.message}") from exc
            raise
        sessions = []
        for execution in iterator.current_page or []:
            attributes = execution.typed_search_attributes
            phase_value = attributes.get(search_attributes.PHASE) or ""
            if execution.status in _CLOSED_PHASE and phase_value not in ("completed", "failed", "cancelled"):
                phase_value = _CLOSED_PHASE[execution.status].value
            sessions.append(
                SessionSummary(
                    session_id=execution.id.removeprefix(SESSION_WORKFLOW_ID_PREFIX),
                    room=attributes.get(search_attributes.ROOM) or "",
                    phase=phase_value,
                    output=attributes.get(search_attributes.OUTPUT) or "",
                    sidecar=attributes.get(search_attributes.SIDECAR) or "",
                    workflow_status=execution.status.name if execution.status else "UNKNOWN",
                    start_time=execution.start_time.isoformat(),
                    close_time=execution.close_time.isoformat() if execution.close_time else None,
                )
            )
        token = iterator.next_page_token
        return SessionList(
            sessions=sessions,
            next_page_token=_encode_page_token(token, query) if token else None,
        )

    async def stop(self, client: Client, session_id: str, reason: str) -> SessionStatus:
        """Ask the session to stop (idempotent: a session that has ended answers with its final status)."""
        status, execution_status = await self.status(client, session_id)
        if execution_status != WorkflowExecutionStatus.RUNNING:
            return status
        try:
            return await stop_session(client, session_id, reason)
        except RPCError as exc:
            if _is_not_found(exc):  # it ended between the describe and the update
                return (await self.status(client, session_id))[0]
            raise


# A page token is Temporal's, prefixed with a digest of it and the listing's query: the API can tell a
# token it returned (for this same filter) from garbage, which Temporal itself answers with an internal error.
_PAGE_TOKEN_DIGEST_BYTES = 8


def _page_token_digest(raw: bytes, query: str) -> bytes:
    return hashlib.sha256(query.encode() + b"\0" + raw).digest()[:_PAGE_TOKEN_DIGEST_BYTES]


def _encode_page_token(raw: bytes, query: str) -> str:
    return base64.urlsafe_b64encode(_page_token_digest(raw, query) + raw).decode()


def _decode_page_token(token: str, query: str) -> bytes:
    try:
        envelope = base64.b64decode(token.encode(), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ApiError("bad_page_token", "page_token is not one this API returned") from exc
    digest, raw = envelope[:_PAGE_TOKEN_DIGEST_BYTES], envelope[_PAGE_TOKEN_DIGEST_BYTES:]
    if not raw or not hmac.compare_digest(digest, _page_token_digest(raw, query)):
        raise ApiError(
            "bad_page_token", "page_token is not one this API returned for this listing (same room and phase)"
        )
    return raw


async def _failure_of(handle: Any) -> ErrorInfo | None:
    try:
        await handle.result()
    except WorkflowFailureError as exc:
        cause = exc.cause
        code = getattr(cause, "type", None) or cause.__class__.__name__
        return ErrorInfo(code=str(code), message=str(cause))
    except Exception as exc:  # the result itself is unavailable: say so rather than hide it
        return ErrorInfo(code="unknown", message=str(exc))
    return None
