"""Benchmarks: load generator, in-process limits, serving against peers, training speed (see docs/benchmarks.md)."""
