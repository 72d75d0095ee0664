"""Test helpers shared across test packages (test-only hosts, asset servers, media builders)."""
