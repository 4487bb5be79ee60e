"""Benchmarks: load generator, plain baseline server, in-process ceiling; run `python -m benchmarks.run`."""
