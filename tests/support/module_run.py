"""Running one of the project's modules (`python -m ...`) as a child process from the project root, as a user
would from a checkout: the tests of command-line entry points and benchmarks."""

from __future__ import annotations

import subprocess
import sys

from infra.paths import PROJECT_ROOT


def run_module(module: str, args: list[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` in the project root with this interpreter; its output captured as text,
    its exit status left to the caller."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
