"""The demo's science: recipe sweeps as DVC experiments, and diagnostics of what the student can learn."""
