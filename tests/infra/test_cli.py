from __future__ import annotations

import subprocess
import sys

import pytest

from infra.cli import build_parser, main


def test_lipsync_help_lists_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "stack" in result.stdout and "demo" in result.stdout


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-command"])
    assert exc.value.code == 2


def test_no_subcommand_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: lipsync" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["15", "-10", "x"])
def test_an_idle_audio_reserve_off_the_pull_grid_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["sidecar", "--idle-audio-reserve-ms", value])
    assert exc.value.code == 2
    assert "--idle-audio-reserve-ms" in capsys.readouterr().err


def test_the_idle_audio_reserve_reaches_the_host_config() -> None:
    from infra.cli.sidecar import settings_from_args

    assert settings_from_args(build_parser().parse_args(["sidecar"])).host.idle_audio_reserve_ms == 0
    args = build_parser().parse_args(["sidecar", "--idle-audio-reserve-ms", "300"])
    assert settings_from_args(args).host.idle_audio_reserve_ms == 300
