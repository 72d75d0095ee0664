"""Search attributes that make sessions findable in the Temporal UI (all keyword-typed)."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

ROOM = SearchAttributeKey.for_keyword("LipsyncRoom")
PHASE = SearchAttributeKey.for_keyword("LipsyncPhase")
OUTPUT = SearchAttributeKey.for_keyword("LipsyncOutput")
SIDECAR = SearchAttributeKey.for_keyword("LipsyncSidecar")
POOL = SearchAttributeKey.for_keyword("LipsyncPool")
# The API tenant that started the session (set once at start): lists and ownership checks filter on it.
TENANT = SearchAttributeKey.for_keyword("LipsyncTenant")

ALL_KEYS = (ROOM, PHASE, OUTPUT, SIDECAR, POOL, TENANT)
