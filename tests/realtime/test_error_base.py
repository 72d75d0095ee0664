"""Every exception class the service defines derives from `realtime.errors.LipsyncError`.

Read from the source (no imports, so no engine or GPU stack is loaded): a class whose bases
lead to `Exception` must lead through `LipsyncError`. Workflow modules are left out (they
import only temporalio and their contracts, so their private control-flow exceptions cannot),
and so are the separately packaged client libraries under infra/integrations.
"""

from __future__ import annotations

import ast
from pathlib import Path

from realtime.errors import LipsyncError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "activities", "realtime", "infra")
BUILTIN_EXCEPTIONS = {
    "Exception",
    "RuntimeError",
    "ValueError",
    "KeyError",
    "LookupError",
    "OSError",
    "TypeError",
}
# Not failures anyone reports: signals between the runtime and the render lane.
CONTROL_FLOW = {"UtteranceClosed"}


def _exception_classes() -> dict[str, tuple[str, list[str]]]:
    """name -> (where, base names) for every class of the production packages."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "integrations" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    classes[node.name] = (f"{path.relative_to(ROOT)}:{node.lineno}", bases)
    return classes


def _reaches(name: str, target: str, classes: dict[str, tuple[str, list[str]]], seen: set[str]) -> bool:
    if name == target:
        return True
    if name in seen or name not in classes:
        return False
    seen.add(name)
    return any(_reaches(base, target, classes, seen) for base in classes[name][1])


def _is_exception(name: str, classes: dict[str, tuple[str, list[str]]], seen: set[str]) -> bool:
    if name in BUILTIN_EXCEPTIONS:
        return True
    if name in seen or name not in classes:
        return False
    seen.add(name)
    return any(_is_exception(base, classes, seen) for base in classes[name][1])


def test_every_error_the_service_defines_is_a_lipsync_error() -> None:
    classes = _exception_classes()
    errors = {n for n in classes if n != LipsyncError.__name__ and _is_exception(n, classes, set())}
    assert {"EngineError", "IngestError", "AssetError", "ApiError", "OutputError", "SidecarError"} <= errors
    strays = sorted(
        f"{classes[n][0]} {n}"
        for n in errors - CONTROL_FLOW
        if not _reaches(n, LipsyncError.__name__, classes, set())
    )
    assert not strays, f"exception classes outside the error base: {strays}"
