"""Helpers shared by test modules of several packages: generated images and a reference preprocess."""

import numpy as np
import open_clip
import torch
from PIL import Image

from pipeline.core.views import cell_edges, view_layout


def smooth_photo(width: int, height: int) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients and a few soft blobs), [H, W, 3] uint8."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    r = 128 + 100 * np.sin(6 * x) * np.cos(4 * y)
    g = 255 * y
    b = 128 + 120 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 20)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def write_slow_images(folder, n=24, side=1400):
    """Large smooth PNGs: decoding them takes long enough to kill a run part-way."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(n):
        arr = (base[None, :, None] * rng.uniform(0.2, 1, 3) + base[:, None, None] * rng.uniform(0, 0.5, 3)) % 256
        arr = arr.astype(np.uint8) ^ rng.integers(0, 4, (side, side, 1), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png", compress_level=1)


def open_clip_reference(teacher, square: np.ndarray, grids) -> torch.Tensor:
    """open_clip's own preprocess of each PIL-cropped cell: the slow path we must agree with."""
    spec = teacher.spec
    pre = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
    img, side = Image.fromarray(square), square.shape[0]
    cells = []
    for g, r, c in view_layout(grids):
        e = cell_edges(side, g)
        cells.append(pre(img.crop((e[c], e[r], e[c + 1], e[r + 1]))))
    return torch.stack(cells)  # [V, 3, T, T]
