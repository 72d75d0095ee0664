"""MP4 recording: valid file with the right frame count and audio; never a complete-looking file after a
crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import pytest

from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.errors import RecordingError
from realtime.outputs.mp4 import Mp4Recorder, partial_path
from tests.support.avsignals import HEIGHT_PX, SAMPLES_PER_FRAME, WIDTH_PX, tick

SETTINGS = EncoderSettings(width_px=WIDTH_PX, height_px=HEIGHT_PX)


def test_five_second_recording_is_a_valid_mp4_with_audio(tmp_path: Path) -> None:
    target = tmp_path / "session.mp4"
    recorder = Mp4Recorder(target, SETTINGS)
    for index in range(125):
        frame, audio = tick(index, {50})
        recorder.write(frame, index, audio, index * SAMPLES_PER_FRAME)
    assert not target.exists(), "the target must not exist before the recording is closed"
    assert recorder.close() == target
    assert not partial_path(target).exists()

    with av.open(str(target)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert container.streams.audio, "recording has no audio track"
        audio_stream = container.streams.audio[0]
        assert audio_stream.codec_context.name == "aac"
        assert audio_stream.codec_context.sample_rate == 48_000
        frames = sum(1 for _ in container.decode(video=0))
    assert abs(frames - 125) <= 3


def test_crash_mid_recording_leaves_no_complete_file(tmp_path: Path) -> None:
    """A process killed mid-recording leaves only the .partial file, which does not open as a valid MP4."""
    target = tmp_path / "crash.mp4"
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
from pathlib import Path
from realtime.outputs.encoder import EncoderSettings
from realtime.outputs.mp4 import Mp4Recorder
from tests.support.avsignals import tick, SAMPLES_PER_FRAME
recorder = Mp4Recorder(Path({str(target)!r}), EncoderSettings(width_px=256, height_px=192))
for index in range(60):
    frame, audio = tick(index, set())
    recorder.write(frame, index, audio, index * SAMPLES_PER_FRAME)
os._exit(1)  # crash: no close
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr.decode()
    assert not target.exists()
    partial = partial_path(target)
    assert partial.exists()
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(partial)).close()


def test_recording_path_must_be_mp4(tmp_path: Path) -> None:
    with pytest.raises(RecordingError) as exc:
        Mp4Recorder(tmp_path / "x.avi", SETTINGS)
    assert exc.value.code == "recording_failed"


def test_abandoned_recording_removes_partial(tmp_path: Path) -> None:
    target = tmp_path / "abandoned.mp4"
    recorder = Mp4Recorder(target, SETTINGS)
    frame, audio = tick(0, set())
    recorder.write(frame, 0, audio, 0)
    recorder.abandon()
    assert not target.exists() and not partial_path(target).exists()
