"""Separate virtualenvs for voice-agent frameworks whose pins conflict with the service's (livekit-agents,
Pipecat).

Each is built by the test that needs it, from PyPI, once per requirement set and interpreter,
under the per-user cache (`infra.paths.cache_dir()/venvs/`), so CI on a clean machine builds it
and later runs reuse it. It holds third-party packages only: the code under test (the client
and the integration) reaches it through PYTHONPATH, so a cached env never runs stale code.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from infra.paths import PROJECT_ROOT, cache_dir

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600.0
CLIENT_SRC = PROJECT_ROOT / "infra" / "integrations" / "lipsync-client" / "src"


class FrameworkVenvError(RuntimeError):
    """The env could not be built (no network to PyPI, a resolution conflict): the message has pip's tail."""


def framework_python(name: str, requirements: list[str], constraints: Path) -> Path:
    """The interpreter of a cached env holding `requirements` (pip specifiers) resolved under `constraints`
    (every package pinned), built if missing; a change to either builds a new env."""
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    identity = "\n".join([sys.version, *sorted(requirements), constraints.read_text()])
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    root = cache_dir() / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{key}"
    python = path / "bin" / "python"
    complete = path / ".complete"
    with (root / f"{name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; a parallel run waits and reuses its env
        if complete.exists() and python.exists():
            return python
        shutil.rmtree(path, ignore_errors=True)
        started_s = time.monotonic()
        env = {
            k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT"}
        }
        try:
            subprocess.run(
                [str(base_python), "-m", "venv", str(path)],
                check=True,
                capture_output=True,
                timeout=120,
                env=env,
            )
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-c",
                    str(constraints),
                    *requirements,
                ],
                check=True,
                capture_output=True,
                timeout=BUILD_TIMEOUT_S,
                env=env,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(path, ignore_errors=True)
            output = exc.stderr.decode(errors="replace")[-2000:] if isinstance(exc.stderr, bytes) else ""
            raise FrameworkVenvError(
                f"building the {name} env ({' '.join(requirements)}) failed: {exc}\n{output}"
            ) from exc
        complete.write_text("\n".join(requirements) + "\n")
        logger.info("built the %s env in %.1f s: %s", name, time.monotonic() - started_s, path)
        return python


def integration_pythonpath(*integration_dirs: Path) -> str:
    """PYTHONPATH for a framework env: the client and the given integrations' source trees, nothing of the
    service."""
    return os.pathsep.join(str(p) for p in (CLIENT_SRC, *integration_dirs))


def framework_python_or_skip(name: str, requirements: list[str], constraints: Path) -> Path:
    """`framework_python` for a test: an env that cannot be built fails the run in CI and skips the test
    elsewhere."""
    import pytest

    from tests.conftest import IN_CI

    try:
        return framework_python(name, requirements, constraints)
    except FrameworkVenvError as exc:
        if IN_CI:
            pytest.fail(f"the {name} env could not be built in CI: {exc}")
        pytest.skip(str(exc))
