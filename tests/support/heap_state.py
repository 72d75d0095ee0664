"""Tests of the heap freeze (realtime.heap) start unfrozen and give the process back as they found it.

Why give it back frozen: a sidecar fixture's warm-up freezes the test process's heap (as in production) and
later tests run with it so. Left unfrozen, the whole pytest heap (millions of objects after hundreds of
tests) returns to the collector's full scans, and one of those pauses the process for most of a second in
the middle of some unrelated timing test.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def unfrozen_heap() -> Iterator[None]:
    """Nothing frozen inside; afterwards frozen again when it was before, and the collector on if it was."""
    was_frozen = gc.get_freeze_count() > 0
    enabled = gc.isenabled()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_frozen:
            gc.freeze()
        if enabled:
            gc.enable()
