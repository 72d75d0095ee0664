"""The realtime sidecar: PCM ingest -> audio features -> engine -> compositor -> publishers."""
