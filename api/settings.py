"""API settings, from the environment (12-factor): one place that names every knob."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from realtime.errors import LipsyncError
from workflows.policy import MAX_PLACEMENT_SHARDS, is_pool_name


class SettingsError(LipsyncError, ValueError):
    """An API setting (environment variable) is missing or invalid; the message names it."""

    code = "settings_invalid"


def _placement_shards(value: str | None) -> int:
    if not value:
        return 1
    try:
        shards = int(value)
    except ValueError:
        shards = 0
    if not 1 <= shards <= MAX_PLACEMENT_SHARDS:
        raise SettingsError(
            f"LIPSYNC_PLACEMENT_SHARDS must be an integer from 1 to {MAX_PLACEMENT_SHARDS}, got {value!r}"
        )
    return shards


def _placement_pools(value: str | None) -> tuple[str, ...]:
    pools = _split(value) or ("default",)
    bad = [pool for pool in pools if not is_pool_name(pool)]
    if bad:
        raise SettingsError(
            f"LIPSYNC_POOLS names {bad}, which are not pool names (letters, digits, '-', '_' or '.'; "
            "comma-separated)"
        )
    return pools


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


DEFAULT_TENANT = "default"  # the tenant of a key given without a tenant name
ADMIN_TENANT = "admin"  # the principal of an admin key (not a tenant: it owns no sessions of its own)
TENANT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def parse_api_keys(entries: tuple[str, ...], source: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """`tenant:key` or a bare `key` (the default tenant) -> (default-tenant keys, {key: tenant})."""
    bare: list[str] = []
    named: dict[str, str] = {}
    for entry in entries:
        tenant, sep, key = entry.partition(":")
        if not sep:
            bare.append(entry)
            continue
        tenant, key = tenant.strip(), key.strip()
        if not TENANT_NAME_PATTERN.fullmatch(tenant) or tenant in (DEFAULT_TENANT, ADMIN_TENANT) or not key:
            raise SettingsError(
                f"{source}: entry {tenant!r}:<key> is not <tenant>:<key> with a tenant name of "
                "lower-case letters, "
                f"digits and '-' (up to 32, not {DEFAULT_TENANT!r} or {ADMIN_TENANT!r})"
            )
        named[key] = tenant
    return tuple(bare), named


def _key_file_entries(path: str) -> tuple[str, ...]:
    """One `tenant:key` (or bare key) per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SettingsError(f"cannot read LIPSYNC_API_KEYS_FILE {path}: {exc.strerror}") from exc
    return tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))


def parse_sidecar_urls(value: str | None) -> dict[str, str]:
    """`id=http://host:port,id2=...` -> {id: url}; a bad entry is an error naming it."""
    urls: dict[str, str] = {}
    for entry in _split(value):
        sidecar_id, sep, url = entry.partition("=")
        if not sep or not sidecar_id.strip() or not url.strip().startswith(("http://", "https://")):
            raise SettingsError(
                f"LIPSYNC_SIDECAR_URLS entry {entry!r} is not <sidecar id>=http(s)://host:port",
            )
        urls[sidecar_id.strip()] = url.strip().rstrip("/")
    return urls


SIDECAR_SECRET_ENV = "LIPSYNC_SIDECAR_SECRET"
SIDECAR_SECRET_FILE_ENV = "LIPSYNC_SIDECAR_SECRET_FILE"
MIN_SIDECAR_SECRET_CHARS = 32  # the sidecars refuse shorter ones (realtime.sidecar.auth)


def sidecar_secret_from_env() -> str:
    """The secret shared with the sidecars: $LIPSYNC_SIDECAR_SECRET_FILE's content, else
    $LIPSYNC_SIDECAR_SECRET."""
    path = os.environ.get(SIDECAR_SECRET_FILE_ENV)
    if path:
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"cannot read {SIDECAR_SECRET_FILE_ENV} {path}: {exc.strerror}") from exc
    else:
        secret = os.environ.get(SIDECAR_SECRET_ENV, "").strip()
    if secret and len(secret) < MIN_SIDECAR_SECRET_CHARS:
        raise SettingsError(f"the sidecar secret needs at least {MIN_SIDECAR_SECRET_CHARS} characters")
    return secret


