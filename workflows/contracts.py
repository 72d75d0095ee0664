"""Contracts shared by SessionWorkflow, PlacementWorkflow, their activities and the API.

Frozen dataclasses (Temporal's JSON converter round-trips them); names carry units. These
mirror, on purpose, the end reasons of `realtime.host` instead of importing it: workflow code
must stay sandbox-safe and the API must not depend on the sidecar.
`tests/activities/test_contract_parity.py` keeps the mirrored values equal. Outputs are
named by the kinds `realtime.outputs.registry` declares; nothing here knows any kind.

Sandbox-safe: imports only the standard library, temporalio and `workflows.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from workflows.policy import DEFAULT_POOL, FetchLimits, FrameLimits, SessionPolicy, VideoLimits, ZipLimits

CONTROL_TASK_QUEUE = "lipsync-control"
PLACEMENT_WORKFLOW_ID = "lipsync-placement"
SESSION_WORKFLOW_ID_PREFIX = "session-"
SIDECAR_TASK_QUEUE_PREFIX = "sidecar-"


def session_workflow_id(session_id: str) -> str:
    return f"{SESSION_WORKFLOW_ID_PREFIX}{session_id}"


def placement_registry_id(placement_id: str, pool: str, shard: int) -> str:
    """Workflow id of one placement registry: shard `shard` of pool `pool`.

    Shard 0 of the default pool keeps the bare id, so a one-registry deployment and the ops
    health check see the same workflow as before registries were sharded.
    """
    if pool == DEFAULT_POOL and shard == 0:
        return placement_id
    return f"{placement_id}.{pool}.{shard}"


def sidecar_task_queue(sidecar_id: str) -> str:
    """The host-specific queue a sidecar polls: only that process runs activities sent there."""
    return f"{SIDECAR_TASK_QUEUE_PREFIX}{sidecar_id}"


class ActivityName(StrEnum):
    # control plane (shared queue, retried per policy)
    FETCH_ASSETS = "fetch_assets"
    VALIDATE_ASSETS = "validate_assets"
    PLACE_SESSION = "place_session"
    RELEASE_SLOT = "release_slot"
    # sidecar (its own queue, one attempt)
    PREPARE_AVATAR = "prepare_avatar"
    WARM_UP = "warm_up"
    OPEN_OUTPUT = "open_output"
    SWITCH_OUTPUT = "switch_output"  # live fallback: the output failed while live, move to the next one
    RUN_SESSION = "run_session"
    STOP_SESSION = "stop_session"
    TEARDOWN = "teardown"


class Phase(StrEnum):
    PENDING = "pending"
    FETCHING = "fetching"
    VALIDATING = "validating"
    PLACING = "placing"
    PREPARING = "preparing"
    WARMING_UP = "warming_up"
    OPENING_OUTPUT = "opening_output"
    LIVE = "live"
    REPLACING = "replacing"  # the sidecar was lost; moving the session to another one
    STOPPING = "stopping"
    TEARING_DOWN = "tearing_down"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_PHASES = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})


class AvatarKind(StrEnum):
    FRAMES_ZIP = "frames_zip"
    IDLE_VIDEO = "idle_video"


class EndReason(StrEnum):
    """Why a session ended. The first six mirror `realtime.host.SessionEndReason`."""

    STOPPED = "stopped"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    CLIENT_GONE = "client_gone"
    OUTPUT_FAILED = "output_failed"
    RUNTIME_FAILED = "runtime_failed"
    FAILED = "failed"  # see SessionStatus.error for the code
    CANCELLED = "cancelled"  # the workflow itself was cancelled (e.g. from the Temporal UI)


class ErrorCode(StrEnum):
    """Machine-readable reasons. Activities raise ApplicationError(type=<code>); status.error carries it."""

    # request
    INVALID_REQUEST = "invalid_request"
    # fetch
    URL_INVALID = "url_invalid"
    URL_FORBIDDEN_ADDRESS = "url_forbidden_address"  # SSRF guard: private/loopback/link-local/metadata
    REDIRECT_FORBIDDEN_ADDRESS = "redirect_forbidden_address"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    ASSET_UNREACHABLE = "asset_unreachable"  # retryable: connection refused/reset, DNS failure
    ASSET_HTTP_ERROR = "asset_http_error"  # 4xx non-retryable, 5xx retryable
    ASSET_ENCODING_UNSUPPORTED = "asset_encoding_unsupported"
    ASSET_TOO_LARGE = "asset_too_large"
    ASSET_TOO_SLOW = "asset_too_slow"
    ASSET_EMPTY = "asset_empty"
    ASSET_CHANGED = "asset_changed"  # a re-download on the sidecar did not match the validated digest
    # zip
    NOT_A_ZIP = "not_a_zip"
    ZIP_TOO_MANY_ENTRIES = "zip_too_many_entries"
    ZIP_TOO_LARGE = "zip_too_large"  # uncompressed total above the limit
    ZIP_BOMB_RATIO = "zip_bomb_ratio"
    ZIP_CORRUPT = "zip_corrupt"  # an entry fails to inflate or its CRC does not match
    ZIP_PATH_TRAVERSAL = "zip_path_traversal"
    ZIP_SYMLINK = "zip_symlink"
    ZIP_ENCRYPTED = "zip_encrypted"
    ZIP_DUPLICATE_ENTRY = "zip_duplicate_entry"
    ZIP_NON_IMAGE_ENTRY = "zip_non_image_entry"
    AVATAR_MANIFEST_INVALID = "avatar_manifest_invalid"  # the optional avatar.json
    # frames
    NO_FRAMES = "no_frames"
    TOO_MANY_FRAMES = "too_many_frames"
    IMAGE_UNDECODABLE = "image_undecodable"
    MIXED_FRAME_SIZES = "mixed_frame_sizes"
    FRAME_TOO_SMALL = "frame_too_small"
    FRAME_TOO_LARGE = "frame_too_large"
    AVATAR_TOO_MANY_PIXELS = "avatar_too_many_pixels"  # frames x width x height over the decoded-pixel budget
    NO_FACE = "no_face"
    # video
    VIDEO_UNDECODABLE = "video_undecodable"
    VIDEO_NO_VIDEO_STREAM = "video_no_video_stream"
    VIDEO_TOO_LONG = "video_too_long"
    # placement / hosts / outputs
    NO_CAPACITY = "no_capacity"
    ACQUIRE_EXPIRED = "acquire_expired"  # an acquire reached its registry after its caller gave up
    SIDECAR_LOST = "sidecar_lost"
    SIDECAR_RESTARTED = "sidecar_restarted"  # the queue is served by a newer process than the placement's
    SIDECAR_SHUTTING_DOWN = (
        "sidecar_shutting_down"  # the sidecar is stopping (SIGTERM): its steps were cut short
    )
    # the sidecar is alive but no longer has the session (it ended it after the control-plane grace period)
    SIDECAR_SESSION_GONE = "sidecar_session_gone"
    SIDECAR_ERROR = "sidecar_error"  # the host raised something it did not classify
    OUTPUT_OPEN_FAILED = "output_open_failed"
    # The avatar's LiveKit identity is taken by another participant of the room (joining would kick them out).
    LIVEKIT_IDENTITY_IN_USE = "livekit_identity_in_use"
    OUTPUT_UNAVAILABLE = "output_unavailable"  # every output in the fallback order failed
    OUTPUT_FAILED = "output_failed"  # outputs failed while live
    RUNTIME_FAILED = "runtime_failed"  # the sidecar's clock or render task for the session died (a defect)
    ACTIVITY_TIMEOUT = "activity_timeout"


# --- the request and the workflow input -------------------------------------------------


@dataclass(frozen=True)
class AvatarSource:
    url: str  # http(s); credentials in the URL are refused (they would be kept in history)
    kind: AvatarKind


@dataclass(frozen=True)
class OutputSpec:
    """One output a session may publish to: a kind registered in `realtime.outputs.registry` and its
    parameters, a JSON object of scalars that the kind parses at the edges (API, sidecar activity).
    Never a secret here: the spec is kept in workflow history."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputRequest:
    # The outputs the caller offers. The policy's fallback_order decides the order they are tried in.
    specs: list[OutputSpec] = field(default_factory=list)
    record: bool = False  # also record an MP4 on the sidecar
    # Inputs recorded before specs existed carried each output in a field named after its kind; they
    # are read (by `offered`) so such histories replay unchanged. New requests leave them unset.
    livekit: dict[str, Any] | None = None
    rtmp: dict[str, Any] | None = None

    def offered(self) -> list[OutputSpec]:
        legacy = (("livekit", self.livekit), ("rtmp", self.rtmp))
        return [*self.specs, *(OutputSpec(kind, params) for kind, params in legacy if params is not None)]


