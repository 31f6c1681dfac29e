"""dtk benchmark suite: `python -m benchmarks [--gpu] ...` (see benchmarks/README.md)."""
