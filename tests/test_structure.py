"""The house rules: the import contract, DVC deps that hold every line a stage runs, small modules."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml
from conftest import REPO

# Each DVC stage (of every pipeline file) and the module its command runs (through pipeline/cli.py).
STAGE_ENTRIES = {
    ("dvc.yaml", "demo_data"): "pipeline.demo.data",
    ("dvc.yaml", "teacher_cache"): "pipeline.teacher.run",
    ("dvc.yaml", "train"): "pipeline.training.run",
    ("dvc.yaml", "evaluate"): "pipeline.evaluation.run",
    ("dvc.yaml", "evaluate_val"): "pipeline.evaluation.run",
    ("ablations/dvc.yaml", "train_ablation"): "pipeline.training.run",
    ("ablations/dvc.yaml", "evaluate_ablations"): "pipeline.evaluation.run",
}


def stage_script(definition: dict) -> str:
    """The stages/ script a stage's command runs: `python -m stages.NAME ...`."""
    cmd = (definition.get("do") or definition)["cmd"]
    return cmd.split("python -m ", 1)[1].split()[0]


# Modules allowed past ~300 lines, and why splitting them would not read better.
LONG_MODULES = {
    "pipeline/cli.py": "one typer command per function: the whole command line in one place, each command a few lines",
    "pipeline/evaluation/datasets.py": "one small class per benchmark layout and the registry that names them",
    "pipeline/cache/store.py": "the store's array layout and its shard bookkeeping: every write's invariant in one class",
    "pipeline/teacher/shards.py": "the per-shard pipeline (decode threads, teacher, writer thread) and its resume, one flow",
}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("pipeline", "cache_schema", "stages")


def test_the_import_contract_holds():
    """teacher, training and evaluation never import each other; each layer imports only those below."""
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES), ids=lambda s: f"{s[0]}:{s[1]}")
def test_a_stages_deps_hold_every_module_it_runs(stage, graph):
    pipeline_file, name = stage
    definition = yaml.safe_load((REPO / pipeline_file).read_text())["stages"][name]
    body = definition.get("do") or definition  # foreach stages keep theirs under do:
    root = (REPO / pipeline_file).parent / body.get("wdir", ".")
    dep_paths = [(root / d).resolve() for d in body["deps"] if "${" not in d]
    entry = STAGE_ENTRIES[stage]
    modules = graph.find_upstream_modules(entry) | {entry, "pipeline.cli", stage_script(definition)}
    missing = []
    for module in sorted(modules):
        rel = Path(*module.split("."))
        file = REPO / rel / "__init__.py" if (REPO / rel).is_dir() else REPO / rel.with_suffix(".py")
        assert file.is_file(), file
        if not any(file == d or d in file.parents for d in dep_paths):
            missing.append(str(file.relative_to(REPO)))
    assert not missing, f"{pipeline_file}: stage {name} runs code outside its deps: {missing}"


def test_modules_stay_small_or_say_why():
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / "pipeline").rglob("*.py")) if (n := len(p.read_text().splitlines())) > 320}
    unexplained = {p: n for p, n in long.items() if p not in LONG_MODULES}
    assert not unexplained, f"modules past 320 lines without a reason in LONG_MODULES: {unexplained}"
    assert all(n <= 400 for n in long.values()), long
    assert set(LONG_MODULES) <= set(long), f"no longer long, drop them from LONG_MODULES: {set(LONG_MODULES) - set(long)}"