@dataclass(frozen=True)
class SessionRequest:
    session_id: str
    room: str  # LiveKit room name; also the label ops search by
    avatar: AvatarSource
    output: OutputRequest


@dataclass(frozen=True)
class SessionInput:
    request: SessionRequest
    policy: SessionPolicy


@dataclass(frozen=True)
class StopRequest:
    reason: str = ""  # free text from the caller ("user hung up"); the end reason is `stopped`


# --- activity inputs and results ---------------------------------------------------------


@dataclass(frozen=True)
class FetchAssetsInput:
    session_id: str
    source: AvatarSource
    limits: FetchLimits


@dataclass(frozen=True)
class FetchedAsset:
    source_url: str
    final_url: str  # after redirects
    kind: AvatarKind
    digest_sha256: str
    size_bytes: int
    stored_path: str  # content-addressed file on the control-plane worker's disk


@dataclass(frozen=True)
class ValidateAssetsInput:
    session_id: str
    asset: FetchedAsset
    zip: ZipLimits
    frames: FrameLimits
    video: VideoLimits


@dataclass(frozen=True)
class FaceBox:
    x_px: int
    y_px: int
    width_px: int
    height_px: int


@dataclass(frozen=True)
class ValidatedAvatar:
    asset: FetchedAsset
    frame_count: int
    width_px: int
    height_px: int
    face: FaceBox | None  # on the first frame; None when the policy does not require one
    fps: float | None = None  # idle videos only


