"""Benchmarks: runnable commands that print their figures as JSON (see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: Path | None) -> None:
    """Print `report` as JSON, and write it to `path` too when one is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.write_text(text)
