"""The benchmark suite: ``python -m benchmarks.run --help`` (see benchmarks/README.md)."""