@dataclass(frozen=True)
class PlaceSessionInput:
    session_id: str
    # incarnations (sidecar process lives) this session must not go back to; they are also
    # marked suspect so no other session is placed there until they heartbeat again
    exclude_incarnations: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=lambda: [DEFAULT_POOL])  # in order of preference
    avatar_key: str = ""  # the validated avatar's digest: picks the home shard and a sidecar that has it
    # The registry that held this session's previous slot (a re-placement): released there first.
    previous_registry_id: str = ""


class PlacementReason(StrEnum):
    AVATAR_CACHED = "avatar_cached"  # a sidecar with room had prepared this avatar already
    MOST_FREE_SLOTS = "most_free_slots"  # otherwise the sidecar with the most free slots


@dataclass(frozen=True)
class Placement:
    sidecar_id: str
    incarnation: str  # one sidecar process's life; a restart under the same id is a new one
    task_queue: str
    registry_id: str = ""  # the registry workflow that holds the slot ("" from a pre-sharding registry)
    pool: str = ""
    reason: str = ""  # a PlacementReason value


@dataclass(frozen=True)
class ReleaseSlotInput:
    session_id: str
    # The registry that holds the slot; "" when not known (a placement cancelled or retried in
    # flight): then every registry of `pools` is asked, so no slot is left behind.
    registry_id: str = ""
    pools: list[str] = field(default_factory=lambda: [DEFAULT_POOL])


@dataclass(frozen=True)
class SidecarCall:
    """Every sidecar activity input names the incarnation it was placed on.

    The queue belongs to a sidecar id; a restarted process under that id must refuse work
    meant for its dead predecessor (e.g. a teardown left queued) instead of running it
    against its own new sessions.
    """

    session_id: str
    incarnation: str


@dataclass(frozen=True)
class PrepareAvatarInput:
    call: SidecarCall
    avatar: ValidatedAvatar
    fetch: FetchLimits  # used only when the sidecar must download the asset itself


@dataclass(frozen=True)
class AvatarReady:
    digest_sha256: str
    frame_count: int
    width_px: int
    height_px: int
    cache_hit: bool


@dataclass(frozen=True)
class WarmUpInput:
    call: SidecarCall


@dataclass(frozen=True)
class EngineReady:
    engine: str
    device: str
    warm_up_ms: float
    already_warm: bool


