"""Dependencies point down: every production module's imports (module-level and inside functions) respect the
layers, and the Temporal workflow modules import only temporalio and their contracts.

The layers, lowest first:

- `realtime` (the sidecar: engine, ingest, outputs, runtime) imports no other project package.
- `workflows` (deterministic workflows and the contracts and policy they share) imports no other project
package.
- `activities` (Temporal activities) may import `workflows` (contracts, policy) and `realtime` (what they
drive).
- `api` (the FastAPI edge) may import `workflows` (contracts, client helpers) and, of `realtime`, only what
  declares things once for every layer: the error base `realtime.errors` (mapped once to HTTP), the output
  registry `realtime.outputs.registry` (output kinds, their request specs and URL guards) and the WebSocket
  close codes `realtime.ingest.ws_close` (the audio relay passes the sidecar's on), and the model-dir check
  `realtime.engine.musetalk.check` that /debug/musetalk serves (`lipsync models check`'s document, with the
  engine registry's "auto" choice). Never `activities` (it
  starts workflows, it does not run their side effects) nor `infra`.
- `infra` and `bench` (launchers, CLI, worker assembly, benchmarks) sit on top and may import everything.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "workflows", "activities", "realtime", "infra", "bench")
# Packages each layer must not import (`bench` and `infra` are the top: they may import every package).
FORBIDDEN: dict[str, frozenset[str]] = {
    "realtime": frozenset({"activities", "workflows", "api", "infra", "bench"}),
    "workflows": frozenset({"activities", "api", "infra", "realtime", "bench"}),
    "activities": frozenset({"api", "infra", "bench"}),
    "api": frozenset({"activities", "infra", "realtime", "bench"}),
}
# Modules of a forbidden package a layer may still import, and why.
ALLOWED: dict[str, frozenset[str]] = {
    "api": frozenset(
        {
            "realtime.errors",
            "realtime.outputs.registry",
            "realtime.ingest.ws_close",
            "realtime.engine.musetalk.check",
        }
    ),
}
# Upward imports that exist today and have an owner moving them; each entry must still occur (a stale entry
# fails, so the list only shrinks). (importing module, imported module)
PENDING: frozenset[tuple[str, str]] = frozenset()
# What a module defining a Temporal workflow may import from the project (sandbox-safe, deterministic).
WORKFLOW_CONTRACTS = frozenset({"workflows.contracts", "workflows.policy", "workflows.search_attributes"})


def production_modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            if all(
                part.isidentifier() for part in parts
            ):  # skips the separately packaged integrations' dashes
                yield ".".join(parts), path


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) for every import anywhere in `source`: module level, in functions, under TYPE_CHECKING.
    `from package import name` yields the package and, when `name` is a project module, that module too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                if _is_project_module(f"{target}.{alias.name}"):
                    yield node.lineno, f"{target}.{alias.name}"


def _is_project_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports(module: str, source: str, is_package: bool = False) -> set[tuple[str, str, int]]:
    layer = module.split(".", maxsplit=1)[0]
    forbidden = FORBIDDEN.get(layer, frozenset())
    allowed = ALLOWED.get(layer, frozenset())
    return {
        (module, target, line)
        for line, target in imported_modules(source, module, is_package)
        if target.split(".")[0] in forbidden
        and not any(target == a or target.startswith(a + ".") for a in allowed)
    }


def test_no_upward_imports() -> None:
    violations: set[tuple[str, str, int]] = set()
    for module, path in production_modules():
        violations |= upward_imports(module, path.read_text(), path.name == "__init__.py")
    found_pairs = {(module, target) for module, target, _line in violations}
    new = sorted(v for v in violations if (v[0], v[1]) not in PENDING)
    assert not new, "upward imports (module, imports, line): " + "; ".join(
        f"{m} -> {t} (line {n})" for m, t, n in new
    )
    stale = sorted(PENDING - found_pairs)
    assert not stale, f"PENDING lists imports that are gone (remove them): {stale}"


def test_workflow_modules_import_only_temporalio_and_their_contracts() -> None:
    checked = []
    for module, path in production_modules():
        source = path.read_text()
        if "@workflow.defn" not in source:
            continue
        checked.append(module)
        for line, target in imported_modules(source, module):
            top = target.split(".")[0]
            if top in ("__future__", "temporalio") or top in sys.stdlib_module_names:
                continue
            if target in WORKFLOW_CONTRACTS or target == "workflows":  # the package itself holds no code
                continue
            pytest.fail(f"{module} (a workflow module) imports {target} at line {line}")
    for contract in WORKFLOW_CONTRACTS:  # what the workflows import must itself stay sandbox-safe
        path = ROOT / Path(*contract.split(".")).with_suffix(".py")
        for line, target in imported_modules(path.read_text(), contract):
            top = target.split(".")[0]
            ok = top in ("__future__", "temporalio") or top in sys.stdlib_module_names
            assert ok or target.startswith("workflows.policy"), f"{contract} imports {target} at line {line}"
    assert {"workflows.session", "workflows.placement"} <= set(checked), checked


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("realtime.sidecar.x", "def f():\n    from api.models import StartRequest\n", "api.models"),
        ("realtime.sidecar.x", "import workflows.contracts\n", "workflows.contracts"),
        ("activities.x", "from infra import paths\n", "infra"),
        ("api.routes.x", "from ...infra.cli import models\n", "infra.cli"),
        ("api.x", "from realtime.sidecar.runtime import SessionRuntime\n", "realtime.sidecar.runtime"),
        ("workflows.x", "if True:\n    import realtime.errors\n", "realtime.errors"),
    ],
)
def test_the_walker_sees_every_kind_of_upward_import(module: str, source: str, expected: str) -> None:
    assert expected in {target for _module, target, _line in upward_imports(module, source)}


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("api.errors", "from realtime.errors import LipsyncError\n"),
        ("activities.x", "from workflows.contracts import SessionInput\nimport realtime.host\n"),
        ("infra.cli.x", "from api.app import create_app\nfrom activities import sidecar\n"),
        ("realtime.engine.x", "from realtime.errors import LipsyncError\nimport torch\n"),
    ],
)
def test_imports_that_point_down_pass(module: str, source: str) -> None:
    assert upward_imports(module, source) == set()
