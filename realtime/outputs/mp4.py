"""MP4 recording of a session, written atomically.

Frames go to `<name>.partial.mp4` beside the target; only a clean close renames it to the
target path (os.replace, after fsync). A crash leaves the `.partial` file — which is also
unplayable, because the MP4 index (moov) is written at close — never a file that claims
to be complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from realtime.outputs.encoder import AvMuxer, EncoderSettings
from realtime.outputs.errors import RecordingError


def partial_path(target: Path) -> Path:
    return target.with_name(target.stem + ".partial" + target.suffix)


class Mp4Recorder:
    def __init__(self, target: Path, settings: EncoderSettings) -> None:
        if target.suffix.lower() != ".mp4":
            raise RecordingError(f"recording path must end in .mp4: {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.target = target
        self._partial = partial_path(target)
        try:
            self._muxer: AvMuxer | None = AvMuxer(str(self._partial), "mp4", settings, options={})
        except Exception as exc:
            raise RecordingError(f"cannot write recording {target}: {exc}") from exc

    @property
    def frames_written(self) -> int:
        return self._muxer.video_frames_written if self._muxer else 0

    def write(
        self, frame_rgb: np.ndarray, frame_index: int, audio_48k: np.ndarray, audio_start_sample: int
    ) -> None:
        if self._muxer is None:
            raise RecordingError("recording already closed")
        self._muxer.write_video(frame_rgb, frame_index)
        self._muxer.write_audio(audio_48k, audio_start_sample)

    def close(self) -> Path:
        """Finish the file and move it into place; returns the final path."""
        if self._muxer is None:
            return self.target
        muxer, self._muxer = self._muxer, None
        muxer.close()
        with open(self._partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._partial, self.target)
        return self.target

    def abandon(self) -> None:
        """Stop without publishing the file (the session failed); the partial file is removed."""
        if self._muxer is not None:
            self._muxer.abort()
            self._muxer = None
        self._partial.unlink(missing_ok=True)
