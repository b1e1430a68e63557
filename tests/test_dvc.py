"""The DVC contract, on the project's real dvc.yaml in a temporary git repository."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import dvc

pytestmark = pytest.mark.slow


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
