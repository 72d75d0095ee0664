"""`lipsync demo`'s core on free ports in a temp dir: a real session end to end, recorded to an MP4 that is
checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.demo import DemoOptions, check_recording, free_ports_options, run_demo
from infra.process import pid_alive

pytestmark = pytest.mark.service


def test_demo_records_a_session_with_moving_lips_and_speech(tmp_path: Path) -> None:
    lines: list[str] = []
    base = DemoOptions(
        out_path=tmp_path / "out" / "demo.mp4", work_dir=tmp_path / "work", model_dir=tmp_path / "no-models"
    )
    options = free_ports_options(base)
    result = run_demo(options, lines.append)

    assert result.out_path.exists()
    check = check_recording(result.out_path)  # decodes it again, independently of the demo's own check
    assert check.width_px == check.height_px == 256
    assert check.video_frames >= 25 * 5  # idle + ~6 s of speech + idle at 25 fps
    assert check.audio_rms_dbfs > -40.0  # speech, not silence
    assert check.lips_move, check
    assert result.engine == "preview"  # no weights in the model dir
    assert result.phases[-2:] == ["live", "completed"]
    assert result.temporal_ui_url.endswith(f"/workflows/session-{result.session_id}")
    assert "/viewer/index.html?" in result.viewer_url
    assert result.trace_id is not None and len(result.trace_id) == 32
    assert any(line.startswith("engine: preview") for line in lines), lines
    # Everything it started is stopped.
    pids = [int(line.split("pid ")[1].split(",")[0]) for line in lines if "(pid " in line]
    assert len(pids) == 3 and not any(pid_alive(pid) for pid in pids)
    assert options.stack_dir is not None and not (options.stack_dir / "stack.json").exists()
