"""Load and validate the ops policy file (`infra/policies.yaml`) into `workflows.policy.SessionPolicy`.

The schema is the dataclass tree in `workflows/policy.py` (one home); this module walks it:
unknown keys, missing keys, wrong types, out-of-range values and inconsistent combinations
are all refused with a `PolicyError` naming the dotted key (`activities.run_session.heartbeat_timeout_s`).
The file is found at `$LIPSYNC_POLICIES` or `infra/policies.yaml`.

It lives in `api` because the API is the starter that passes the policy into each workflow's input (the
CLI and the demo load it through here too): the API reads it without importing `infra`. Output kinds are
checked against the output registry, the one place they are declared.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from realtime.errors import LipsyncError
from realtime.outputs.registry import OUTPUTS
from workflows.policy import MAX_POOL_NAME_CHARS, RetrySpec, SessionPolicy, is_pool_name

POLICIES_ENV = "LIPSYNC_POLICIES"
DEFAULT_POLICIES_PATH = (
    Path(__file__).resolve().parent.parent / "infra" / "policies.yaml"
)  # a data file, not code
SUPPORTED_VERSION = 1
# Stats pushed into a workflow become history events; keep a session well under Temporal's
# 10k-event warning even at its maximum duration.
MAX_STATS_REPORTS_PER_SESSION = 5000
MIN_FRAME_SIDE_PX = 16  # WebRTC encoders refuse smaller frames
# Numeric keys that may be zero; every other number must be positive.
_ZERO_ALLOWED = frozenset({"max_replacements", "max_redirects", "switch_back_retry_s"})


class PolicyError(LipsyncError, ValueError):
    """A policy file problem; `key` is the dotted path of the offending key ("<file>" for the whole file)."""

    code = "policy_invalid"

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def policies_path() -> Path:
    return Path(os.environ.get(POLICIES_ENV) or DEFAULT_POLICIES_PATH)


def load_policies(path: Path | None = None, *, overrides: Mapping[str, Any] | None = None) -> SessionPolicy:
    """Read, override (dotted keys, e.g. {"session.idle_timeout_s": 5}) and validate a policy file."""
    source_path = path or policies_path()
    source = str(source_path)
    try:
        text = source_path.read_text()
    except OSError as exc:
        raise PolicyError(source, "<file>", f"cannot read: {exc.strerror or exc}") from exc
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise PolicyError(source, "<file>", f"not valid YAML: {exc}") from exc
    if overrides:
        document = apply_overrides(document, overrides)
    return parse_policies(document, source)


def parse_policies(document: Any, source: str = "<policies>") -> SessionPolicy:
    policy = _decode(SessionPolicy, document, "", source)
    _check(policy, source)
    return policy


def apply_overrides(document: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of `document` with dotted keys set (intermediate mappings are created when absent)."""
    result = copy.deepcopy(document) if isinstance(document, dict) else {}
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return result


# --- structural decoding (types, unknown and missing keys) -----------------------------------