@dataclass(frozen=True)
class OpenOutputInput:
    call: SidecarCall
    spec: OutputSpec
    room: str
    record: bool
    # The policy's SSRF exemptions for caller-supplied output URLs (outputs.rtmp_allow_networks).
    allow_networks: list[str] = field(default_factory=list)
    # The offered outputs after `spec` in the policy's fallback order: the sidecar admits them now and fails
    # over to them itself when the live output dies (no round trip through the workflow).
    fallbacks: list[OutputSpec] = field(default_factory=list)
    # While on a fallback, retry `spec` at this interval and switch back once it opens (0: stay on the
    # fallback).
    switch_back_retry_s: float = 0.0


@dataclass(frozen=True)
class SwitchOutputInput:
    """Move a live session to `spec` (its recording, if any, goes on untouched)."""

    call: SidecarCall
    spec: OutputSpec
    room: str
    allow_networks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutputOpened:
    kind: str
    detail: str  # what status shows: a room name or a URL without credentials


@dataclass(frozen=True)
class RunSessionInput:
    call: SidecarCall
    idle_timeout_s: float
    max_duration_s: float  # what is left of the session's maximum
    stats_interval_s: float
    stats_report_interval_s: float
    # The sidecar keeps the session live this long without contact with the workflow (Temporal or the
    # workers unreachable), then ends it itself; a run that resumes contact within it carries on.
    control_plane_grace_s: float = 300.0
    # A reconcile after the previous run went silent (heartbeat timeout): attach to the session the
    # sidecar still serves; fails `sidecar_session_gone` when it has none.
    reattach: bool = False


@dataclass(frozen=True)
class RunSessionResult:
    end_reason: EndReason
    stats: dict[str, Any]  # realtime.host.SessionStats as a dict
    detail: str = ""  # runtime_failed: the sidecar's account of what died


@dataclass(frozen=True)
class StopSessionInput:
    call: SidecarCall
    reason: EndReason


@dataclass(frozen=True)
class TeardownInput:
    call: SidecarCall


@dataclass(frozen=True)
class StatsReport:
    """Pushed by run_session into the workflow (signal `report_stats`) so `status` can show it."""

    incarnation: str  # reports from a sidecar the session has left are ignored
    stats: dict[str, Any]


# --- status and result -------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class OutputAttempt:
    kind: str
    sidecar_id: str
    ok: bool
    error: ErrorInfo | None = None
    live_switch: bool = False  # a switch while live (the previous output failed), not an open


@dataclass(frozen=True)
class SidecarLoss:
    sidecar_id: str
    incarnation: str
    phase: Phase  # what the session was doing when the host went silent
    # HEARTBEAT (went silent and did not answer the reconcile either) | SCHEDULE_TO_START | START_TO_CLOSE |
    # sidecar_restarted | sidecar_shutting_down | sidecar_session_gone
    timeout_type: str
    detected_at: str  # ISO 8601, workflow time
    detail: str = (
        ""  # the sidecar's own words when it answered (restarted, shutting down, session gone), else why
    )


@dataclass
class SessionStatus:
    session_id: str
    room: str
    phase: Phase = Phase.PENDING
    output: str = ""  # the opened output's kind
    output_detail: str = ""
    sidecar: str = ""
    pool: str = ""  # the placement's pool and why that sidecar was chosen (a PlacementReason value)
    placement_reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # latest realtime.host.SessionStats
    stats_reported_at: str = ""  # ISO 8601, workflow time of the latest report
    error: ErrorInfo | None = None
    end_reason: EndReason | None = None
    stop_note: str = ""
    avatar: AvatarReady | None = None
    output_attempts: list[OutputAttempt] = field(default_factory=list)
    sidecar_losses: list[SidecarLoss] = field(default_factory=list)
    replacements: int = 0
    reconciles: int = (
        0  # run_session went silent and the workflow re-attached to the sidecar (outage survived)
    )
    # A bring-up step the sidecar did not pick up within its schedule_to_start_s, asked once more with the
    # poll back-off allowance (`run_session.reconcile_s`) before the host counts as lost: after a Temporal
    # outage a live sidecar's pollers may wait that long before they poll again.
    steps_asked_again: int = 0
    live_since: str = ""  # ISO 8601, workflow time of the first `live`
    ended_at: str = ""  # ISO 8601, workflow time the session stopped serving (teardown began)
    teardown_errors: list[ErrorInfo] = field(default_factory=list)


