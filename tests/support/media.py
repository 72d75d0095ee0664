"""Avatar assets for orchestration tests: the astronaut (a real face), good and deliberately bad."""

from __future__ import annotations

import io
import stat
import zipfile
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image


@cache
def _astronaut_head() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[0:384, 60:444])  # head and shoulders, 384x384 RGB


def astronaut_frame(side_px: int = 128, shift_px: int = 0) -> np.ndarray:
    image = Image.fromarray(_astronaut_head()).resize((side_px, side_px), Image.Resampling.BILINEAR)
    return np.roll(np.asarray(image), shift_px, axis=1)


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def frames_zip(count: int = 6, side_px: int = 128) -> bytes:
    """frame_1.png … frame_N.png (natural order differs from lexical order past 9)."""
    return zip_of(
        {f"frames/frame_{index}.png": png(astronaut_frame(side_px, index)) for index in range(1, count + 1)}
    )


def noise_frames_zip(count: int = 3, side_px: int = 128) -> bytes:
    rng = np.random.default_rng(7)
    return zip_of(
        {
            f"frame_{index}.png": png(rng.integers(0, 256, (side_px, side_px, 3), dtype=np.uint8))
            for index in range(count)
        }
    )


def symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("frame_1.png", png(astronaut_frame()))
        link = zipfile.ZipInfo("frame_2.png")
        link.create_system = 3  # unix, so external_attr carries the mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def bomb_zip(inflated_bytes: int) -> bytes:
    """One 'frame' of zeros: deflate shrinks it ~1000x."""
    return zip_of({"frame_1.png": bytes(inflated_bytes)})


def idle_video_bytes(directory: Path, count: int = 10, side_px: int = 128) -> bytes:
    import av

    path = directory / "idle.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = side_px
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 25)
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(astronaut_frame(side_px, index), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path.read_bytes()


def resizing_video_bytes(directory: Path, sides_px: tuple[int, int] = (128, 96), count: int = 6) -> bytes:
    """An MPEG-TS idle video whose resolution changes midway: two segments of different sizes,
    concatenated."""
    import av

    parts = []
    for part, side_px in enumerate(sides_px):
        path = directory / f"part{part}.ts"
        with av.open(str(path), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width = stream.height = side_px
            stream.pix_fmt = "yuv420p"
            for index in range(count):
                frame = av.VideoFrame.from_ndarray(astronaut_frame(side_px, index), format="rgb24")
                frame.pts = part * count + index
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        parts.append(path.read_bytes())
    return b"".join(parts)


def audio_only_bytes(directory: Path, seconds: float = 0.5) -> bytes:
    """A valid media file with an audio stream and no video stream (AAC in MP4)."""
    import av

    path = directory / "voice.mp4"
    rate = 48_000
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
        block = 1024
        for start in range(0, len(samples) - block + 1, block):
            frame = av.AudioFrame.from_ndarray(
                samples[start : start + block][None, :], format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path.read_bytes()
