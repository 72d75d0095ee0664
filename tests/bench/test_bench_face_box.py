"""`bench.face_box`: the astronaut's landmark vs cascade boxes and ellipse vs parsed mask figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.face_box import main


def test_face_box_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "face_box.json"
    assert main(["--json", str(out)]) == 0
    capsys.readouterr()
    document = json.loads(out.read_text())
    assert document["summary"]["landmark_vs_upstream_rule_max_px"] <= 2
    assert {row["variant"] for row in document["results"]} == {
        "frontal",
        "tilted-left",
        "tilted-right",
        "turned-left",
        "turned-right",
    }
    for row in document["results"]:
        assert row["face_box_source"] == "landmarks:dlib-68"
        if row["cascade_box"] is not None:
            assert row["iou"] > 0.5 and abs(row["landmark_minus_cascade_px"]["x1"]) <= 12
    mask = document["mask"]
    assert "random" in mask["parse_weights"] and mask["ellipse_px"] > 0 and 0 <= mask["iou"] <= 1
