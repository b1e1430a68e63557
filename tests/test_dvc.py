"""The DVC contract, on the project's real dvc.yaml in a temporary git repository."""

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
    for name in ("pipeline", "stages", "cache_schema"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(demo_train=6, demo_eval=2, demo_size=48)
    params["teacher"].update(TINY_TEACHER)
    params["cache"].update(shard_rows=4, chunk_rows=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def set_param(project, section, key, value):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_the_cache_and_teacher_edits_make_it_stale(project):
    dvc(project, "repro")
    store = project / "caches" / "teacher.zarr"
    assert (store / "views" / "4x4").is_dir()
    assert "up to date" in dvc(project, "status")
    set_param(project, "teacher", "seed", 7)
    status = dvc(project, "status")
    assert "teacher_cache:" in status and "demo_data:" not in status
    assert "modified:" in status and "teacher" in status
    dvc(project, "repro")  # the store built for the old teacher is replaced, not reused
    assert "up to date" in dvc(project, "status")
    import zarr

    assert zarr.open_group(store, mode="r").attrs["complete"] is True
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cache", "validate", str(store), "--params", "params.yaml"],
        cwd=project, capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
