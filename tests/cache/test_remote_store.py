"""Stores at fsspec URLs: an S3 API served by moto on loopback (a real s3fs client), and memory://."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import TINY_TRAIN, run_cli

import cache_schema as cs
from pipeline.cache.identity import default_store_url, identity_from_params
from pipeline.cache.info import describe
from pipeline.cache.reader import load_targets
from pipeline.config import load_params
from pipeline.core.errors import InputError
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.data import CachePairs
from pipeline.training.run import data_root, run_training


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16)  # float16 compared bit for bit, NaN included


def test_stage_one_writes_to_s3_and_stage_two_trains_from_it(s3, built_cache, tmp_path):
    local, params_file = built_cache
    params = load_params(params_file, [f"cache.root={s3}/caches"])
    stats = run_teacher_cache(params, progress=False)
    identity = identity_from_params(params, progress=False)
    assert stats.store == default_store_url(f"{s3}/caches", identity)
    assert stats.store.startswith(f"{s3}/caches/zeroseg-test-vit-") and stats.complete and stats.views_computed == 8 * 30
    url = stats.store
    np.testing.assert_array_equal(bits(load_targets(url, [1, 2, 3, 4])), bits(load_targets(local, [1, 2, 3, 4])))
    again = run_teacher_cache(params, progress=False)  # the store is found again, and reused
    assert again.store == url and again.views_computed == 0 and again.shards_skipped == 2
    assert cs.validate(url, identity, (1, 2, 3, 4))["fingerprint"] == cs.fingerprint(identity)
    with pytest.raises(InputError, match=r"built for other params \(teacher.weights_sha256: store has"):
        run_teacher_cache(load_params(params_file, ["teacher.seed=3"]), url, progress=False)
    # Stage two's data path reads the rows from S3 ...
    pairs = CachePairs(url, data_root(params.data.images), (1, 2), 32, shuffle_buffer=4)
    got = {row: targets.numpy() for _, targets, row in pairs}
    assert sorted(got) == list(range(8))
    expected = load_targets(local, [1, 2])  # [8, 5, 32]
    for row, targets in got.items():
        np.testing.assert_array_equal(bits(targets), bits(expected[row]))
    # ... and so does training, with a DataLoader worker process (forkserver) opening the store itself.
    summary = run_training(load_params(params_file, [*TINY_TRAIN, "train.epochs=1", "train.num_workers=1"]), url, tmp_path / "run", progress=False)
    assert summary.step == 1 and np.isfinite(summary.losses["distill"])
    info = run_cli("cache", "info", url).stdout
    assert f"store        {url}" in info and "rows         pending 0, ok 8, failed 0" in info


def test_memory_url_store_round_trips(built_cache):
    local, params_file = built_cache
    params = load_params(params_file, ["cache.root=memory://"])
    stats = run_teacher_cache(params, progress=False)
    assert stats.store.startswith("memory://zeroseg-test-vit-") and stats.complete
    np.testing.assert_array_equal(bits(load_targets(stats.store, [1, 2, 3, 4])), bits(load_targets(local, [1, 2, 3, 4])))
    assert describe(stats.store)["rows"] == {"pending": 0, "ok": 8, "failed": 0}
    cs.validate(stats.store, grids=(1, 2, 3, 4))
    assert run_teacher_cache(params, progress=False).views_computed == 0


def test_urls_a_filesystem_cannot_serve_are_one_line_errors(built_cache, monkeypatch):
    _, params_file = built_cache
    with pytest.raises(InputError, match="nosuchfs://x/t.zarr: ValueError: Protocol not known: nosuchfs"):
        run_teacher_cache(load_params(params_file), "nosuchfs://x/t.zarr", progress=False)
    with pytest.raises(cs.CacheSchemaError, match=r"nosuchfs://x/t.zarr: cannot open it \(ValueError: Protocol not known"):
        cs.validate("nosuchfs://x/t.zarr")
    s3fs = pytest.importorskip("s3fs", reason="needs s3fs")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(key, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(InputError, match="s3://no-such-bucket/t.zarr: NoCredentialsError: Unable to locate credentials"):
        run_teacher_cache(load_params(params_file), "s3://no-such-bucket/t.zarr", progress=False)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_a_dask_worker_writes_to_s3_from_its_own_environment(s3, built_cache):
    local, params_file = built_cache
    params = load_params(params_file, ["teacher.executor=dask", "teacher.dask_workers=1"])
    stats = run_teacher_cache(params, f"{s3}/dask/t.zarr", progress=False)  # the worker process inherits AWS_*
    assert stats.complete and stats.shards_written == 2
    np.testing.assert_array_equal(bits(load_targets(stats.store, [1, 2, 3, 4])), bits(load_targets(local, [1, 2, 3, 4])))
