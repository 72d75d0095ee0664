"""docs/architecture.md names files and symbols: every one of them must exist, so the map stays true."""

from __future__ import annotations

import re
from pathlib import Path

from infra.paths import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "architecture.md"
# `path/to/file.py`, `path/to/folder/`, `path/to/file.py:Symbol` or `file.py:Symbol.attr` inside backticks
ROOTS = {"realtime", "workflows", "activities", "api", "infra", "bench", "tests", "docs"}
REFERENCE = re.compile(r"`([\w./{},-]+/[\w./{},-]*?)(?::([\w.]+))?`")


def _expand(path: str) -> list[str]:
    """`tests/realtime/{engine,ingest}` names two paths."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [
        expanded
        for choice in match.group(1).split(",")
        for expanded in _expand(path[: match.start()] + choice + path[match.end() :])
    ]


def _references() -> list[tuple[str, str | None]]:
    found = []
    for raw, symbol in REFERENCE.findall(DOC.read_text()):
        # only paths from the project's root (`engine/` inside a sentence about realtime/ is a name, not a
        # path)
        if raw.split("/")[0] not in ROOTS:
            continue
        for path in _expand(raw):
            found.append((path, symbol or None))
    return found


def test_the_architecture_doc_names_only_files_and_symbols_that_exist() -> None:
    references = _references()
    assert len(references) > 30, "the doc's file references were not found: has its format changed?"
    missing = []
    for path, symbol in references:
        target = PROJECT_ROOT / path.rstrip("/")
        if not target.exists():
            missing.append(path)
            continue
        if symbol and target.is_file():
            name = symbol.split(".")[0]
            pattern = rf"^\s*(class|def|async def)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]"
            if not re.search(pattern, target.read_text(), re.MULTILINE):
                missing.append(f"{path}:{symbol}")
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_the_doc_lists_every_realtime_subpackage() -> None:
    text = DOC.read_text()
    subpackages = sorted(
        p.name for p in (PROJECT_ROOT / "realtime").iterdir() if (p / "__init__.py").exists()
    )
    assert [name for name in subpackages if f"`{name}/`" not in text] == []


def test_expand() -> None:
    assert _expand("tests/realtime/{engine,ingest}") == ["tests/realtime/engine", "tests/realtime/ingest"]
    assert Path(_expand("a/{b}/c.py")[0]) == Path("a/b/c.py")
