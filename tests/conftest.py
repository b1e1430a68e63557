"""Shared fixtures: a tiny open_clip teacher, generated images, params files, an 8-row cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.demo_data import write_demo_dataset

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ZEROSEG_STATE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "zeroseg-test-state"))

TINY_TEACHER = {"model": "zeroseg-test-vit", "pretrained": "", "precision": "fp32", "device": "cpu", "batch_size": 4, "decode_workers": 2}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """8 training scenes (64 px) and 4 held-out scenes, generated once per session."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, n_train=8, n_eval=4, size=64, seed=0)
    return out


def write_params(path: Path, images: Path | str, cache_root: Path | str, **sections) -> Path:
    """A params file for the tiny teacher; `sections` update it, e.g. cache={"grids": [1, 2]}."""
    params = {
        "data": {"images": str(images)},
        "teacher": dict(TINY_TEACHER),
        "cache": {"root": str(cache_root), "shard_rows": 4, "chunk_rows": 2},
    }
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def params_file(tmp_path, demo_dir) -> Path:
    return write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, demo_dir) -> tuple[Path, Path]:
    """(store, params file) of a complete 8-row cache with all four grids."""
    from pipeline.config import load_params
    from pipeline.teacher_cache import run_teacher_cache

    tmp = tmp_path_factory.mktemp("cache")
    params = write_params(tmp / "params.yaml", demo_dir / "images", tmp / "caches")
    store = tmp / "caches" / "teacher.zarr"
    run_teacher_cache(load_params(params), str(store), progress=False)
    return store, params


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `zeroseg ARGS` in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"zeroseg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
