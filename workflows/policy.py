"""The ops policy contract: every retry, timeout, limit and fallback a session runs under.

Ops edit `infra/policies.yaml`; `api.policy_file.load_policies` validates it into a
`SessionPolicy` and the starter passes that INTO the workflow input, so each run's policy
is recorded in its own history (a policy change never alters a running session and every
replay sees the policy the run really had).

Plain frozen dataclasses with no defaults on purpose: the YAML file is the one home of the
values, and a missing key is an error that names it (see `api.policy_file`). Durations are
seconds (`*_s`), sizes bytes (`*_bytes`), pixels `*_px`.

Sandbox-safe: imports only the standard library and temporalio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from temporalio.common import RetryPolicy


class SidecarLostAction(StrEnum):
    REPLACE = "replace"  # place the session on another sidecar (the validated avatar is reused)
    END = "end"  # end the session with reason `sidecar_lost`


@dataclass(frozen=True)
class RetrySpec:
    """Temporal retry policy for a control-plane activity (non-retryable errors are never retried)."""

    maximum_attempts: int
    initial_interval_s: float
    backoff_coefficient: float
    maximum_interval_s: float

    def to_retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            maximum_attempts=self.maximum_attempts,
            initial_interval=timedelta(seconds=self.initial_interval_s),
            backoff_coefficient=self.backoff_coefficient,
            maximum_interval=timedelta(seconds=self.maximum_interval_s),
        )


@dataclass(frozen=True)
class ControlActivityPolicy:
    """An activity on the shared control-plane queue (any worker can run it, so retries are safe)."""

    start_to_close_s: float  # one attempt
    schedule_to_close_s: float  # all attempts together, waits included
    retry: RetrySpec


@dataclass(frozen=True)
class SidecarActivityPolicy:
    """An activity on one sidecar's own queue: one attempt only (a retry would go to the same host).

    `schedule_to_start_s` bounds how long work may wait for a host that no longer polls: a dead
    sidecar then surfaces as a timeout and the workflow re-places instead of waiting forever.
    """

    start_to_close_s: float
    schedule_to_start_s: float
    heartbeat_timeout_s: float


@dataclass(frozen=True)
class RunActivityPolicy:
    """`run_session`: its start-to-close is derived from the session's remaining maximum duration."""

    schedule_to_start_s: float
    heartbeat_timeout_s: float  # no heartbeat for this long => the sidecar is suspect: reconcile with it
    # After a heartbeat timeout, how long the sidecar has to pick up the reconcile (a run_session that
    # re-attaches to its live session) before it is declared lost. Covers a worker's poll back-off after
    # Temporal itself was unreachable, so it does not depend on how long that outage lasted. The default
    # (infra/policies.yaml's) decodes inputs of sessions started before the field existed.
    reconcile_s: float = 15.0


@dataclass(frozen=True)
class ActivityPolicies:
    fetch_assets: ControlActivityPolicy
    validate_assets: ControlActivityPolicy
    place_session: ControlActivityPolicy  # its retries are the wait for a free slot
    release_slot: ControlActivityPolicy
    prepare_avatar: SidecarActivityPolicy
    warm_up: SidecarActivityPolicy
    open_output: SidecarActivityPolicy  # also bounds switch_output (the live fallback)
    run_session: RunActivityPolicy
    stop_session: SidecarActivityPolicy
    teardown: SidecarActivityPolicy


@dataclass(frozen=True)
class SessionLimits:
    idle_timeout_s: float  # no audio received for this long ends the session (`idle_timeout`)
    max_duration_s: float  # live time, summed over re-placements (`max_duration`)
    stats_interval_s: float  # run_session heartbeat cadence (details = stats)
    stats_report_interval_s: (
        float  # stats pushed into the workflow for `status`; each push is a history event
    )
    stop_grace_s: float  # after asking the sidecar to stop, wait this long before cancelling the run
    # A sidecar keeps a live session running this long without contact with the control plane
    # (Temporal or the workers unreachable), then ends it itself. The default (infra/policies.yaml's) decodes
    # inputs of sessions started before the field existed.
    control_plane_grace_s: float = 600.0


@dataclass(frozen=True)
class OutputPolicy:
    # Output kind names (realtime.outputs.registry), tried in order at open time; kinds the request
    # lacks are skipped. While live, a failed output is replaced by the next one (switch_output).
    fallback_order: list[str]
    # CIDRs an RTMP output URL may point into although private/loopback/link-local (the SSRF guard
    # refuses them otherwise), e.g. an internal RTMP relay. Cloud metadata needs an exact entry.
    rtmp_allow_networks: list[str]
    # While a session is on a fallback, its sidecar retries the first output at this interval and switches
    # back once it opens; 0 keeps it on the fallback. (Defaulted: sessions started before the key existed.)
    switch_back_retry_s: float = 0.0


@dataclass(frozen=True)
class HostFailurePolicy:
    on_sidecar_lost: SidecarLostAction
    max_replacements: int  # re-placements per session before it ends with `sidecar_lost`


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float  # longest silence between two received chunks
    total_timeout_s: float  # whole download, redirects included ("too slow" past it)
    max_redirects: int
    # CIDRs exempt from the SSRF guard (an internal asset store; tests name their loopback server).
    # Cloud metadata addresses stay refused unless an entry names exactly that address.
    allow_networks: list[str]


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int
    max_uncompressed_bytes: int  # sum over entries, declared and actually read
    max_compression_ratio: float  # per entry and overall, for entries above 1 MiB


@dataclass(frozen=True)
class FrameLimits:
    max_frames: int
    min_side_px: int
    max_side_px: int
    require_face: bool  # the first frame must contain a detectable frontal face
    # Frames are scaled down to this many px per side (the sidecar's SourceLimits.max_output_side_px) ...
    max_output_side_px: int = 1024
    # ... and frames x width x height at that size may not exceed this (the avatar's decoded-pixel budget,
    # checked from the images' headers before any frame is decoded).
    max_total_pixels: int = 150_000_000


@dataclass(frozen=True)
class VideoLimits:
    max_duration_s: float
    max_frames: int


@dataclass(frozen=True)
class AssetPolicy:
    fetch: FetchLimits
    zip: ZipLimits
    frames: FrameLimits
    video: VideoLimits


DEFAULT_POOL = "default"  # the pool of a sidecar that names none, and of a policy that asks for none
MAX_POOL_NAME_CHARS = 64
MAX_PLACEMENT_SHARDS = 1024  # placement registries per pool


def is_pool_name(pool: str) -> bool:
    """Pool names become part of workflow ids: 1-64 letters, digits, `-`, `_` or `.`."""
    return 0 < len(pool) <= MAX_POOL_NAME_CHARS and all(char.isalnum() or char in "-_." for char in pool)


@dataclass(frozen=True)
class PlacementPolicy:
    # Sidecar pools (e.g. GPU type and region, `h200.eu-west`) this session may run in, in order
    # of preference: the next pool is asked only when every sidecar of the previous one is full
    # (or the pool has none, as after a region loss).
    pools: list[str] = field(default_factory=lambda: [DEFAULT_POOL])


@dataclass(frozen=True)
class SessionPolicy:
    version: int
    session: SessionLimits
    outputs: OutputPolicy
    host_failure: HostFailurePolicy
    assets: AssetPolicy
    activities: ActivityPolicies
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
