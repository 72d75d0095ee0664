"""Fixtures for the output tests: the loopback asset server, an avatar and the Temporal harness."""

from __future__ import annotations

from tests.support.fixtures import asset_server, avatar_url, harness

__all__ = ["asset_server", "avatar_url", "harness"]
