"""Benchmarks: runnable commands that print their figures as JSON against a baseline measured in
the same run (docs/benchmarks.md); `bench.harness` is what they share, `bench/gpu/` the prepared
GPU check, `bench/science/` the demo's recipe sweeps as DVC experiments."""
