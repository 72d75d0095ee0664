"""A do-nothing engine service for tests of the sidecar host that never render a frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from realtime.engine.protocol import RenderedFrames


class NoEngine:
    def render(self, requests: Sequence[object]) -> list[np.ndarray]:
        return []

    def render_async(self, requests: Sequence[object]) -> RenderedFrames:
        return RenderedFrames(self.render(requests))
