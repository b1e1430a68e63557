"""The DVC contract, on the project's real dvc.yaml in a temporary git repository."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, dvc, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """The tiny project after its first `dvc repro`, built once for the module's tests."""
    path = make_project(tmp_path_factory.mktemp("reproduced") / "project")
    dvc(path, "repro")
    return path


@pytest.fixture
def built(reproduced, tmp_path):
    """A copy of the reproduced project (its git history, DVC cache and outputs) of the test's own."""
    shutil.copytree(reproduced, tmp_path / "project", symlinks=True)
    return tmp_path / "project"


def set_param(project, section, key, value):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_everything_and_params_edits_make_exactly_their_stages_stale(built):
    project = built  # after `dvc repro`
    store = project / "caches" / "teacher.zarr"
    assert (store / "views" / "4x4").is_dir() and (store / "views" / "8x8").is_dir()  # the crops and the dense grid (cache.dense_grids)
    assert (project / "models" / "student" / "checkpoint.pt").is_file()
    metrics = dvc(project, "metrics", "show")
    assert "miou.student" in metrics and "miou_fg.student" in metrics and "loss" not in metrics  # the scoreboard, not the training's figures
    assert max(len(line) for line in metrics.splitlines()) <= 200  # a terminal's width
    assert len(list((project / "outputs" / "eval" / "demo").glob("*_student.png"))) == 2
    detail = json.loads((project / "metrics_detail" / "demo.json").read_text())
    for rule in ("class", "probability"):  # the demo's rule, and GroupViT's
        miou = detail["rules"][rule]["miou"]
        assert set(miou) == {"student", "student_1scale", "training_free", "maskclip", "grouped_maskclip", "trivial"}  # params.yaml's eval.baselines
        assert all(0 <= v <= 1 for v in miou.values())
    assert detail["images"] == 2 and detail["segments_per_window"] > 1  # held-out scenes: the grouping did not collapse
    assert "up to date" in dvc(project, "status", "dvc.yaml")
    set_param(project, "eval", "stride", 16)
    status = dvc(project, "status", "dvc.yaml")
    assert "evaluate:" in status and "train:" not in status and "teacher_cache:" not in status
    set_param(project, "eval", "stride", 32)
    base_lr = yaml.safe_load((project / "params.yaml").read_text())["train"]["base_lr"]
    set_param(project, "train", "base_lr", base_lr * 2)
    status = dvc(project, "status", "dvc.yaml")
    assert "train:" in status and "teacher_cache:" not in status and "demo_data" not in status
    set_param(project, "train", "base_lr", base_lr)
    assert "up to date" in dvc(project, "status", "dvc.yaml")
    set_param(project, "data", "demo_test", 3)  # the held-out split's size: that split alone is stale (evaluate follows once its scenes change)
    status = dvc(project, "status", "dvc.yaml")
    assert "demo_data@test:" in status
    assert "teacher_cache:" not in status and "train:" not in status and "demo_data@train:" not in status and "evaluate_val:" not in status
    set_param(project, "data", "demo_test", 2)
    assert "up to date" in dvc(project, "status", "dvc.yaml")
    set_param(project, "teacher", "seed", 7)
    status = dvc(project, "status", "dvc.yaml")
    assert "teacher_cache:" in status and "demo_data" not in status
    assert "modified:" in status and "teacher" in status
    dvc(project, "repro")  # the store built for the old teacher is replaced, not reused
    assert "up to date" in dvc(project, "status", "dvc.yaml")
    import zarr

    assert zarr.open_group(store, mode="r").attrs["complete"] is True
    # Another dataset: its metrics file is the stage's output, and the old one does not linger.
    set_param(project, "eval", "datasets", {"voc_layout": "data/demo_test/eval"})
    status = dvc(project, "status", "dvc.yaml")
    assert "evaluate:" in status and "train:" not in status and "teacher_cache:" not in status
    dvc(project, "repro")
    assert sorted(p.name for p in (project / "metrics").iterdir()) == ["voc_layout.json"]
    assert "metrics/voc_layout.json" in dvc(project, "metrics", "show")
    assert "up to date" in dvc(project, "status", "dvc.yaml")
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "validate", str(store), "--params", "params.yaml"],
        cwd=project, capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr


