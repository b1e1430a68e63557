"""The DVC contract, on the project's real dvc.yaml in a temporary git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_TEACHER

pytestmark = pytest.mark.slow


def dvc(cwd, *args):
    # Stage commands say `python`: make it this interpreter, as an activated venv would.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the project's code and pipeline, with params shrunk to the tiny teacher."""
    for name in ("pipeline", "stages", "cache_schema", "assets"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(demo_train=6, demo_eval=2, demo_size=48)
    params["teacher"].update(TINY_TEACHER)
    params["cache"].update(shard_rows=4, chunk_rows=2)
    params["student"].update(variant="zeroseg_micro")
    params["train"].update(epochs=1, warmup_epochs=0, batch_size=2, micro_batch=2, num_workers=0, log_every=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=tmp_path, check=True)
    return tmp_path


def set_param(project, section, key, value):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_everything_and_params_edits_make_exactly_their_stages_stale(project):
    dvc(project, "repro")
    store = project / "caches" / "teacher.zarr"
    assert (store / "views" / "4x4").is_dir()
    assert (project / "models" / "student" / "checkpoint.pt").is_file()
    metrics = dvc(project, "metrics", "show")
    assert "loss" in metrics and "miou.student" in metrics and "miou.base" in metrics and "oracle.grid" in metrics
    assert len(list((project / "outputs" / "eval" / "demo").glob("*_student.png"))) == 2
    demo = json.loads((project / "metrics" / "demo.json").read_text())
    for value in [*demo["miou"].values(), *demo["oracle"].values()]:
        assert 0 <= value <= 1
    assert set(demo["miou"]) == {"student", "base", "training_free", "trivial"}
    assert demo["segments_per_window"] > 1  # held-out scenes: the grouping did not collapse
    assert "up to date" in dvc(project, "status")
    set_param(project, "eval", "stride", 16)
    status = dvc(project, "status")
    assert "evaluate:" in status and "train:" not in status and "train_base:" not in status and "teacher_cache:" not in status
    set_param(project, "eval", "stride", 32)
    set_param(project, "train", "base_lr", 0.002)
    status = dvc(project, "status")
    assert "train:" in status and "teacher_cache:" not in status and "demo_data:" not in status
    set_param(project, "train", "base_lr", 0.001)
    assert "up to date" in dvc(project, "status")
    set_param(project, "teacher", "seed", 7)
    status = dvc(project, "status")
    assert "teacher_cache:" in status and "demo_data:" not in status
    assert "modified:" in status and "teacher" in status
    dvc(project, "repro")  # the store built for the old teacher is replaced, not reused
    assert "up to date" in dvc(project, "status")
    import zarr

    assert zarr.open_group(store, mode="r").attrs["complete"] is True
    # Another dataset: its metrics file is the stage's output, and the old one does not linger.
    set_param(project, "eval", "datasets", {"voc_layout": "data/demo/eval"})
    status = dvc(project, "status")
    assert "evaluate:" in status and "train:" not in status and "teacher_cache:" not in status
    dvc(project, "repro")
    assert sorted(p.name for p in (project / "metrics").iterdir()) == ["voc_layout.json"]
    assert "metrics/voc_layout.json" in dvc(project, "metrics", "show")
    assert "up to date" in dvc(project, "status")
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "validate", str(store), "--params", "params.yaml"],
        cwd=project, capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
