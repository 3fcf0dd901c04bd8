"""Benchmarks: `python -m engram_jax.bench.<name> --help`."""
