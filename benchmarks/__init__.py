"""Benchmarks of recvit: ``python -m benchmarks.run`` (the harness, recvit.bench) and
``pytest benchmarks/ --benchmark-only`` (per-op microbenchmarks)."""
