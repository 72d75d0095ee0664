"""Real test media: the astronaut face with small synthetic motion, and espeak-ng speech at 16 kHz."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime.engine.audio.io import load_audio_file

SENTENCE = "The quick brown fox jumps over the lazy dog. Hello there, this is a lip sync test."


def astronaut_frames(count: int = 12, size: int = 256) -> list[np.ndarray]:
    """The astronaut photo (a real face) cropped around the head, moving by a few pixels per frame."""
    from skimage.data import astronaut

    image = astronaut()[0:384, 60:444]  # head and shoulders, 384x384
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    frames = []
    for k in range(count):
        phase = 2 * np.pi * k / count
        shift = np.array([[1, 0, 2.0 * np.sin(phase)], [0, 1, 1.5 * np.cos(phase)]], dtype=np.float32)
        frames.append(cv2.warpAffine(image, shift, (size, size), borderMode=cv2.BORDER_REFLECT))
    return frames


def png_bytes(frame: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def frames_zip(frames: list[np.ndarray], manifest: dict[str, object] | None = None) -> bytes:
    """Frames as frame_1.png … frame_N.png (natural order differs from lexical order past 9)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, frame in enumerate(frames, start=1):
            archive.writestr(f"frames/frame_{index}.png", png_bytes(frame))
        if manifest is not None:
            archive.writestr("avatar.json", json.dumps(manifest))
    return buffer.getvalue()


def idle_video(frames: list[np.ndarray], path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 25)
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def speech_16k(directory: Path, text: str = SENTENCE) -> np.ndarray:
    """Real synthetic speech: espeak-ng to a WAV, decoded and resampled to 16 kHz float32."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = directory / "speech.wav"
    subprocess.run([espeak, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    return load_audio_file(wav)
