"""Stage one on dask.distributed: 2 spawned worker processes on the CPU build the local executor's bytes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import dask
import numpy as np
import pytest
import zarr
from conftest import write_params
from helpers import write_slow_images

import cache_schema as cs
from pipeline.config import load_params
from pipeline.core.errors import InputError
from pipeline.teacher.run import run_teacher_cache

distributed = pytest.importorskip("distributed", reason="the dask executor needs dask.distributed (pip install -e '.[test]')")

ARRAYS = [cs.STATUS, cs.FAILURES, cs.PATHS] + [cs.views_array(g) for g in (1, 2, 3, 4)] + [cs.progress_array(g) for g in (1, 2, 3, 4)]


def assert_same_store(a, b, more=()):
    """Every array equal bit for bit (float16 compared as bits, so NaN rows must match too)."""
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS + list(more):
        x, y = ga[name][:], gb[name][:]
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        np.testing.assert_array_equal(x, y, err_msg=name)
    pick = lambda attrs: {k: v for k, v in attrs.items() if k != "provenance"}  # noqa: E731
    assert pick(dict(ga.attrs)) == pick(dict(gb.attrs))


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (nanny: a killed worker is restarted), and a client to it."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
    client = distributed.Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory, demo_dir):
    """The 8 demo scenes and 2 files that fail to decode, so batches skip rows inside shards."""
    folder = tmp_path_factory.mktemp("mixed")
    for p in sorted((demo_dir / "images").iterdir())[:8]:
        shutil.copy(p, folder / p.name)
    (folder / "scene_000002b.jpg").write_bytes(b"")
    (folder / "scene_000005b.jpg").write_text("not an image")
    return folder


def test_own_local_cluster_builds_the_local_executors_bytes(tmp_path, mixed_images):
    # batch_size 3 in shards of 4 rows, with a failed row in two shards: batches [3,1], [3], [3,1]...
    params = write_params(tmp_path / "params.yaml", mixed_images, tmp_path / "caches", teacher={"batch_size": 3}, cache={"student_image_size": 24})
    local = run_teacher_cache(load_params(params), str(tmp_path / "local.zarr"), progress=False)
    dask = run_teacher_cache(load_params(params, ["teacher.executor=dask", "teacher.dask_workers=2"]), str(tmp_path / "dask.zarr"), progress=False)
    assert dask.complete and dask.shards_written == local.shards_written == 3
    assert dask.views_computed == local.views_computed == 8 * 30 and dask.failed == local.failed == 2
    assert dask.failures == local.failures and set(dask.failures) == {"scene_000002b.jpg", "scene_000005b.jpg"}
    assert_same_store(tmp_path / "local.zarr", tmp_path / "dask.zarr", [cs.images_array(24), cs.images_progress_array(24)])


def test_resume_on_a_scheduler_computes_only_unmarked_shards(tmp_path, mixed_images, cluster):
    _, client = cluster
    params = write_params(tmp_path / "params.yaml", mixed_images, tmp_path / "caches", teacher={"batch_size": 3})
    on_dask = load_params(params, ["teacher.executor=dask", f"teacher.dask_address={client.scheduler.address}"])
    store = tmp_path / "t.zarr"
    run_teacher_cache(on_dask, str(store), progress=False)
    group = zarr.open_group(store, mode="r+")
    group[cs.progress_array(3)][1] = 0  # as if the run had died before marking shard 1 of 3x3
    group[cs.views_array(3)][4:8] = np.zeros((4, 9, 32), np.float16)
    again = run_teacher_cache(on_dask, str(store), progress=False)
    assert again.shards_skipped == 2 and again.shards_written == 1
    assert again.views_computed == 3 * 9  # the 3 ok rows of shard 1, for the 3x3 grid only
    run_teacher_cache(load_params(params), str(tmp_path / "local.zarr"), progress=False)
    assert_same_store(store, tmp_path / "local.zarr")


def _marked(markers) -> set[str]:
    """The shards whose marker file in `markers` is whole (zarr writes each through a `.partial` temp file)."""
    return {name for name in os.listdir(markers) if not name.endswith(".partial")}


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_only_its_unfinished_shard(tmp_path, cluster):
    _, client = cluster
    write_slow_images(tmp_path / "imgs", n=16)  # 8 shards of 2 slow PNGs
    params = write_params(
        tmp_path / "params.yaml", tmp_path / "imgs", tmp_path / "caches",
        teacher={"batch_size": 2, "decode_workers": 1}, cache={"shard_rows": 2, "chunk_rows": 2},
    )
    store = tmp_path / "t.zarr"
    result: list = []
    run = threading.Thread(target=lambda: result.append(run_teacher_cache(
        load_params(params, ["teacher.executor=dask", f"teacher.dask_address={client.scheduler.address}"]), str(store), progress=False)))
    run.start()
    markers = store / "progress" / "4x4" / "c"
    # The known state to kill in: a shard is marked done and a worker holds a shard task. No
    # wall-clock bound: the loop ends when a victim is found or the run ends (slow machines
    # only make the run longer).
    victim = None
    while victim is None and run.is_alive():
        busy = [w for w, keys in client.processing().items() if any(str(k).startswith("zeroseg-shard-") for k in keys)]
        if busy and markers.is_dir() and len(_marked(markers)) >= 1:
            victim = busy[0]
        else:
            run.join(0.02)
    assert victim is not None, "the run ended before a worker could be killed; make the images slower"
    pid = client.run(os.getpid, workers=[victim])[victim]
    done_before = _marked(markers)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    run.join(1800)
    assert not run.is_alive() and result, "the run did not finish after a worker was killed"
    stats = result[0]
    assert 0 < len(done_before) < 8 and stats.complete
    # Wherever the kill lands in the victim's shard, every view of the 8 shards is accounted
    # for exactly once: computed by a task whose result came back, or recovered by the rerun of
    # the killed task (the victim may have marked some grids, or all, before it died: markers
    # are written grid by grid, 1x1 first, after the shard's data).
    assert stats.views_computed + stats.views_recovered == 8 * 2 * 30
    assert stats.shards_written + stats.shards_recovered == 8 and stats.shards_recovered <= 1
    assert stats.views_recovered in (0, 2 * 30) or stats.views_recovered in {2 * sum(g * g for g in grids) for grids in ((1,), (1, 2), (1, 2, 3))}
    # The store itself: every row ok, every shard of every grid marked, no NaN, and the same
    # bytes as a local build that was never interrupted.
    group = zarr.open_group(store, mode="r")
    assert np.all(group[cs.STATUS][:] == cs.STATUS_OK) and group.attrs["complete"]
    for g in (1, 2, 3, 4):
        assert np.all(group[cs.progress_array(g)][:] == 1) and group[cs.views_array(g)].attrs["complete"]
        assert not np.isnan(group[cs.views_array(g)][:]).any()
    # Shards marked done before the kill were not computed again: their files predate the kill.
    for shard in done_before:
        assert (store / "views" / "4x4" / "c" / shard / "0" / "0").stat().st_mtime < killed_at, shard
    run_teacher_cache(load_params(params), str(tmp_path / "local.zarr"), progress=False)
    assert_same_store(store, tmp_path / "local.zarr")


def test_dask_refuses_a_memory_store_and_a_missing_scheduler(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", "memory://caches")
    with pytest.raises(InputError, match="memory:// store lives in one process"):
        run_teacher_cache(load_params(params, ["teacher.executor=dask"]), progress=False)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(InputError, match="cannot reach a dask scheduler at tcp://127.0.0.1:9"):
        run_teacher_cache(load_params(params, ["teacher.executor=dask", "teacher.dask_address=tcp://127.0.0.1:9"]), str(tmp_path / "t.zarr"), progress=False)


def test_a_rerun_task_recovers_what_its_killed_attempt_marked_and_computes_the_rest(tmp_path, mixed_images):
    """The task a dead worker leaves is rerun: it must count, not recompute, the grids already marked."""
    from pipeline.cache.manifest import build_manifest
    from pipeline.cache.store import CacheStore, ShardWork
    from pipeline.teacher.dask_executor import shard_task, worker_teacher

    params = load_params(write_params(tmp_path / "params.yaml", mixed_images, tmp_path / "caches", teacher={"batch_size": 3}))
    store = tmp_path / "t.zarr"
    run_teacher_cache(params, str(store), progress=False)
    shutil.copytree(store, tmp_path / "reference.zarr")
    group = zarr.open_group(store, mode="r+")
    fingerprint, fields = group.attrs["fingerprint"], worker_teacher(params.teacher).identity.fingerprint_fields()
    manifest = build_manifest(params.data.images, progress=False)
    shard_paths = {r: manifest.paths[r] for r in range(4, 8)}  # shard 1: rows 4-7, one of them failed
    ok = int(np.sum(group[cs.STATUS][4:8] == cs.STATUS_OK))
    assert ok == 3
    # As if the killed attempt had marked 1x1 and died before 2x2's marker.
    for g in (2, 3, 4):
        group[cs.progress_array(g)][1] = 0
        group[cs.views_array(g)][4:8] = np.zeros((4, g * g, 32), np.float16)
    every = ShardWork(grids=(1, 2, 3, 4))
    stats = shard_task(str(store), fingerprint, 1, every, str(manifest.root), shard_paths, params, fields)
    assert (stats.views_recovered, stats.views_computed, stats.shards_written, stats.shards_recovered) == (ok * 1, ok * 29, 1, 0)
    assert CacheStore.open(str(store), fingerprint).finalize()
    assert_same_store(store, tmp_path / "reference.zarr")
    # As if it had marked every grid and died before its result reached the client.
    again = shard_task(str(store), fingerprint, 1, every, str(manifest.root), shard_paths, params, fields)
    assert (again.views_recovered, again.views_computed, again.shards_written, again.shards_recovered) == (ok * 30, 0, 0, 1)
    assert_same_store(store, tmp_path / "reference.zarr")
