"""`bench.engine --prep-frames`: cold preparation (latents + parsed masks) and the cache hit, measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.engine import main


def test_prepare_benchmark_measures_cold_and_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prep.json"
    args = ["--json", str(out), "--prep-frames", "3", "--prep-px", "256", "--device", "cpu", "--threads", "2"]
    assert main(args) == 0
    capsys.readouterr()
    prepare = json.loads(out.read_text())["prepare"]
    assert prepare["frames"] == 3 and prepare["frame_px"] == [256, 256] and prepare["frames_with_face"] == 3
    assert prepare["blend_mask"] == "parsed:jaw" and prepare["cached_hit"] is True
    assert prepare["parse_s"] > 0 and prepare["vae_encode_s"] > 0
    assert 0 < prepare["cached_s"] < prepare["cold_s"]
    assert prepare["face_box_source"] == "landmarks:dlib-68"
    assert set(prepare["stage_ms"]) == {"decode", "face_boxes", "latents", "parse"}


def test_prepare_benchmark_refuses_nonsense_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--json", "x.json", "--prep-frames", "2", "--prep-px", "8"])
    assert "--prep-px" in capsys.readouterr().err
