"""Shared fixtures: a tiny open_clip teacher, generated images, params files, an 8-row cache."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.demo.data import write_demo_dataset

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
    from pipeline.teacher.run import run_teacher_cache

    tmp = tmp_path_factory.mktemp("cache")
    params = write_params(tmp / "params.yaml", demo_dir / "images", tmp / "caches")
    store = tmp / "caches" / "teacher.zarr"
    run_teacher_cache(load_params(params), str(store), progress=False)
    return store, params


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `zeroseg ARGS` and return what a shell would see (exit code, stdout, stderr).

    In this interpreter by default: the CLI's own entry point (pipeline.cli.main, exit codes and
    one-line errors included) with stdout and stderr captured, which spares each call the ~5 s
    of importing torch and open_clip afresh. `fresh=True` runs it in a new interpreter, as a user
    would, for what only a process can show: signals, the environment, a folder with nothing of
    the repository in it.
    """
    if fresh:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=600)
    else:
        proc = _run_cli_here(list(args), cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"zeroseg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_cli_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    # A handler of the root logger's own, as an interpreter without pytest's capture has none and
    # Python prints a warning's message alone on stderr (logging.lastResort).
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    try:
        before = os.getcwd()
    except FileNotFoundError:  # an earlier test's folder, since removed
        before = str(REPO)
    os.chdir(cwd)
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.removeHandler(handler)
        os.chdir(before)
    return subprocess.CompletedProcess(["zeroseg", *args], code, out.getvalue(), err.getvalue())


# The slow tier (by file name and test name): tests that took 5 s or more each (`pytest --durations=80` on the 2-core CI-like
# machine under load). `pytest -m "not slow"` runs the rest, a fast tier of about a minute; the
# README's command runs everything. Tests marked in their own files count too.
SLOW_TESTS = {
    "test_cache_schema.py::test_cli_validate_exit_codes",
    "test_cli.py::test_ctrl_c_says_what_is_kept_and_exits_130",
    "test_dask_executor.py::test_a_worker_killed_mid_run_loses_only_its_unfinished_shard",
    "test_dask_executor.py::test_own_local_cluster_builds_the_local_executors_bytes",
    "test_dask_executor.py::test_resume_on_a_scheduler_computes_only_unmarked_shards",
    "test_dvc.py::test_repro_builds_everything_and_params_edits_make_exactly_their_stages_stale",
    "test_first_hour.py::test_a_checkpoint_of_another_model_definition_is_not_continued",
    "test_first_hour.py::test_a_trained_model_is_used_from_anywhere_with_its_checkpoint_alone",
    "test_gpu_check.py::test_a_step_past_its_limit_is_listed_as_failed_with_its_log_and_the_check_exits_1",
    "test_gpu_check.py::test_gpu_check_dry_run_produces_every_figure_and_the_report",
    "test_gpu_check.py::test_steps_left_without_budget_are_listed_as_skipped_and_the_check_exits_2",
    "test_inference.py::test_evaluation_writes_the_science_metrics",
    "test_integrity.py::test_damage_in_s3_objects_is_found_and_repaired_to_identical_bytes",
    "test_integrity.py::test_deep_validation_names_every_damaged_shard_and_repair_restores_exactly_those",
    "test_integrity.py::test_training_refuses_a_damaged_shard_in_one_line_and_keeps_the_last_checkpoint",
    "test_inference.py::test_segment_command_writes_masks_and_overlays_of_the_input_size",
    "test_inference.py::test_segment_keeps_every_output_and_skips_what_it_cannot_read",
    "test_inference.py::test_segment_leaves_its_own_outputs_out_of_the_inputs",
    "test_remote_store.py::test_a_dask_worker_writes_to_s3_from_its_own_environment",
    "test_remote_store.py::test_stage_one_writes_to_s3_and_stage_two_trains_from_it",
    "test_sharing.py::test_a_read_only_shared_cache_is_validated_then_used_without_writes",
    "test_sharing.py::test_one_checkpoint_at_two_paths_is_one_teacher_and_old_path_keyed_stores_are_re_keyed",
    "test_sharing.py::test_team_b_pulls_team_as_cache_and_recomputes_nothing",
    "test_student_model.py::test_tiny_student_overfits_a_fixed_batch",
    "test_teacher.py::test_compiled_teacher_encodes_what_the_eager_one_does",
    "test_teacher_cache.py::test_every_bad_input_kind_in_one_run",
    "test_teacher_cache.py::test_killed_run_resumes_without_recomputing_finished_shards",
    "test_train.py::test_a_workers_input_error_reaches_the_user_as_its_own_one_line",
    "test_train.py::test_dvclive_rows_sit_at_their_steps_and_a_resume_logs_no_step_twice",
    "test_train.py::test_resume_continues_exactly",
    "test_train.py::test_sigterm_stops_training_with_its_worker_processes_and_keeps_the_checkpoint",
    "test_train.py::test_skipping_batches_with_workers_reproduces_the_rest_of_the_epoch",
    "test_train.py::test_the_stabilizers_train_and_region_matching_falls",
    "test_train.py::test_tiny_student_overfits_the_cache_and_every_term_falls",
    "test_train.py::test_torchrun_two_ranks_on_cpu",
    "test_train.py::test_training_on_a_damaged_store_stops_with_one_line",
    "test_train.py::test_workers_get_the_environment_their_loader_was_made_in",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.name.split('[')[0]}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


TINY_TRAIN = [
    "student.variant=zeroseg_micro", "train.batch_size=8", "train.micro_batch=4", "train.num_workers=0",
    "train.warmup_epochs=0", "train.log_every=1", "train.base_lr=0.05", "train.shuffle_buffer=8",
]


BUCKET = "zeroseg-test"


@pytest.fixture(scope="module")
def s3():
    """`s3://BUCKET` on a moto S3 server at 127.0.0.1:PORT; s3fs finds it through the AWS_* environment."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto's server mode: pip install 'moto[server]'")
    s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs: pip install s3fs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = pytest.MonkeyPatch()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.delenv(key, raising=False)
    env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_CONFIG_FILE", "/nonexistent")
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before carry no endpoint
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):  # moto keeps its buckets per process: another module's server may have made it
        fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    s3fs.S3FileSystem.clear_instance_cache()
    env.undo()
    server.stop()


def dvc(cwd, *args):
    # Stage commands say `python`: make it this interpreter, as an activated venv would.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the project's code and pipeline, with params shrunk to the tiny teacher."""
    return make_project(tmp_path)


def make_project(tmp_path: Path) -> Path:
    """A git repository at tmp_path holding the project's code and pipeline, its params shrunk to
    the tiny teacher, committed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages", "cache_schema", "assets"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(demo_train=6, demo_val=2, demo_test=2, demo_size=48)
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


def params_for(built_cache, *extra):
    _, params = built_cache
    return load_params(params, [*TINY_TRAIN, *extra])
