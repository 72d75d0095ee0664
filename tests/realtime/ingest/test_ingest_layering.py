"""Ingest sits below the sidecar: what it needs from a session or a host it declares itself
(realtime.ingest.session), so nothing in realtime/ingest/ imports the sidecar, the outputs or the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import realtime.ingest

ABOVE_OR_BESIDE = (
    "realtime.sidecar",
    "realtime.publish",
    "realtime.media",
    "realtime.outputs",
    "realtime.engine",
)


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def test_ingest_imports_nothing_above_it() -> None:
    package_dir = Path(realtime.ingest.__file__).parent
    sources = sorted(package_dir.glob("*.py"))
    assert {path.stem for path in sources} >= {"input", "connection", "agents", "session", "protocol"}
    offending = {
        f"{path.name}: {module}"
        for path in sources
        for module in imported_modules(path)
        if module.startswith(ABOVE_OR_BESIDE)
    }
    assert not offending, sorted(offending)
