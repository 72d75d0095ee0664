"""Where the project keeps caches, binaries and logs on this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Per-user cache for built binaries (survives `git clean`, shared across checkouts)."""
    base = os.environ.get("LIPSYNC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "lipsync-live"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def venv_bin_dir() -> Path:
    """The bin/ of the interpreter running us: where pip puts `temporal` and `temporal-test-server`."""
    return Path(sys.executable).parent


def state_dir() -> Path:
    """Runtime state of `lipsync stack` (pids, configs, logs), inside the checkout."""
    path = Path(os.environ.get("LIPSYNC_STATE_DIR", PROJECT_ROOT / ".stack"))
    path.mkdir(parents=True, exist_ok=True)
    return path
