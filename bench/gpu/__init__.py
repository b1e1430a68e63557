"""The prepared GPU check: one script that runs the GPU tests and benchmarks and writes a report (check.sh)."""
