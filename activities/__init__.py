"""Temporal activities (side effects, retriable): assets, avatar prep, outputs, run, teardown."""
