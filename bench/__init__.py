"""Benchmarks: `python -m bench.<name> --json PATH` (see shared BENCHMARKS.md)."""
