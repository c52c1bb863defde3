"""Performance benchmarks (issue 8): speed and memory of every tuner against peft's peers and the frozen floor.

One command runs them all: ``python -m benchmarks.perf.run_all`` (see :mod:`benchmarks.perf.run_all`).
"""