def _decode(annotation: Any, value: Any, key: str, source: str) -> Any:
    where = key or "<top level>"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(annotation)):
                return None
            raise PolicyError(source, where, "must not be empty")
        return _decode(options[0], value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise PolicyError(source, where, f"must be a list, got {_kind(value)}")
        (item_type,) = typing.get_args(annotation)
        return [_decode(item_type, item, f"{where}[{index}]", source) for index, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _decode_dataclass(annotation, value, key, source)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        allowed = [member.value for member in annotation]
        if value not in allowed:
            raise PolicyError(source, where, f"must be one of {allowed}, got {value!r}")
        return annotation(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise PolicyError(source, where, f"must be true or false, got {_kind(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(source, where, f"must be an integer, got {_kind(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(source, where, f"must be a number, got {_kind(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise PolicyError(source, where, f"must be a string, got {_kind(value)}")
        return value
    raise TypeError(f"policy schema uses an unsupported type at {where}: {annotation!r}")


def _decode_dataclass(cls: type, value: Any, key: str, source: str) -> Any:
    where = key or "<top level>"
    if not isinstance(value, dict):
        raise PolicyError(source, where, f"must be a mapping, got {_kind(value)}")
    hints = typing.get_type_hints(cls)
    fields = [field.name for field in dataclasses.fields(cls)]
    for name in value:
        if name not in fields:
            raise PolicyError(
                source, _join(key, str(name)), f"unknown key (expected one of: {', '.join(fields)})"
            )
    kwargs = {}
    for name in fields:
        if name not in value:
            raise PolicyError(source, _join(key, name), "missing key")
        kwargs[name] = _decode(hints[name], value[name], _join(key, name), source)
    decoded = cls(**kwargs)
    _check_numbers(decoded, key, source)
    return decoded


def _check_numbers(decoded: Any, key: str, source: str) -> None:
    for field in dataclasses.fields(decoded):
        number = getattr(decoded, field.name)
        if isinstance(number, bool) or not isinstance(number, int | float):
            continue
        if field.name in _ZERO_ALLOWED:
            if number < 0:
                raise PolicyError(source, _join(key, field.name), f"must be >= 0, got {number}")
        elif number <= 0:
            raise PolicyError(source, _join(key, field.name), f"must be > 0, got {number}")


# --- semantic checks (combinations) ----------------------------------------------------------


def _check(policy: SessionPolicy, source: str) -> None:
    def fail(key: str, problem: str) -> None:
        raise PolicyError(source, key, problem)

    if policy.version != SUPPORTED_VERSION:
        fail("version", f"unsupported version {policy.version} (this code reads version {SUPPORTED_VERSION})")

    session = policy.session
    run = policy.activities.run_session
    if run.heartbeat_timeout_s < 2 * session.stats_interval_s:
        fail(
            "activities.run_session.heartbeat_timeout_s",
            f"must be at least twice session.stats_interval_s ({session.stats_interval_s} s): the sidecar "
            "heartbeats once per stats interval, so a shorter timeout declares healthy hosts dead",
        )
    if session.stats_report_interval_s < session.stats_interval_s:
        fail("session.stats_report_interval_s", "must be >= session.stats_interval_s")
    reconcile_window_s = run.heartbeat_timeout_s + run.reconcile_s + session.stats_report_interval_s
    if session.control_plane_grace_s <= reconcile_window_s:
        fail(
            "session.control_plane_grace_s",
            f"must be longer than activities.run_session.heartbeat_timeout_s + reconcile_s + "
            f"session.stats_report_interval_s ({reconcile_window_s} s): a sidecar would end its sessions "
            "before "
            "the workflow could reconcile with it",
        )
    reports = session.max_duration_s / session.stats_report_interval_s
    if reports > MAX_STATS_REPORTS_PER_SESSION:
        fail(
            "session.stats_report_interval_s",
            f"too small for session.max_duration_s: {reports:.0f} reports per session would bloat the "
            "workflow "
            f"history (at most {MAX_STATS_REPORTS_PER_SESSION})",
        )

    pools = policy.placement.pools
    if not pools:
        fail("placement.pools", "must name at least one pool")
    if len(set(pools)) != len(pools):
        fail("placement.pools", f"names a pool twice: {pools}")
    for index, pool in enumerate(pools):
        if not is_pool_name(pool):
            fail(
                f"placement.pools[{index}]",
                f"{pool!r} is not a pool name (1-{MAX_POOL_NAME_CHARS} letters, digits, '-', '_' or '.')",
            )

    order = policy.outputs.fallback_order
    if not order:
        fail("outputs.fallback_order", "must name at least one output")
    for index, kind in enumerate(order):
        if kind not in OUTPUTS:
            fail(f"outputs.fallback_order[{index}]", f"must be one of {OUTPUTS.names()}, got {kind!r}")
    if len(set(order)) != len(order):
        fail("outputs.fallback_order", f"names an output twice: {order}")

    for name in ("fetch_assets", "validate_assets", "place_session", "release_slot"):
        control = getattr(policy.activities, name)
        _check_retry(control.retry, f"activities.{name}.retry", fail)
        if control.schedule_to_close_s < control.start_to_close_s:
            fail(f"activities.{name}.schedule_to_close_s", "must be >= start_to_close_s")

    for key, networks in (
        ("assets.fetch.allow_networks", policy.assets.fetch.allow_networks),
        ("outputs.rtmp_allow_networks", policy.outputs.rtmp_allow_networks),
    ):
        for index, network in enumerate(networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                fail(f"{key}[{index}]", f"not an IP network (CIDR): {exc}")

    frames = policy.assets.frames
    if frames.min_side_px < MIN_FRAME_SIDE_PX:
        fail(
            "assets.frames.min_side_px",
            f"must be >= {MIN_FRAME_SIDE_PX} (WebRTC encoders refuse smaller frames)",
        )
    if frames.max_side_px < frames.min_side_px:
        fail("assets.frames.max_side_px", "must be >= assets.frames.min_side_px")
    if frames.max_output_side_px < frames.min_side_px:
        fail("assets.frames.max_output_side_px", "must be >= assets.frames.min_side_px")
    if frames.max_total_pixels < frames.min_side_px**2:
        fail("assets.frames.max_total_pixels", "must hold at least one frame of min_side_px²")
    if policy.assets.zip.max_compression_ratio < 1:
        fail("assets.zip.max_compression_ratio", "must be >= 1")


def _check_retry(retry: RetrySpec, key: str, fail: typing.Callable[[str, str], None]) -> None:
    if retry.backoff_coefficient < 1:
        fail(f"{key}.backoff_coefficient", "must be >= 1")
    if retry.maximum_interval_s < retry.initial_interval_s:
        fail(f"{key}.maximum_interval_s", "must be >= initial_interval_s")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
