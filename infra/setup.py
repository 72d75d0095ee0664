"""Install what the real services need on this machine: Debian packages and the pinned livekit-server build.

Run by `make setup` (and so by `make test` and CI); safe to re-run, and a second run does nothing.
"""

from __future__ import annotations

import logging
import sys

from infra import livekit, system, web


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    log = logging.getLogger("infra.setup")
    installed = system.install_missing_packages()
    log.info("system packages: %s", f"installed {installed}" if installed else "all present")
    cached = livekit.livekit_binary_path().exists()
    binary = livekit.ensure_livekit_server()
    log.info(
        "livekit-server %s: %s (%s)", livekit.LIVEKIT_SERVER_VERSION, binary, "cached" if cached else "built"
    )
    log.info("viewer page: %s", web.ensure_viewer_built())
    return 0


if __name__ == "__main__":
    sys.exit(main())
