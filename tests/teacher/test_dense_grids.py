"""Stage one's dense grids (`cache.dense_grids`): the teacher's MaskCLIP embeddings of the whole
center square, averaged per cell, written as one more `views/GxG` array."""

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_TRAIN, write_params

import cache_schema as cs
from pipeline.cache.reader import load_targets
from pipeline.clip.dense import dense_features, resnet_value_features
from pipeline.clip.model import Teacher
from pipeline.config import load_params
from pipeline.core.decode import decode_center_square
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.views import ViewSpec, make_views
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.run import run_training


def _square(params, store, row: int) -> torch.Tensor:
    path = zarr.open_group(str(store))[cs.PATHS][row]
    return torch.from_numpy(decode_center_square(f"{params.data.images}/{path}").square)


def _resized(spec: ViewSpec, square: torch.Tensor, side: int) -> torch.Tensor:
    """The whole square at `side` px, normalized as a view is."""
    return make_views([square], (1,), ViewSpec(side, spec.interpolation, spec.mean, spec.std, spec.resize_mode))[:, 0]  # [1, 3, side, side]


def test_a_dense_grid_is_the_vits_window_averaged_maskclip_map_and_is_added_without_recomputing_crops(tmp_path, demo_dir):
    file = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    store = tmp_path / "a.zarr"
    first = run_teacher_cache(load_params(file, ["cache.grids=[1,2]"]), str(store), progress=False)
    crops_before = load_targets(str(store), [1, 2])
    params = load_params(file, ["cache.grids=[1,2]", "cache.dense_grids=[8]"])
    second = run_teacher_cache(params, str(store), progress=False)
    assert first.views_computed == 8 * 5 and second.views_computed == 8 * 64  # only the dense grid
    group = zarr.open_group(str(store))
    assert cs.grid_content(group, 8) == cs.DENSE and cs.grid_content(group, 2) == cs.CROPS
    assert group[cs.views_array(8)].shape == (8, 64, 32) and cs.store_grids(group) == (1, 2, 8)
    np.testing.assert_array_equal(load_targets(str(store), [1, 2]), crops_before)

    # The test ViT sees 32 px at 8 px per patch (4x4 tokens). An 8x8 grid needs 8 patches a side:
    # the square at 64 px, windows of 32 at 0, 16 and 32 on each axis, each location's MaskCLIP
    # embedding averaged over the windows that cover it, one location per cell.
    teacher = Teacher.load(params.teacher)
    for row in (0, 5):
        x = _resized(teacher.spec, _square(params, store, row), 64)
        total, count = torch.zeros(8, 8, 32), torch.zeros(8, 8, 1)
        with torch.inference_mode():
            for top in (0, 16, 32):
                for left in (0, 16, 32):
                    f = dense_features(teacher.model.visual, x[:, :, top : top + 32, left : left + 32])[0]  # [4, 4, D]
                    total[top // 8 : top // 8 + 4, left // 8 : left // 8 + 4] += f
                    count[top // 8 : top // 8 + 4, left // 8 : left // 8 + 4] += 1
        expected = (total / count).reshape(64, 32).numpy()
        np.testing.assert_allclose(group[cs.views_array(8)][row].astype(np.float32), expected, atol=2e-3, rtol=2e-3)

    fresh = tmp_path / "b.zarr"
    run_teacher_cache(params, str(fresh), progress=False)
    np.testing.assert_array_equal(load_targets(str(fresh), [1, 2, 8]), load_targets(str(store), [1, 2, 8]))


def test_a_resnet_teachers_dense_grid_is_its_value_map_at_32_px_per_cell(tmp_path, demo_dir):
    file = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches",
                        teacher={"model": "zeroseg-demo-rn", "pretrained": "assets/demo-teacher"}, cache={"grids": [1], "dense_grids": [2]})
    params = load_params(file)
    store = tmp_path / "rn.zarr"
    stats = run_teacher_cache(params, str(store), progress=False)
    assert stats.complete and stats.views_computed == 8 * 5
    teacher = Teacher.load(params.teacher)
    views = zarr.open_group(str(store))[cs.views_array(2)]
    with torch.inference_mode():
        expected = resnet_value_features(teacher.model.visual, _resized(teacher.spec, _square(params, store, 3), 64))[0]  # [2, 2, D]
    np.testing.assert_allclose(views[3].astype(np.float32), expected.reshape(4, -1).numpy(), atol=2e-3, rtol=2e-3)


def test_a_grid_is_crops_or_dense_never_both_and_a_store_keeps_what_it_holds(tmp_path, demo_dir):
    file = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    with pytest.raises(ConfigError, match=r"cache.dense_grids and cache.grids both have 2x2"):
        run_teacher_cache(load_params(file, ["cache.grids=[1,2]", "cache.dense_grids=[2]"]), str(tmp_path / "x.zarr"), progress=False)
    store = str(tmp_path / "s.zarr")
    run_teacher_cache(load_params(file, ["cache.grids=[1,2]"]), store, progress=False)
    with pytest.raises(InputError, match=r"s.zarr: its 2x2 views are crops, but the params ask for dense there"):
        run_teacher_cache(load_params(file, ["cache.grids=[1]", "cache.dense_grids=[2]"]), store, progress=False)
    assert cs.grid_content(zarr.open_group(store), 2) == cs.CROPS and cs.validate(store)["complete"]


def test_the_student_trains_on_a_dense_grid_as_its_region_targets(tmp_path, demo_dir):
    file = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1, 2], "dense_grids": [4]})
    store = tmp_path / "d.zarr"
    run_teacher_cache(load_params(file), str(store), progress=False)
    params = load_params(file, [*TINY_TRAIN, "train.max_steps=2", "loss.grids=[1,2,4]", "loss.region_grids=[4]", "loss.region_match=1", "loss.token_anchors=1",
                                "loss.anchor_vocabulary=circle, square, background"])
    summary = run_training(params, str(store), tmp_path / "run", progress=False)
    assert summary.step == 2 and {"region_match", "token_anchors"} <= set(summary.losses)
    assert all(np.isfinite(v) for v in summary.losses.values())