@dataclass(frozen=True)
class ApiSettings:
    api_keys: tuple[str, ...]  # keys of the default tenant
    tenant_keys: Mapping[str, str] = field(default_factory=dict, repr=False)  # key -> tenant name
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # keys that see every tenant
    temporal_target: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    livekit_url: str = "ws://127.0.0.1:7880"  # what clients (viewers, agents) connect to
    livekit_api_key: str = "devkey"
    livekit_api_secret: str = field(default="", repr=False)
    viewer_token_ttl_s: int = 3600
    viewer_token_max_ttl_s: int = 4 * 3600  # a longer requested lifetime is refused (400)
    public_base_url: str = "http://127.0.0.1:8000"
    # What sidecars connect to when they publish (inside a cluster this is often not the public URL).
    livekit_publish_url: str = ""
    # sidecar id -> its HTTP base URL, for the audio WS relay, /debug/audio and per-session metrics.
    sidecar_urls: Mapping[str, str] = field(default_factory=dict)
    control_task_queue: str = "lipsync-control"
    placement_workflow_id: str = "lipsync-placement"
    # Registries per pool and the pools whose registries /readyz reads (the workers' --placement-shards, the
    # sidecars' --pool).
    placement_shards: int = 1
    placement_pools: tuple[str, ...] = ("default",)
    temporal_ui_url: str = "http://127.0.0.1:8233"
    model_dir: Path = Path("models")
    policies_path: Path | None = None  # None: $LIPSYNC_POLICIES or infra/policies.yaml
    live_wait_s: float = 120.0  # how long the audio relay waits for a session to go live
    # The secret shared with the sidecars: the relay and health reads send it as their service credential, and
    # the audio tokens in `audio_ws_url` are signed with it. Empty: the API reaches no sidecar.
    sidecar_secret: str = field(default="", repr=False)
    audio_token_ttl_s: int = 900  # how long an `audio_ws_url` opens its session's audio (reconnects included)

    @property
    def tenants(self) -> frozenset[str]:
        """The named tenants (their rooms are namespaced `<tenant>.`)."""
        return frozenset(self.tenant_keys.values())

    @property
    def sidecar_livekit_url(self) -> str:
        return self.livekit_publish_url or self.livekit_url

    @classmethod
    def from_env(cls) -> ApiSettings:
        entries = _split(os.environ.get("LIPSYNC_API_KEYS"))
        if os.environ.get("LIPSYNC_API_KEYS_FILE"):
            entries += _key_file_entries(os.environ["LIPSYNC_API_KEYS_FILE"])
        keys, tenant_keys = parse_api_keys(entries, "LIPSYNC_API_KEYS")
        admin_keys = _split(os.environ.get("LIPSYNC_ADMIN_KEYS"))
        if not (keys or tenant_keys or admin_keys):
            raise SettingsError(
                "LIPSYNC_API_KEYS is empty: set at least one API key (comma-separated, "
                "`tenant:key` or a bare key "
                "of the default tenant; or LIPSYNC_API_KEYS_FILE, one per line)"
            )
        secret = os.environ.get("LIVEKIT_API_SECRET", "")
        if not secret:
            raise SettingsError("LIVEKIT_API_SECRET is not set: the API mints LiveKit tokens with it")
        sidecar_urls = parse_sidecar_urls(os.environ.get("LIPSYNC_SIDECAR_URLS"))
        sidecar_secret = sidecar_secret_from_env()
        if sidecar_urls and not sidecar_secret:
            raise SettingsError(
                f"LIPSYNC_SIDECAR_URLS is set but {SIDECAR_SECRET_ENV} (or "
                f"{SIDECAR_SECRET_FILE_ENV}) is not: "
                "the sidecars refuse the API without the secret they share with it"
            )
        return cls(
            api_keys=keys,
            tenant_keys=tenant_keys,
            admin_keys=admin_keys,
            temporal_target=os.environ.get("TEMPORAL_ADDRESS", cls.temporal_target),
            temporal_namespace=os.environ.get("TEMPORAL_NAMESPACE", cls.temporal_namespace),
            livekit_url=os.environ.get("LIVEKIT_URL", cls.livekit_url),
            livekit_api_key=os.environ.get("LIVEKIT_API_KEY", cls.livekit_api_key),
            livekit_api_secret=secret,
            viewer_token_ttl_s=int(os.environ.get("LIPSYNC_VIEWER_TOKEN_TTL_S", cls.viewer_token_ttl_s)),
            viewer_token_max_ttl_s=int(
                os.environ.get("LIPSYNC_VIEWER_TOKEN_MAX_TTL_S", cls.viewer_token_max_ttl_s),
            ),
            public_base_url=os.environ.get("LIPSYNC_PUBLIC_BASE_URL", cls.public_base_url).rstrip("/"),
            livekit_publish_url=os.environ.get("LIPSYNC_LIVEKIT_PUBLISH_URL", ""),
            sidecar_urls=sidecar_urls,
            sidecar_secret=sidecar_secret,
            audio_token_ttl_s=int(os.environ.get("LIPSYNC_AUDIO_TOKEN_TTL_S", cls.audio_token_ttl_s)),
            control_task_queue=os.environ.get("LIPSYNC_CONTROL_TASK_QUEUE", cls.control_task_queue),
            placement_workflow_id=os.environ.get("LIPSYNC_PLACEMENT_WORKFLOW_ID", cls.placement_workflow_id),
            placement_shards=_placement_shards(os.environ.get("LIPSYNC_PLACEMENT_SHARDS")),
            placement_pools=_placement_pools(os.environ.get("LIPSYNC_POOLS")),
            temporal_ui_url=os.environ.get("LIPSYNC_TEMPORAL_UI_URL", cls.temporal_ui_url).rstrip("/"),
            model_dir=Path(os.environ.get("LIPSYNC_MODEL_DIR", "models")),
            policies_path=Path(os.environ["LIPSYNC_POLICIES"])
            if os.environ.get("LIPSYNC_POLICIES")
            else None,
        )
