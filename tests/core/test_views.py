import numpy as np
import open_clip
import pytest
import torch
from helpers import open_clip_reference
from PIL import Image

from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig
from pipeline.core.decode import decode_center_square
from pipeline.core.errors import ConfigError
from pipeline.core.views import (
    canonical_grids,
    cell_edges,
    grid_boxes,
    make_views,
    mirrored_views,
    num_views,
    view_layout,
)


@pytest.mark.parametrize("grids, v", [([1], 1), ([1, 2, 3, 4], 30), ([4, 1, 3], 26), ([1, 3], 10), ([5], 25), ([2, 2], 4)])
def test_number_of_views(grids, v):
    assert num_views(grids) == v
    assert len(view_layout(grids)) == v


def test_view_order_is_grid_ascending_then_row_major():
    assert view_layout([3, 1, 2])[:6] == [(1, 0, 0), (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1), (3, 0, 0)]
    assert grid_boxes(2) == [(0, 0, 0.5, 0.5), (0, 0.5, 0.5, 1), (0.5, 0, 1, 0.5), (0.5, 0.5, 1, 1)]


def test_mirrored_views_swap_each_cell_with_its_mirror_in_its_row():
    grids = [1, 2, 3, 8]
    layout, mirror = view_layout(grids), mirrored_views(grids)
    assert sorted(mirror) == list(range(len(layout)))  # a permutation
    assert [mirror[i] for i in mirror] == list(range(len(layout)))  # mirroring twice is the identity
    for i, (g, r, c) in enumerate(layout):
        assert layout[mirror[i]] == (g, r, g - 1 - c)
    assert mirror[:3] == [0, 2, 1]  # the whole image stays; the 2x2 grid's top row swaps
    assert layout[mirror[layout.index((3, 1, 1))]] == (3, 1, 1)  # a middle column stays


def test_cells_tile_the_square_exactly():
    for side in (16, 17, 100, 223, 500):
        for g in (1, 2, 3, 4, 7):
            edges = cell_edges(side, g)
            assert edges[0] == 0 and edges[-1] == side
            sizes = np.diff(edges)
            assert sizes.min() >= side // g and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [1.5]])
def test_bad_grids_are_refused(bad):
    with pytest.raises(ConfigError):
        canonical_grids(bad)


@pytest.fixture(scope="module")
def tiny_teacher():
    return Teacher.load(TeacherConfig(model="zeroseg-test-vit", pretrained="", precision="fp32", device="cpu"))


def test_views_match_open_clip_preprocess_per_crop(tiny_teacher, demo_dir):
    # Tolerance: torch's antialiased bicubic and PIL's differ by about 0.2 of an 8-bit level on
    # average and by at most 3 levels (measured), i.e. 0.003 and 0.045 in normalized units.
    square = decode_center_square(demo_dir / "images" / "scene_000003.jpg").square
    ours = make_views([torch.from_numpy(square)], [1, 2, 3, 4], tiny_teacher.spec)[0]  # [30, 3, T, T]
    ref = open_clip_reference(tiny_teacher, square, [1, 2, 3, 4])
    assert ours.shape == ref.shape == (30, 3, 32, 32)
    assert (ours - ref).abs().mean() < 5e-3
    assert (ours - ref).abs().max() < 0.07
    a, b = tiny_teacher.encode(ours), tiny_teacher.encode(ref)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_batched_views_equal_per_image_views_for_mixed_sizes(tiny_teacher):
    rng = np.random.default_rng(0)
    squares = [torch.from_numpy(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in (32, 45, 100, 17)]
    batched = make_views(squares, [1, 2, 3, 4], tiny_teacher.spec)
    single = torch.stack([make_views([sq], [1, 2, 3, 4], tiny_teacher.spec)[0] for sq in squares])
    assert torch.equal(batched, single)


def test_one_by_one_view_agrees_with_open_clip_on_the_whole_image(tiny_teacher, demo_dir):
    path = demo_dir / "images" / "scene_000001.jpg"
    spec = tiny_teacher.spec
    pre = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
    ref = tiny_teacher.encode(pre(Image.open(path).convert("RGB"))[None])
    ours = tiny_teacher.encode(make_views([torch.from_numpy(decode_center_square(path).square)], [1], spec)[0])
    assert torch.nn.functional.cosine_similarity(ref, ours).item() > 0.99