def test_the_recipe_sweep_runs_as_dvc_experiments_and_tabulates_them_over_seeds(built):
    """`bench.science.sweep`: one DVC experiment per (recipe, seed), a table read back from `dvc exp show`."""
    project = built  # after `dvc repro`
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)  # dvc.lock and the metrics: the experiments' baseline
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "baseline"], cwd=project, check=True)
    baseline = json.loads((project / "metrics_val" / "demo.json").read_text())
    sweep = [sys.executable, "-m", "bench.science.sweep", "--repo", str(project), "--recipes", "default", "--seeds", "0,1"]
    run = subprocess.run([*sweep[:3], "run", *sweep[3:], "--json", str(project / "sweep.json")], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "default-s0: done" in run.stdout and "default-s1: done" in run.stdout
    rows = {r["experiment"]: r for r in json.loads((project / "sweep.json").read_text())["rows"]}
    assert set(rows) == {"default-s0", "default-s1"}
    # Seed 0 is the baseline's params: the same student, so the same validation figures.
    assert rows["default-s0"]["student"] == baseline["miou"]["student"] and rows["default-s0"]["student_fg"] == baseline["miou_fg"]["student"]
    bar = rows["default-s0"]["baseline"]
    assert bar in ("maskclip", "training_free") and rows["default-s0"]["baseline_miou"] == baseline["miou"][bar]  # the strongest teacher-alone method
    assert rows["default-s0"]["ci_lo"] == baseline["diff_ci95_lo"]["miou"]
    assert "| default | 0,1 |" in run.stdout
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=project, capture_output=True, text=True).stdout == ""  # the workspace untouched
    again = subprocess.run([*sweep[:3], "run", *sweep[3:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "default-s1: already there, skipped" in again.stdout
    other = subprocess.run([*sweep[:3], "run", "--repo", str(project), "--recipes", "default", "--seeds", "1", "--set", "train.epochs=2"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode == 1 and "experiment default-s1 exists with other params (train.epochs=2 differ)" in other.stderr
    # A new commit is a new baseline: its table is empty until --all-commits reads the earlier one's.
    (project / "NOTES.md").write_text("a commit after the sweep\n")
    subprocess.run(["git", "add", "NOTES.md"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "later"], cwd=project, check=True)
    table = [sys.executable, "-m", "bench.science.sweep", "table", "--repo", str(project), "--recipes", "default"]
    now = subprocess.run(table, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert now.returncode == 0 and "| default |" not in now.stdout
    earlier = subprocess.run([*table, "--all-commits"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert earlier.returncode == 0 and "| default | 0,1 |" in earlier.stdout


def test_sweep_quotes_a_value_with_commas_for_dvc():
    """DVC reads `-S` in Hydra's grammar, where "a, b" is a sweep of two runs: a vocabulary must be quoted."""
    from bench.science.sweep import _holds, dvc_override

    assert dvc_override("loss.anchor_vocabulary=circle, square, ring") == "loss.anchor_vocabulary='circle, square, ring'"
    for kept in ("loss.grids=[1,2,3]", "loss.anchor_vocabulary='a, b'", "train.epochs=2", "loss.anchor_vocabulary=@data/demo/classes.txt"):
        assert dvc_override(kept) == kept
    # either spelling is found in the params an experiment recorded
    recorded = {"loss": {"anchor_vocabulary": "circle, square, ring"}}
    assert _holds(recorded, "loss.anchor_vocabulary=circle, square, ring")
    assert _holds(recorded, dvc_override("loss.anchor_vocabulary=circle, square, ring"))
