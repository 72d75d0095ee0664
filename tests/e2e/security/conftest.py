"""Fixtures for the security tests: a loopback asset server, an isolated Temporal harness, real sidecar
processes."""

from tests.support.fixtures import asset_server, avatar_url, harness, sidecars

__all__ = ["asset_server", "avatar_url", "harness", "sidecars"]
