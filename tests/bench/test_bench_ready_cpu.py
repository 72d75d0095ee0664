"""bench.ready end to end on CPU with the tiny model: a fresh child process made ready the way a sidecar is
(`warm_up_for_serving`), reported under the BENCHMARKS.md names with the variant that serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ready import main


def test_the_ready_phase_reports_process_start_to_servable_and_the_serving_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ready.json"
    code = main(
        [
            "--json",
            str(out),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--phases",
            "ready",
            "--artifacts-dir",
            str(tmp_path / "artifacts"),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["benchmark"] == "engine" and document["settings"]["phases"] == ["ready"]
    summary = document["summary"]
    (row,) = document["results"]
    # Nothing compiles on CPU: no artifact is built or loaded, the eager models serve, nothing follows.
    assert summary["build_ms_cold"] is None and summary["compiled_ms_prebuilt"] is None
    assert summary["ready_status"] == "not_compiled" and summary["ready_serving_variant"] == "eager"
    assert row["serving"] == "serving eager" and "background" not in row
    assert row["artifact_bytes"] is None and not (tmp_path / "artifacts").exists()
    # The parent times the child from its start: the child's own breakdown fits inside that wall time. Ready
    # is when the engine serves (`total_ms`), not when the child process ends: with serve-first a background
    # compile may still run after it (the child then waits for its swap, up to --compiled-timeout-s).
    parts = row["startup_ms"] + row["imports_and_models_ms"] + row["artifact_load_ms"] + row["warm_up_ms"]
    assert 0 < parts <= row["total_ms"] == summary["ready_ms_prebuilt"] <= row["process_wall_ms"]
    assert row["torch_import_ms"] + row["models_ms"] == pytest.approx(row["imports_and_models_ms"], abs=0.2)
    assert set(row["warm_up_batch_ms"]) == {"1"}
    assert "[ready]" in capsys.readouterr().out
