"""Temporal workflows (deterministic code only) and the contracts they share with activities and the API."""
