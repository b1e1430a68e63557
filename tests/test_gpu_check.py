"""The prepared GPU check (bench/gpu_check.sh), run on the CPU in its dry-run mode.

The check runs on a GPU a few minutes per session at most; this runs its commands, flags and
report here with a small teacher and the tiny student, so that a broken step shows up in CI
and not in the GPU slot. The figures are CPU figures and are not asserted, only that each step
produced them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_produces_every_figure_and_the_report(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "BUDGET": "900",
           "STEPS": "stage1 stage2 inference stage1_pure profile",  # the tests step runs pytest: CI runs those tests already
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not (tmp_path / "skipped.txt").exists()

    s1 = json.loads((tmp_path / "stage1.json").read_text())
    assert s1["model"] == "ViT-S-32" and s1["pipelined"]["views"] == 16 * 30 and s1["naive"]["images"] == 1
    assert s1["gflops_per_view"] > 0 and s1["speedup_steady"] > 0
    assert set(s1["pipelined"]["split"]) >= {"decode_thread_s", "views_s", "model_s", "write_thread_s", "wall_s"}
    pure = json.loads((tmp_path / "stage1_pure.json").read_text())
    assert pure["precision"] == "pure_bf16" and pure["pipelined"]["views"] == 8 * 30
    s2 = json.loads((tmp_path / "stage2.json").read_text())
    assert s2["compute"]["variant"] == "zeroseg_micro" and s2["compute"]["gflops_per_image"] > 0
    for source in ("decode", "cache"):
        assert s2["end_to_end"][source]["steps"] == 2 and s2["end_to_end"][source]["images_per_s_second_half"] > 0
    assert json.loads((tmp_path / "inference.json").read_text())["images_per_s"] > 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["teacher"]["views"] == 16 and prof["teacher"]["wall_ms_per_iter"] > 0 and prof["student"]["wall_ms_per_iter"] > 0
    assert "aten::" in (tmp_path / "profile_teacher.txt").read_text() and "aten::" in (tmp_path / "profile_student.txt").read_text()

    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check\n\nDevice: CPU dry run")
    for heading in ("## Stage one (ViT-S-32, bf16", "## Stage two (zeroseg_micro", "end to end, decoding the JPEGs",
                    "end to end, images stored in the cache", "## Stage one, pure_bf16", "## Inference (zeroseg_micro",
                    "## Profile of the teacher's forward (ViT-S-32, 16 per iteration)", "## Profile of a student training step (zeroseg_micro, 8 per iteration)"):
        assert heading in report
