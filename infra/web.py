"""The viewer page (api/viewer: livekit-client from npm) built into api/static/viewer by esbuild."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from api.app import VIEWER_STATIC_DIR
from infra.paths import PROJECT_ROOT
from realtime.errors import LipsyncError

VIEWER_SOURCE_DIR = PROJECT_ROOT / "api" / "viewer"


class ViewerBuildError(LipsyncError, RuntimeError):
    """The browser viewer bundle could not be built."""

    code = "viewer_build_failed"


def _newest_mtime(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def ensure_viewer_built() -> Path:
    """npm ci (when node_modules is missing or older than the lock file) and build when sources changed."""
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerBuildError("npm not found: the viewer page is built from api/viewer with Node.js")
    lock = VIEWER_SOURCE_DIR / "package-lock.json"
    modules = VIEWER_SOURCE_DIR / "node_modules"
    if not modules.exists() or modules.stat().st_mtime < lock.stat().st_mtime:
        _run([npm, "ci", "--no-audit", "--no-fund"])
        modules.touch()
    sources = [*(VIEWER_SOURCE_DIR / "src").iterdir(), VIEWER_SOURCE_DIR / "package.json", lock]
    outputs = [VIEWER_STATIC_DIR / "index.html", VIEWER_STATIC_DIR / "viewer.js"]
    if not all(p.exists() for p in outputs) or min(p.stat().st_mtime for p in outputs) < _newest_mtime(
        sources
    ):
        _run([npm, "run", "build"])
    return VIEWER_STATIC_DIR


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, cwd=VIEWER_SOURCE_DIR, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ViewerBuildError(f"{' '.join(argv)} failed in {VIEWER_SOURCE_DIR}:\n{result.stderr[-3000:]}")
