"""Thin DVC stage entry points: each reads the paths dvc.yaml gives it and calls the library."""
