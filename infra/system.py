"""System packages the project needs from Debian, and installing them when they are missing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from realtime.errors import LipsyncError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SystemRequirement:
    package: str
    provides: Path  # a file whose presence means the package is installed


REQUIREMENTS = (
    SystemRequirement("nginx-light", Path("/usr/sbin/nginx")),
    SystemRequirement("libnginx-mod-rtmp", Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")),
    SystemRequirement("ffmpeg", Path("/usr/bin/ffmpeg")),
    SystemRequirement("espeak-ng", Path("/usr/bin/espeak-ng")),
    # Headless browser for the viewer page's end-to-end test.
    SystemRequirement("chromium", Path("/usr/bin/chromium")),
)


class SystemInstallError(LipsyncError, RuntimeError):
    """A system package the stack needs could not be installed."""

    code = "system_install_failed"


def missing_packages() -> list[str]:
    return [req.package for req in REQUIREMENTS if not req.provides.exists()]


def install_missing_packages() -> list[str]:
    """apt-get install what is missing (needs root); returns the packages installed."""
    missing = missing_packages()
    if not missing:
        return []
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemInstallError(f"missing system packages {missing} and no apt-get to install them")
    sudo: list[str] = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logger.info("installing system packages", extra={"packages": missing})
    for argv in (
        [*sudo, apt, "update", "-q"],
        [*sudo, apt, "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemInstallError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    # Debian starts nginx as a service on install; our stack runs its own instances only.
    subprocess.run([*sudo, "service", "nginx", "stop"], capture_output=True, check=False)
    still = missing_packages()
    if still:
        raise SystemInstallError(f"packages still missing after apt-get install: {still}")
    return missing
