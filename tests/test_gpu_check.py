"""The prepared GPU check (bench/gpu/check.sh), run on the CPU in its dry-run mode.

The check runs on a GPU a few minutes per session at most; this runs its commands, flags and
report here with a small teacher and the tiny student, so that a broken step shows up in CI
and not in the GPU slot. The figures are CPU figures and are not asserted, only that each step
produced them, and that a step that produced none can never end the check with exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, steps: str, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the dry-run check; (the process, the rows of its steps.tsv)."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "STEPS": steps,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", "bench/gpu/check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    return done, [row.split("\t") for row in (out / "steps.tsv").read_text().splitlines()]


def test_gpu_check_dry_run_produces_every_figure_and_the_report(tmp_path):
    # A generous budget: the per-step limits are 4x the GPU's in a dry run, for a busy 2-core machine.
    # The tests step runs pytest: CI runs those tests already.
    done, steps = gpu_check(tmp_path, "stage1 stage2 inference stage1_pure profile", BUDGET="3000")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [(name, outcome) for name, outcome, *_ in steps] == [(s, "ok") for s in ("stage1", "stage2", "inference", "stage1_pure", "profile")]
    assert not (tmp_path / "skipped.txt").exists() and not (tmp_path / "failed.txt").exists()

    s1 = json.loads((tmp_path / "stage1.json").read_text())
    assert s1["model"] == "ViT-S-32" and s1["pipelined"]["views"] == 8 * 30 and s1["naive"]["images"] == 1
    assert s1["gflops_per_view"] > 0 and s1["speedup_steady"] > 0
    assert set(s1["pipelined"]["split"]) >= {"decode_thread_s", "views_s", "model_s", "write_thread_s", "wall_s"}
    pure = json.loads((tmp_path / "stage1_pure.json").read_text())
    assert pure["precision"] == "pure_bf16" and pure["pipelined"]["views"] == 4 * 30
    s2 = json.loads((tmp_path / "stage2.json").read_text())
    assert s2["compute"]["variant"] == "zeroseg_micro" and s2["compute"]["gflops_per_image"] > 0
    for source in ("decode", "cache"):
        assert s2["end_to_end"][source]["steps"] == 2 and s2["end_to_end"][source]["images_per_s_second_half"] > 0
    assert json.loads((tmp_path / "inference.json").read_text())["images_per_s"] > 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["teacher"]["views"] == 8 and prof["teacher"]["wall_ms_per_iter"] > 0 and prof["student"]["wall_ms_per_iter"] > 0
    assert "aten::" in (tmp_path / "profile_teacher.txt").read_text() and "aten::" in (tmp_path / "profile_student.txt").read_text()

    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check\n\nDevice: CPU dry run")
    assert "| stage1 | ok |" in report and "| profile | ok |" in report
    for heading in ("## Stage one (ViT-S-32, bf16", "## Stage two (zeroseg_micro", "end to end, decoding the JPEGs",
                    "end to end, images stored in the cache", "## Stage one, pure_bf16", "## Inference (zeroseg_micro",
                    "## Profile of the teacher's forward (ViT-S-32, 8 per iteration)", "## Profile of a student training step (zeroseg_micro, 8 per iteration)"):
        assert heading in report


def test_a_step_past_its_limit_is_listed_as_failed_with_its_log_and_the_check_exits_1(tmp_path):
    # The failure this guards against: a step killed by its time limit used to leave no figures,
    # no line in skipped.txt and an exit status of 0. LIMIT_CAP=1 forces that time-out.
    done, steps = gpu_check(tmp_path, "stage1 inference", BUDGET="3000", LIMIT_CAP="1")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert [(name, outcome, detail) for name, outcome, _, detail in steps] == [
        ("stage1", "failed", "ran past its limit of 1 s"), ("inference", "failed", "ran past its limit of 1 s")]
    failed = (tmp_path / "failed.txt").read_text()
    assert "== stage1: failed after" in failed and "last lines of stage1.log" in failed
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| stage1 | failed |" in report and "| inference | failed |" in report and "== inference: failed after" in report
    assert not (tmp_path / "stage1.json").exists()


def test_steps_left_without_budget_are_listed_as_skipped_and_the_check_exits_2(tmp_path):
    done, steps = gpu_check(tmp_path, "stage1 stage2", BUDGET="10")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert [(name, outcome) for name, outcome, *_ in steps] == [("stage1", "skipped"), ("stage2", "skipped")]
    assert (tmp_path / "skipped.txt").read_text().count("skipped") == 2
    assert "| stage2 | skipped |" in (tmp_path / "gpu_check.md").read_text()
