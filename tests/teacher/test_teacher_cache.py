import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from bad_images import write_bad_images
from conftest import REPO, run_cli, write_params
from helpers import open_clip_reference, write_slow_images
from PIL import Image

import cache_schema as cs
from pipeline.cache.reader import load_targets
from pipeline.clip.model import Teacher
from pipeline.config import load_params
from pipeline.core.decode import decode_center_square
from pipeline.core.errors import InputError
from pipeline.core.views import make_views
from pipeline.teacher.run import run_teacher_cache


def test_store_layout_and_values_match_open_clip_per_crop(built_cache):
    store, params_path = built_cache
    group = zarr.open_group(store, mode="r")
    params = load_params(params_path)
    assert group.attrs["complete"] is True and group.attrs["schema"] == cs.SCHEMA_NAME
    assert group.attrs["grids"] == [1, 2, 3, 4]
    assert list(group[cs.PATHS][:]) == [f"scene_{i:06d}.jpg" for i in range(8)]
    assert np.all(group[cs.STATUS][:] == cs.STATUS_OK)
    for g in (1, 2, 3, 4):
        arr = group[cs.views_array(g)]
        assert arr.shape == (8, g * g, 32) and arr.dtype == np.float16 and arr.attrs["complete"]
        assert arr.shards == (4, g * g, 32) and arr.chunks == (2, g * g, 32)
    teacher = Teacher.load(params.teacher)
    targets = load_targets(store, [1, 2, 3, 4])  # [8, 30, 32]
    assert targets.shape == (8, 30, 32) and not np.isnan(targets).any()
    # Each stored view equals open_clip's preprocess + encode_image of the same PIL crop. Tolerance:
    # float16 storage (relative 1e-3) plus the resize difference (cosine > 0.999 measured).
    for row in (0, 5):
        square = decode_center_square(demo_path(store, group, row)).square
        ref = teacher.encode(open_clip_reference(teacher, square, [1, 2, 3, 4])).numpy()  # [30, 32]
        ours = targets[row].astype(np.float32)
        cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.999
        assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
        # and the fast path itself, in fp32, matches the stored float16 to storage precision
        fast = teacher.encode(make_views([torch.from_numpy(square)], [1, 2, 3, 4], teacher.spec)[0]).numpy()
        np.testing.assert_allclose(ours, fast.astype(np.float16).astype(np.float32), rtol=0, atol=0)


def demo_path(store, group, row):
    params = load_params(store.parent.parent / "params.yaml")
    return os.path.join(params.data.images, str(group[cs.PATHS][row]))


def test_load_targets_orders_grids_canonically(built_cache):
    store, _ = built_cache
    group = zarr.open_group(store, mode="r")
    t = load_targets(store, [3, 1], rows=np.array([1, 6]))
    assert t.shape == (2, 10, 32)
    np.testing.assert_array_equal(t[:, :1], group["views/1x1"][[1, 6]])
    np.testing.assert_array_equal(t[:, 1:], group["views/3x3"][[1, 6]])
    with pytest.raises(InputError, match="no views for grid 5x5"):
        load_targets(store, [5])


def test_every_bad_input_kind_in_one_run(tmp_path):
    expected = write_bad_images(tmp_path / "imgs")
    params = write_params(tmp_path / "params.yaml", tmp_path / "imgs", tmp_path / "caches")
    store = tmp_path / "caches" / "bad.zarr"
    stats = run_teacher_cache(load_params(params), str(store), progress=False)
    assert stats.complete
    info = json.loads(run_cli("cache", "info", str(store), "--json").stdout)
    paths = zarr.open_group(store, mode="r")[cs.PATHS][:]
    status = zarr.open_group(store, mode="r")[cs.STATUS][:]
    reasons = {f["path"]: f["reason"] for f in info["failures"]}
    for path, code in zip(paths, status):
        want, reason = expected[path]
        assert cs.STATUS_NAMES[int(code)] == want, path
        assert reason in reasons.get(path, ""), (path, reasons.get(path))
    n_failed = sum(1 for s, _ in expected.values() if s == "failed")
    assert info["rows"] == {"pending": 0, "ok": len(expected) - n_failed, "failed": n_failed}
    views = zarr.open_group(store, mode="r")["views/2x2"][:]
    assert np.isnan(views[status == cs.STATUS_FAILED]).all() and not np.isnan(views[status == cs.STATUS_OK]).any()
    text = run_cli("cache", "info", str(store)).stdout
    assert f"failures     {n_failed}:" in text and "bomb.png: decompression bomb" in text
    # a store that lost an array is described, the loss shown, and refused by validate
    shutil.rmtree(store / "views" / "2x2")
    damaged = run_cli("cache", "info", str(store))
    assert "2x2 (MISSING)" in damaged.stdout and "1x1 (complete)" in damaged.stdout
    assert run_cli("cache", "validate", str(store), check=False).returncode == 2


