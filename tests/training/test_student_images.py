"""Stage one storing the student's images (cache.student_image_size), and stage two reading them.

The stored pixels must be the very bytes stage two would decode on the fly: tensors are compared
for equality, not closeness, and so are the weights after training on either source.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from bad_images import write_bad_images
from conftest import TINY_TRAIN, run_cli, write_params
from helpers import smooth_photo
from PIL import Image

import cache_schema as cs
from pipeline.cache.reader import load_targets
from pipeline.config import load_params
from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.errors import ConfigError, InputError
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.data import CachePairs, student_image


@pytest.fixture(scope="module")
def images_store(tmp_path_factory, demo_dir):
    """(store, params file, data root): the 8 demo scenes and every kind of bad file, images stored at 32 px."""
    tmp = tmp_path_factory.mktemp("images_store")
    folder = tmp / "imgs"
    write_bad_images(folder)
    for p in sorted((demo_dir / "images").iterdir()):
        shutil.copy(p, folder / p.name)
    params = write_params(tmp / "params.yaml", folder, tmp / "caches", cache={"grids": [1, 2], "student_image_size": 32})
    store = tmp / "caches" / "s.zarr"
    stats = run_teacher_cache(load_params(params), str(store), progress=False)
    assert stats.complete and stats.failed > 0
    return store, params, folder


def test_stored_images_are_the_bytes_stage_two_decodes(images_store):
    store, _, folder = images_store
    group = zarr.open_group(store, mode="r")
    images, status, paths = group[cs.images_array(32)][:], group[cs.STATUS][:], group[cs.PATHS][:]
    assert images.shape == (len(paths), 3, 32, 32) and images.dtype == np.uint8
    assert cs.validate(store)["image_sizes"] == [32] and group[cs.images_array(32)].attrs["complete"]
    ok = np.flatnonzero(status == cs.STATUS_OK)
    assert len(ok) >= 8
    for row in ok:
        assert torch.equal(torch.from_numpy(images[row]), student_image(folder / str(paths[row]), 32)), paths[row]
    assert not images[status == cs.STATUS_FAILED].any()  # failed rows stay zero
    info = json.loads(run_cli("cache", "info", str(store), "--json").stdout)
    assert info["student_images"]["32"]["complete"] and 0 < info["student_images"]["32"]["bytes_per_image"] < 3 * 32 * 32
    assert "images       32x32 (complete)" in run_cli("cache", "info", str(store)).stdout
    code = (  # plain zarr and dask, in a process that never imports zeroseg
        "import zarr, dask.array as da\n"
        f"x = da.from_zarr(zarr.open_group({str(store)!r}, mode='r')['images/32'])\n"
        "print(x.chunksize, int(x.sum().compute()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(2,", "3,", "32,", "32)", str(int(images.astype(np.int64).sum()))]


def test_pairs_from_stored_images_equal_pairs_from_decoding(images_store):
    store, _, folder = images_store
    read = {name: list(CachePairs(str(store), folder, (1, 2), 32, seed=5, shuffle_buffer=3, images=name)) for name in ("cache", "decode")}
    assert CachePairs(str(store), folder, (1, 2), 32, images="auto").image_source == "cache"
    assert CachePairs(str(store), folder, (1, 2), 16, images="auto").image_source == "decode"  # no images/16
    assert [r for _, _, r in read["cache"]] == [r for _, _, r in read["decode"]]
    for (a, ta, _), (b, tb, _) in zip(read["cache"], read["decode"]):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_training_on_stored_images_gives_the_same_weights(images_store, tmp_path):
    store, params, _ = images_store
    runs = {}
    for name in ("cache", "decode"):
        p = load_params(params, [*TINY_TRAIN, "train.epochs=2", "loss.grids=[1,2]", f"train.images={name}"])
        run_training_quiet(p, store, tmp_path / name)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]
    for key, tensor in runs["cache"].items():
        assert torch.equal(tensor, runs["decode"][key]), key


def run_training_quiet(params, store, out):
    from pipeline.training.run import run_training

    return run_training(params, str(store), out, live_dir=None, progress=False)


def test_images_added_to_an_existing_store_run_no_teacher_and_keep_the_views(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1, 2]})
    store = str(tmp_path / "a.zarr")
    run_teacher_cache(load_params(params), store, progress=False)
    views = load_targets(store, (1, 2))
    added = run_teacher_cache(load_params(params, ["cache.student_image_size=32"]), store, progress=False)
    assert added.views_computed == 0 and added.shards_written == 2 and added.complete
    np.testing.assert_array_equal(load_targets(store, (1, 2)).view(np.uint16), views.view(np.uint16))
    again = run_teacher_cache(load_params(params, ["cache.student_image_size=32"]), store, progress=False)
    assert again.shards_written == 0
    second = run_teacher_cache(load_params(params, ["cache.student_image_size=16"]), store, progress=False)
    assert second.views_computed == 0 and cs.store_image_sizes(zarr.open_group(store, mode="r")) == (16, 32)
    fresh = str(tmp_path / "b.zarr")
    run_teacher_cache(load_params(params, ["cache.student_image_size=32"]), fresh, progress=False)
    a, b = (zarr.open_group(s, mode="r") for s in (store, fresh))
    np.testing.assert_array_equal(a[cs.images_array(32)][:], b[cs.images_array(32)][:])
    assert cs.validate(store)["fingerprint"] == cs.validate(fresh)["fingerprint"]  # not part of the identity


def test_missing_or_incomplete_images_are_refused_when_asked_for(images_store, built_cache, tmp_path):
    plain, plain_params = built_cache
    root = load_params(plain_params).data.images
    with pytest.raises(InputError, match=r"train.images=cache but the store has no images/32 \(has: none\); run stage one with cache.student_image_size=32"):
        CachePairs(str(plain), root, (1,), 32, images="cache")
    assert CachePairs(str(plain), root, (1,), 32).image_source == "decode"
    store, _, folder = images_store
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    zarr.open_group(partial, mode="r+")[cs.images_array(32)].attrs["complete"] = False
    with pytest.raises(InputError, match="has an incomplete images/32"):
        CachePairs(str(partial), folder, (1,), 32, images="cache")
    assert CachePairs(str(partial), folder, (1,), 32).image_source == "decode"
    with pytest.raises(ConfigError, match="cache.student_image_size=4: use 0"):
        run_teacher_cache(load_params(plain_params, ["cache.student_image_size=4"]), str(tmp_path / "x.zarr"), progress=False)
    with pytest.raises(ConfigError, match="cache.student_image_size: expected at least 0, got -1"):
        load_params(plain_params, ["cache.student_image_size=-1"])


def test_draft_decoded_stores_keep_both_sources_identical(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.roll(smooth_photo(1000, 800), 40 * i, axis=1)).save(folder / f"p{i}.jpg", quality=90)
    params = write_params(tmp_path / "params.yaml", folder, tmp_path / "caches", cache={"grids": [1, 2], "student_image_size": 24})
    size = load_params(params).cache.grids[-1] * 32  # the test teacher's input is 32 px
    store = run_teacher_cache(load_params(params, [f"teacher.jpeg_draft_side={size}"]), str(tmp_path / "d.zarr"), progress=False).store
    cached = {r: im for im, _, r in CachePairs(store, folder, (1,), 24, images="cache")}
    decoded = {r: im for im, _, r in CachePairs(store, folder, (1,), 24, images="decode")}
    assert cached.keys() == decoded.keys() == {0, 1, 2}
    for row in cached:
        assert torch.equal(cached[row], decoded[row]), row
    full = student_image(folder / "p0.jpg", 24)  # without the draft: close, not equal
    assert not torch.equal(full, decoded[0]) and (full.float() - decoded[0].float()).abs().mean() < 3


def test_arrays_added_later_follow_the_rows_the_store_settled(tmp_path, demo_dir):
    # data.max_pixels is not part of the identity: a rerun may decode differently than the first
    # run did. Rows that failed stay failed (zeros, their reason kept); a row that was embedded and
    # now fails stops the run with the file named, and what was written stays.
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1]})
    strict = run_teacher_cache(load_params(params, ["data.max_pixels=100"]), str(tmp_path / "a.zarr"), progress=False)
    assert strict.failed == 8
    added = run_teacher_cache(load_params(params, ["cache.student_image_size=16", "cache.grids=[1,2]"]), strict.store, progress=False)
    group = zarr.open_group(strict.store, mode="r")
    assert added.failed == 8 and not group[cs.images_array(16)][:].any() and np.isnan(group[cs.views_array(2)][:]).all()
    assert all("decompression bomb" in r for r in group[cs.FAILURES][:])

    loose = run_teacher_cache(load_params(params), str(tmp_path / "b.zarr"), progress=False)
    with pytest.raises(InputError, match=r"scene_\d+\.\w+: decompression bomb.*but it decoded when .*b.zarr was first written"):
        run_teacher_cache(load_params(params, ["data.max_pixels=100", "cache.student_image_size=16"]), loose.store, progress=False)
    assert cs.validate(loose.store, grids=(1,))["manifest"]["n"] == 8  # the views are intact
