"""The command line's contract with its user: usage errors and interrupts end in one line, never a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["bogus"], "Error: No such command 'bogus'."),
        (["segment"], "Error: Missing argument 'images'."),
        (["cache", "validate"], "Error: Missing argument 'path'."),
        (["evaluate", "--metrics", "m"], "Error: No such option: --metrics"),
        (["demo-teacher", "--steps", "x"], "Invalid value for '--steps'"),
        ([], "Usage: "),  # a bare command shows its help
        (["train", "--resume", "--auto-resume"], "--resume and --auto-resume exclude each other"),
    ],
)
def test_usage_errors_show_usage_and_exit_2_without_a_traceback(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_paths_that_cannot_be_used_are_one_line_errors(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    proc = run_cli("demo-data", "--out", str(a_file), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("zeroseg: error: ") and str(a_file) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_says_what_is_kept_and_exits_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo-teacher", "--out", str(tmp_path / "t"), "--steps", "100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt in a known state: training has started (its first line is out), not at an import.
    assert proc.stdout.readline().startswith("training the demo teacher"), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert "zeroseg: interrupted" in err and "kept" not in err and "Traceback" not in err  # it keeps nothing
    from pipeline.cli import interrupted

    assert "finished shards are kept" in interrupted(["teacher-cache", "--out", "s.zarr"])
    assert interrupted(["segment", "x.jpg"]) == "zeroseg: interrupted"
