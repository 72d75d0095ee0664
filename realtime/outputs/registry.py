"""The output registry: each output kind is declared here once, and every layer looks it up by name.

A session request carries an ordered list of output specs, each a kind name plus a JSON object
of parameters. The workflow never interprets either; the layers that need kind-specific
behaviour ask the registry:

- the API turns its HTTP body into specs (`OutputKind.to_params`),
- the sidecar activity parses a spec (`OutputKind.parse`) and admits it (`OutputKind.admit`:
  the caller's URL passes the SSRF guard, credentials are minted) into the sidecar's target,
- the sidecar host builds the kind's `Publisher` from that target (`OutputKind.open`).

Adding an output kind is one `register(OutputKind(...))` call with those three functions; the
policy's `outputs.fallback_order` names kinds by the same registered name.

Publisher factories import their module when called: the API and the policy loader use the
registry without loading WebRTC or the codecs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from realtime.outputs.base import Publisher
from realtime.outputs.errors import OutputError
from realtime.outputs.rtmp_url import redact_rtmp_url, validate_rtmp_url

P = TypeVar("P")  # a kind's request parameters (JSON scalars: they are kept in workflow history)
T = TypeVar("T")  # a kind's admitted target, what its publisher is built from (may hold secrets)


class OutputKindUnknown(OutputError):
    code = "output_kind_unknown"


class OutputParamsInvalid(OutputError):
    code = "output_params_invalid"


@dataclass(frozen=True)
class UrlGuard:
    """How a caller-supplied output URL is checked before a sidecar connects to it (activities.output_guard).

    `default_ports` maps each accepted scheme to its port when the URL names none. `pinned_schemes`
    are connected to the checked address instead of the name (no second resolution between check and
    connect); a TLS scheme keeps its name because the handshake needs it.
    """

    what: str  # how errors name the URL, e.g. "the RTMP output URL"
    validate: Callable[[str], str]  # syntactic check; raises an OutputError
    default_ports: Mapping[str, int]
    pinned_schemes: frozenset[str]


class UrlChecker(Protocol):
    """The sidecar worker's SSRF guard: the URL to connect to, or an error naming the refused address."""

    async def __call__(self, url: str, guard: UrlGuard) -> str: ...


@dataclass(frozen=True)
class AdmissionContext:
    """What the sidecar activity knows when it admits a spec: the session, its room, its guard and secrets."""

    session_id: str
    room: str  # the session's room label (LiveKit publishes into it)
    check_url: UrlChecker
    credentials: Mapping[str, str]  # by environment variable name, e.g. LIVEKIT_API_KEY
    token_ttl_s: float  # lifetime of credentials minted for one session


@dataclass(frozen=True)
class PublisherContext:
    """What the sidecar host gives a kind's publisher factory."""

    session_id: str
    width_px: int  # even: H.264 and WebRTC encoders need even sizes
    height_px: int
    video_delay_ms: float
    max_video_bitrate_bps: int
    renew_audio_after_stall_ms: float
    idle_audio_reserve_ms: int = 0  # see LiveKitPublisherOptions


@dataclass(frozen=True)
class OpenedPublisher:
    publisher: Publisher
    detail: str  # what status shows: a room name or a URL without credentials


@dataclass(frozen=True)
class OutputKind(Generic[P, T]):
    name: str  # the spec's `kind` and the policy's fallback_order entry
    params_type: type[P]  # a dataclass of JSON scalars
    admit: Callable[[P, AdmissionContext], Awaitable[T]]
    open: Callable[[T, PublisherContext], OpenedPublisher]
    target_type: type[T]

    def parse(self, params: Mapping[str, Any]) -> P:
        """The typed parameters of a spec; OutputParamsInvalid names the first bad field."""
        return _parse_dataclass(self.params_type, params, f"output {self.name!r}")

    def to_params(self, params: P) -> dict[str, Any]:
        """The JSON object a spec carries for `params` (the inverse of `parse`)."""
        if not isinstance(params, self.params_type):
            raise OutputParamsInvalid(
                f"output {self.name!r} takes {self.params_type.__name__}, not {params!r}"
            )
        return dataclasses.asdict(params)  # type: ignore[call-overload]


class OutputRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, OutputKind[Any, Any]] = {}

    def register(self, kind: OutputKind[Any, Any]) -> None:
        if kind.name in self._kinds:
            raise ValueError(f"output kind {kind.name!r} is already registered")
        if not dataclasses.is_dataclass(kind.params_type):
            raise TypeError(f"output kind {kind.name!r}: params_type must be a dataclass")
        self._kinds[kind.name] = kind

    def unregister(self, name: str) -> None:
        self._kinds.pop(name, None)

    def get(self, name: str) -> OutputKind[Any, Any]:
        try:
            return self._kinds[name]
        except KeyError:
            raise OutputKindUnknown(
                f"no output kind {name!r} is registered (known: {self.names()})"
            ) from None

    def names(self) -> list[str]:
        return list(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


OUTPUTS = OutputRegistry()


# --- LiveKit ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveKitParams:
    """Where to publish in LiveKit. No token: the sidecar mints it (secrets stay out of history)."""

    url: str
    identity: str
    publish_audio: bool = True
    publish_on_behalf: str | None = None  # the agent's identity when an agent drives the avatar


@dataclass(frozen=True)
class LiveKitTarget:
    url: str
    room: str
    identity: str
    token: str  # minted by the sidecar worker with livekit-api
    publish_audio: bool = True
    publish_on_behalf: str | None = None  # the agent's identity when driven by an agent


async def _admit_livekit(params: LiveKitParams, context: AdmissionContext) -> LiveKitTarget:
    from realtime.outputs import livekit_admission  # livekit-api: not needed by the API process  # noqa: PLC0415 (a kind's codecs/WebRTC load only when it opens)

    token = livekit_admission.mint_token(params, context)
    await livekit_admission.refuse_identity_collision(params, context)
    return LiveKitTarget(
        url=params.url,
        room=context.room,
        identity=params.identity,
        token=token,
        publish_audio=params.publish_audio,
        publish_on_behalf=params.publish_on_behalf,
    )


def _open_livekit(target: LiveKitTarget, context: PublisherContext) -> OpenedPublisher:
    from realtime.outputs.livekit import LiveKitPublisher, LiveKitPublisherOptions  # WebRTC: sidecar only  # noqa: PLC0415 (a kind's codecs/WebRTC load only when it opens)

    options = LiveKitPublisherOptions(
        width_px=context.width_px,
        height_px=context.height_px,
        video_delay_ms=context.video_delay_ms,
        max_video_bitrate_bps=context.max_video_bitrate_bps,
        renew_audio_after_stall_ms=context.renew_audio_after_stall_ms,
        idle_audio_reserve_ms=context.idle_audio_reserve_ms,
        # The reserve plus two ticks must fit in the source's queue (LiveKitPublisherOptions).
        audio_queue_ms=max(200, context.idle_audio_reserve_ms + 100),
    )
    return OpenedPublisher(LiveKitPublisher(target, options), target.room)


LIVEKIT = OutputKind(
    name="livekit",
    params_type=LiveKitParams,
    admit=_admit_livekit,
    open=_open_livekit,
    target_type=LiveKitTarget,
)


# --- RTMP(S) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RtmpTarget:
    """rtmp(s)://host[:port]/app/stream-key; as a target, rtmp:// is pinned to the checked address."""

    url: str


RTMP_URL_GUARD = UrlGuard(
    what="the RTMP output URL",
    validate=validate_rtmp_url,
    default_ports={"rtmp": 1935, "rtmps": 443},
    pinned_schemes=frozenset({"rtmp"}),
)


async def _admit_rtmp(params: RtmpTarget, context: AdmissionContext) -> RtmpTarget:
    return RtmpTarget(url=await context.check_url(params.url, RTMP_URL_GUARD))


def _open_rtmp(target: RtmpTarget, context: PublisherContext) -> OpenedPublisher:
    from realtime.outputs.rtmp import RtmpOutput  # PyAV: sidecar only  # noqa: PLC0415 (a kind's codecs/WebRTC load only when it opens)

    publisher = RtmpOutput(target.url, context.width_px, context.height_px)
    return OpenedPublisher(publisher, redact_rtmp_url(publisher.url))


RTMP = OutputKind(
    name="rtmp",
    params_type=RtmpTarget,
    admit=_admit_rtmp,
    open=_open_rtmp,
    target_type=RtmpTarget,
)

OUTPUTS.register(LIVEKIT)
OUTPUTS.register(RTMP)

__all__ = [
    "LIVEKIT",
    "OUTPUTS",
    "RTMP",
    "RTMP_URL_GUARD",
    "AdmissionContext",
    "LiveKitParams",
    "LiveKitTarget",
    "OpenedPublisher",
    "OutputKind",
    "OutputKindUnknown",
    "OutputParamsInvalid",
    "OutputRegistry",
    "PublisherContext",
    "RtmpTarget",
    "UrlGuard",
]


# --- parsing a spec's JSON parameters into the kind's dataclass ------------------------------------


def _parse_dataclass(cls: type[P], raw: Mapping[str, Any], where: str) -> P:
    if not isinstance(raw, Mapping):
        raise OutputParamsInvalid(f"{where}: parameters must be an object, not {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise OutputParamsInvalid(f"{where}: unknown parameter(s) {unknown} (it takes {sorted(fields)})")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise OutputParamsInvalid(f"{where}: parameter {name!r} is required")
            continue
        value = raw[name]
        if not _matches(hints[name], value):
            raise OutputParamsInvalid(f"{where}: parameter {name!r} must be {hints[name]}, not {value!r}")
        values[name] = value
    return cls(**values)


def _matches(hint: Any, value: Any) -> bool:
    """A JSON scalar against a field's annotation: str, bool, int, float, None and unions of them."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return False