def test_new_grid_computes_only_that_grid_and_equals_a_fresh_build(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    store = str(tmp_path / "caches" / "a.zarr")
    first = run_teacher_cache(load_params(params, ["cache.grids=[1,2]"]), store, progress=False)
    assert first.views_computed == 8 * 5
    second = run_teacher_cache(load_params(params, ["cache.grids=[1,2,3]"]), store, progress=False)
    assert second.views_computed == 8 * 9  # only the 3x3 views
    again = run_teacher_cache(load_params(params, ["cache.grids=[1,2,3]"]), store, progress=False)
    assert again.views_computed == 0 and again.shards_written == 0
    fresh = str(tmp_path / "caches" / "b.zarr")
    run_teacher_cache(load_params(params, ["cache.grids=[1,2,3]"]), fresh, progress=False)
    np.testing.assert_array_equal(load_targets(store, [1, 2, 3]), load_targets(fresh, [1, 2, 3]))
    assert cs.validate(store)["fingerprint"] == cs.validate(fresh)["fingerprint"]


def test_store_for_other_params_is_refused_or_replaced_on_request(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    store = str(tmp_path / "caches" / "t.zarr")
    run_teacher_cache(load_params(params, ["cache.grids=[1]"]), store, progress=False)
    other = load_params(params, ["cache.grids=[1]", "teacher.seed=3"])
    with pytest.raises(InputError, match=r"built for other params \(teacher.weights_sha256: store has"):
        run_teacher_cache(other, store, progress=False)
    stats = run_teacher_cache(other, store, replace=True, progress=False)
    assert stats.complete and stats.views_computed == 8
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a zeroseg teacher cache"):
        run_teacher_cache(other, str(tmp_path / "junk"), progress=False)
    assert (tmp_path / "junk" / "file.txt").read_text() == "mine"


def test_jpeg_draft_is_keyed_in_the_identity_and_never_upsamples_cells(tmp_path):
    from helpers import smooth_photo

    from pipeline.core.errors import ConfigError

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.roll(smooth_photo(1000, 800), 40 * i, axis=1)).save(folder / f"p{i}.jpg", quality=90)
    params = write_params(tmp_path / "params.yaml", folder, tmp_path / "caches", cache={"grids": [1, 2]})
    size = Teacher.load(load_params(params).teacher).spec.size
    with pytest.raises(ConfigError, match=f"would upsample the 2x2 cells; use 0 \\(off\\) or at least {2 * size}"):
        run_teacher_cache(load_params(params, ["teacher.jpeg_draft_side=16"]), str(tmp_path / "bad.zarr"), progress=False)
    plain = run_teacher_cache(load_params(params), str(tmp_path / "plain.zarr"), progress=False)
    draft = run_teacher_cache(load_params(params, [f"teacher.jpeg_draft_side={2 * size}"]), str(tmp_path / "draft.zarr"), progress=False)
    a, b = cs.validate(plain.store), cs.validate(draft.store)
    assert "jpeg_draft_side" not in a["preprocessing"] and b["preprocessing"]["jpeg_draft_side"] == 2 * size
    assert a["fingerprint"] != b["fingerprint"] and draft.failed == 0
    ta, tb = (torch.from_numpy(load_targets(s, (1, 2)).astype(np.float32)) for s in (plain.store, draft.store))
    assert torch.nn.functional.cosine_similarity(ta, tb, dim=-1).min() > 0.98  # the same pictures, decoded smaller


def test_default_store_path_is_keyed_by_fingerprint(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1]})
    a = run_teacher_cache(load_params(params), progress=False).store
    b = run_teacher_cache(load_params(params, ["teacher.seed=1"]), progress=False).store
    assert a != b and a.startswith(str(tmp_path / "caches" / "zeroseg-test-vit-"))
    assert cs.validate(a)["fingerprint"].startswith(a.rsplit("-", 1)[1][:12])


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing_finished_shards(tmp_path, capsys):
    write_slow_images(tmp_path / "imgs")
    params = write_params(
        tmp_path / "params.yaml", tmp_path / "imgs", tmp_path / "caches",
        teacher={"batch_size": 2, "decode_workers": 1}, cache={"shard_rows": 2, "chunk_rows": 2},
    )
    store = tmp_path / "caches" / "t.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "teacher-cache", "--params", str(params), "--out", str(store), "-q"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    markers = store / "progress" / "4x4" / "c"
    while proc.poll() is None:  # until 2 shards are marked (a slower machine only waits longer)
        if markers.is_dir() and sum(not name.endswith(".partial") for name in os.listdir(markers)) >= 2:  # zarr writes via temp files
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A shard's markers are set one array after another (the views' grids, then the images), so
    # the kill may fall between two of them: read which shards were whole and which had their views.
    group = zarr.open_group(str(store), mode="r")
    grids = cs.store_grids(group)
    grid_marked = {g: group[cs.progress_array(g)][:].astype(bool) for g in grids}  # [12] each
    views_marked = np.all(list(grid_marked.values()), axis=0)
    images_marked = np.all([group[cs.images_progress_array(s)][:].astype(bool) for s in cs.store_image_sizes(group)], axis=0)
    done_at_kill = int(np.sum(views_marked & images_marked))
    assert 0 < done_at_kill < 12, "the run was not interrupted part-way; make the images slower"
    capsys.readouterr()
    stats = run_teacher_cache(load_params(params), str(store), progress=True)
    # Exactly the shards marked whole before the kill are skipped; a shard written but not yet marked is recomputed.
    assert stats.shards_skipped == done_at_kill
    # and the rerun says so before it starts
    assert f"resuming: {done_at_kill} of 12 shards already done ({2 * done_at_kill} of 24 images), {12 - done_at_kill} to compute" in capsys.readouterr().err
    # a grid's views are computed only for the shards whose marker of that grid was not set
    assert stats.views_computed == sum(g * g * 2 * int(np.sum(~grid_marked[g])) for g in grids)
    assert stats.complete
    fresh = tmp_path / "caches" / "fresh.zarr"
    run_teacher_cache(load_params(params), str(fresh), progress=False)
    np.testing.assert_array_equal(load_targets(store, [1, 2, 3, 4]), load_targets(fresh, [1, 2, 3, 4]))


