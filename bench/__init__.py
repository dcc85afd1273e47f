"""Benchmarks; `python -m bench.serving` measures the serving stack (see bench/README.md)."""
