"""What every benchmark shares: its command line, runs in fresh processes, and its report.

A benchmark measures its subject against a baseline in the same run and prints one JSON report
(`emit`), written to `--json` too. What must not share a process (a run's peak memory, a
teacher loaded twice, a dask cluster) runs in a fresh interpreter: `run_child` re-runs the
benchmark's own module with `--mode NAME` and reads the JSON line the child prints last
(`child_result`); `in_fresh_process` does the same for one function call.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The benchmark's command line, its docstring as help, with `--json PATH`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the report here")
    return ap


def emit(report: dict, path: Path | None) -> None:
    """Print `report` as JSON, and write it to `path` too when one is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.write_text(text)


def child_result(result: dict) -> None:
    """A child's figures: one JSON line, the last it prints."""
    print(json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], mode: str, **hidden: str) -> dict:
    """Run `python -m MODULE ARGS --mode MODE --KEY VALUE...` from the repository; its last JSON line.

    Exits with the child's last lines of stderr when it fails.
    """
    cmd = [sys.executable, "-m", module, *args, "--mode", mode]
    for key, value in hidden.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{module} --mode {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a spawned process of its own (its own peak memory, no inherited state)."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def status_kib(field: str) -> int:
    """A figure of /proc/self/status in KiB (VmRSS, VmHWM); 0 where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_kib() -> int:
    """Reset this process's peak resident memory (Linux: clear_refs 5); the current one, KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return status_kib("VmRSS")
