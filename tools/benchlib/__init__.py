"""Benchmark cases and the timing harness behind tools/benchmark.py."""
