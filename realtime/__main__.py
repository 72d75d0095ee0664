"""`python -m realtime`: run the sidecar (see realtime.sidecar.process)."""

from __future__ import annotations

import sys

from realtime.sidecar.process import main

if __name__ == "__main__":
    sys.exit(main())