@dataclass(frozen=True)
class SessionResult:
    session_id: str
    end_reason: EndReason
    output: str
    sidecar: str
    replacements: int
    stats: dict[str, Any]


# --- placement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarHeartbeat:
    sidecar_id: str
    incarnation: str
    task_queue: str
    slots_total: int
    slots_free: int  # as the host sees it (informational; placement counts its own assignments)
    lease_s: float  # the registration lapses this long after the last heartbeat
    pool: str = DEFAULT_POOL  # e.g. GPU type and region, `h200.eu-west`
    # Sessions the host holds: a registration that lapsed while Temporal was unreachable is re-created
    # with them, so placement never hands their slots to another session.
    sessions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SidecarDeparture:
    sidecar_id: str
    incarnation: str


@dataclass
class SidecarRecord:
    sidecar_id: str
    incarnation: str
    task_queue: str
    slots_total: int
    reported_slots_free: int
    lease_expires_at_s: float  # workflow time, seconds since the epoch
    sessions: list[str] = field(default_factory=list)
    suspect: bool = False  # a session lost this host; no new placements until it heartbeats again
    pool: str = DEFAULT_POOL
    # avatar keys placed here by this incarnation, most recent last (bounded): prepared in its cache
    avatars: list[str] = field(default_factory=list)
    lease_s: float = 0.0  # the lease its heartbeats ask for (0 in a record carried from a run that kept none)
    # Its lease was renewed once because the registry itself was down when it was due; cleared by its next
    # heartbeat (a sidecar that never comes back is reclaimed one lease later).
    outage_renewed: bool = False


@dataclass(frozen=True)
class PlacementState:
    """PlacementWorkflow input; also what it carries across continue-as-new."""

    sidecars: list[SidecarRecord] = field(default_factory=list)
    # A busy registry's continue-as-new often loses the race with arriving heartbeats: the server refuses
    # the task, the worker drops the run from its cache and replays the whole history before the registry
    # answers again. That replay is what requests wait for, so the history it replays is kept short.
    continue_as_new_after_events: int = 500
    reclaimed_sessions: int = 0  # slots freed by lease expiry so far (ops counter)
    # Records whose lease lapsed, kept for a while in case the same process registers again
    # (`lease_expires_at_s` is when each lapsed): see PlacementWorkflow._reclaim_expired.
    lapsed: list[SidecarRecord] = field(default_factory=list)


@dataclass(frozen=True)
class AcquireSlot:
    session_id: str
    exclude_incarnations: list[str] = field(default_factory=list)
    avatar_key: str = ""
    # Seconds since the epoch after which the registry refuses this acquire (0: never). The
    # caller's attempt has given up by then, and a late acquire landing after the caller's
    # retry cleaned up would hold a slot nobody releases.
    not_after_s: float = 0.0


@dataclass(frozen=True)
class ReleaseSlot:
    session_id: str
    # Sidecar lives the session lost: marked suspect here too, like AcquireSlot.exclude_incarnations
    # (the registry a lost sidecar belongs to may not be the one the re-placement lands on).
    suspect_incarnations: list[str] = field(default_factory=list)


# Requests one batch may carry (`PlacementWorkflow.acquire_batch` / `release_batch`): bounds the update's
# payload and the registry's work per activation.
MAX_PLACEMENT_BATCH = 128


@dataclass(frozen=True)
class AcquireBatch:
    """Acquires for one registry sent as one update: each is decided on its own, in order."""

    requests: list[AcquireSlot]


@dataclass(frozen=True)
class AcquireOutcome:
    """One request's answer in an AcquireBatch: a placement, or the refusal `acquire` would have raised."""

    placement: Placement | None = None
    error_type: str = ""  # an ErrorCode value when refused
    error_message: str = ""
    non_retryable: bool = False


@dataclass(frozen=True)
class ReleaseBatch:
    """Releases for one registry sent as one signal."""

    requests: list[ReleaseSlot]


@dataclass(frozen=True)
class PlacementSnapshot:
    sidecars: list[SidecarRecord]
    reclaimed_sessions: int
    now_s: float
    lapsed: list[SidecarRecord] = field(default_factory=list)  # leases lapsed, kept for a re-registration
