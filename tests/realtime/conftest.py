"""Fixtures of the sidecar-level tests (ingest, sidecar, outputs): a real sidecar on loopback, speech, an
avatar.

They live in tests/support/sidecar_harness.py so that other folders can import its helpers; engine tests
define their own `speech` (samples, not a clip), which pytest prefers in tests/realtime/engine.
"""

from tests.support.sidecar_harness import avatar_zip_path, sidecar, speech

__all__ = ["avatar_zip_path", "sidecar", "speech"]
