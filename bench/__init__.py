"""Benchmarks of the serving stack: `python -m bench.serving` (see bench/README.md)."""