def test_store_opens_with_plain_zarr_and_dask_in_a_fresh_process(built_cache):
    store, _ = built_cache
    code = (
        "import sys, zarr, dask.array as da, numpy as np\n"
        f"g = zarr.open_group({str(store)!r}, mode='r')\n"
        "x = da.from_zarr(g['views/4x4'])\n"
        "assert x.shape == (8, 16, 32) and x.chunksize == (2, 16, 32)\n"
        "m = float(da.nanmean(x.astype('float32')).compute())\n"
        "assert np.isfinite(m)\n"
        "print(g.attrs['fingerprint'], list(g['paths'][:2]), m)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(zarr.open_group(store, mode="r").attrs["fingerprint"])


def test_an_existing_store_keeps_its_layout_and_says_so(tmp_path, demo_dir, caplog):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    store = str(tmp_path / "caches" / "a.zarr")
    run_teacher_cache(load_params(params, ["cache.grids=[1]"]), store, progress=False)
    with caplog.at_level("WARNING", logger="pipeline.cache"):
        again = run_teacher_cache(load_params(params, ["cache.grids=[1]", "cache.chunk_rows=4", "cache.codec=zstd"]), store, progress=False)
    assert again.views_computed == 0
    assert "keeps its layout {'chunk_rows': 2, 'shard_rows': 4, 'codec': 'blosc-zstd', 'codec_level': 3}" in caplog.text
    assert zarr.open_group(store, mode="r")["views/1x1"].chunks[0] == 2
