"""infra/policies.yaml: the shipped file is valid, and every kind of bad file is refused naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from api.policy_file import DEFAULT_POLICIES_PATH, PolicyError, load_policies
from workflows.policy import SessionPolicy, SidecarLostAction


def test_shipped_file_is_valid_and_complete() -> None:
    policy = load_policies(DEFAULT_POLICIES_PATH)
    assert isinstance(policy, SessionPolicy)
    assert policy.outputs.fallback_order == ["livekit", "rtmp"]
    assert policy.host_failure.on_sidecar_lost is SidecarLostAction.REPLACE
    assert policy.assets.fetch.allow_networks == []  # nothing private is reachable by default
    assert policy.activities.run_session.heartbeat_timeout_s >= 2 * policy.session.stats_interval_s


@pytest.mark.parametrize(
    ("overrides", "key", "problem"),
    [
        ({"session.idel_timeout_s": 5}, "session.idel_timeout_s", "unknown key"),
        ({"session.idle_timeout_s": None}, "session.idle_timeout_s", "must be a number"),
        ({"session.idle_timeout_s": "5m"}, "session.idle_timeout_s", "must be a number"),
        ({"session.idle_timeout_s": 0}, "session.idle_timeout_s", "must be > 0"),
        ({"host_failure.max_replacements": -1}, "host_failure.max_replacements", "must be >= 0"),
        ({"host_failure.max_replacements": 1.5}, "host_failure.max_replacements", "must be an integer"),
        ({"host_failure.on_sidecar_lost": "retry"}, "host_failure.on_sidecar_lost", "must be one of"),
        ({"outputs.fallback_order": ["livekit", "smtp"]}, "outputs.fallback_order[1]", "must be one of"),
        ({"outputs.fallback_order": []}, "outputs.fallback_order", "at least one"),
        ({"outputs.fallback_order": ["rtmp", "rtmp"]}, "outputs.fallback_order", "twice"),
        ({"assets.frames.require_face": "yes"}, "assets.frames.require_face", "true or false"),
        ({"assets.frames.min_side_px": 8}, "assets.frames.min_side_px", ">= 16"),
        (
            {"assets.frames.max_output_side_px": 32},
            "assets.frames.max_output_side_px",
            ">= assets.frames.min",
        ),
        ({"assets.frames.max_total_pixels": 5}, "assets.frames.max_total_pixels", "at least one frame"),
        ({"assets.fetch.allow_networks": ["10.0.0.0/33"]}, "assets.fetch.allow_networks[0]", "CIDR"),
        (
            {"activities.run_session.heartbeat_timeout_s": 3},
            "activities.run_session.heartbeat_timeout_s",
            "twice",
        ),
        (
            {"activities.fetch_assets.retry.backoff_coefficient": 0.5},
            "activities.fetch_assets.retry.backoff_coefficient",
            ">= 1",
        ),
        (
            {"activities.place_session.schedule_to_close_s": 1},
            "activities.place_session.schedule_to_close_s",
            ">= start_to_close_s",
        ),
        ({"session.stats_report_interval_s": 2}, "session.stats_report_interval_s", "bloat"),
        (
            {"activities.teardown": {"start_to_close_s": 5}},
            "activities.teardown.schedule_to_start_s",
            "missing key",
        ),
        ({"version": 2}, "version", "unsupported version"),
    ],
)
def test_bad_values_name_their_key(overrides: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(PolicyError) as failure:
        load_policies(DEFAULT_POLICIES_PATH, overrides=overrides)
    assert failure.value.key == key, str(failure.value)
    assert problem in failure.value.problem, str(failure.value)
    assert key in str(failure.value) and str(DEFAULT_POLICIES_PATH) in str(failure.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    return path


def test_missing_section(tmp_path: Path) -> None:
    document = yaml.safe_load(DEFAULT_POLICIES_PATH.read_text())
    del document["host_failure"]
    with pytest.raises(PolicyError) as failure:
        load_policies(write(tmp_path, yaml.safe_dump(document)))
    assert failure.value.key == "host_failure" and failure.value.problem == "missing key"


def test_duplicate_key_is_not_silently_last_wins(tmp_path: Path) -> None:
    text = DEFAULT_POLICIES_PATH.read_text().replace(
        "  idle_timeout_s: 300", "  idle_timeout_s: 300\n  idle_timeout_s: 5"
    )
    with pytest.raises(PolicyError) as failure:
        load_policies(write(tmp_path, text))
    assert failure.value.key == "<file>" and "appears twice" in failure.value.problem


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as missing:
        load_policies(tmp_path / "absent.yaml")
    assert "cannot read" in missing.value.problem
    with pytest.raises(PolicyError) as malformed:
        load_policies(write(tmp_path, "session: [unclosed"))
    assert "not valid YAML" in malformed.value.problem
    with pytest.raises(PolicyError) as scalar:
        load_policies(write(tmp_path, "42"))
    assert scalar.value.key == "<top level>" and "mapping" in scalar.value.problem


def test_policies_env_var_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = DEFAULT_POLICIES_PATH.read_text().replace("max_replacements: 2", "max_replacements: 0")
    monkeypatch.setenv("LIPSYNC_POLICIES", str(write(tmp_path, text)))
    assert load_policies().host_failure.max_replacements == 0
