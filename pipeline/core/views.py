"""The multi-scale views: which boxes, in which order, and how they are cut and resized.

Order is canonical everywhere (cache arrays, targets, losses): grid ascending, then row-major
cells inside a grid. A grid g cuts the center square of side S at integer edges
floor(i * S / g), i = 0..g, so cells tile the square exactly and differ by at most one pixel.

Cells are resized on the device with torch's antialiased interpolation in the teacher's mode
(bicubic for CLIP) and resize rule (open_clip's "shortest": short side to the input size, then
a center crop, which matters for cells one pixel off square), rounded and clamped to 8-bit
levels as PIL's resize would leave them, then normalized with the teacher's mean and std. All cells of one size, across every image of the
batch, go through one `interpolate` call; on uniform datasets that is one call per grid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError


def canonical_grids(grids: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique positive grid sizes; rejects anything else."""
    if not grids:
        raise ConfigError("cache.grids: at least one grid is needed")
    for g in grids:
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or g > 64:
            raise ConfigError(f"cache.grids: {g!r} is not a grid size between 1 and 64")
    return tuple(sorted(set(grids)))


def num_views(grids: Sequence[int]) -> int:
    """V = sum of g*g over the grids."""
    return sum(g * g for g in canonical_grids(grids))


def grid_name(g: int) -> str:
    return f"{g}x{g}"


def cell_edges(side: int, g: int) -> list[int]:
    """Integer cut positions of a g x g grid over a side of `side` pixels."""
    return [i * side // g for i in range(g + 1)]


def grid_boxes(g: int) -> list[tuple[float, float, float, float]]:
    """Row-major (top, left, bottom, right) boxes of a grid, as fractions of the center square."""
    return [(r / g, c / g, (r + 1) / g, (c + 1) / g) for r in range(g) for c in range(g)]


def view_layout(grids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(grid, row, col) of every view, in canonical order."""
    return [(g, r, c) for g in canonical_grids(grids) for r in range(g) for c in range(g)]


def mirrored_views(grids: Sequence[int]) -> list[int]:
    """For each view in canonical order, the index of the view that covers its box in the
    horizontally mirrored square: cell (g, r, c) goes to (g, r, g - 1 - c).

    `targets[mirrored_views(grids)]` are a mirrored image's views, each cell's embedding taken as
    its mirror's (the teacher's embedding of a mirrored crop, approximately; `train.hflip`).
    """
    layout = view_layout(grids)
    index = {v: i for i, v in enumerate(layout)}
    return [index[(g, r, g - 1 - c)] for g, r, c in layout]


_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


@dataclass(frozen=True)
class ViewSpec:
    """Everything that decides a view's pixels; part of the cache's identity (`preprocessing`)."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # open_clip's: shortest side to `size` then center crop, or squash

    def __post_init__(self):
        if self.interpolation not in _TORCH_MODES:
            raise ConfigError(f"teacher interpolation {self.interpolation!r} is not supported ({', '.join(_TORCH_MODES)})")
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"teacher resize_mode {self.resize_mode!r} is not supported (shortest, squash)")

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """Shape a h x w cell is resized to before the center crop (torchvision's Resize rule)."""
        if self.resize_mode == "squash" or h == w:
            return self.size, self.size
        if h < w:
            return self.size, int(self.size * w / h)
        return int(self.size * h / w), self.size


def make_views(squares: Sequence[torch.Tensor], grids: Sequence[int], spec: ViewSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cut every grid's cells out of each center square and resize them to the teacher's input.

    Args:
        squares: B uint8 tensors [S_b, S_b, 3] (HWC, as decoded); sides may differ per image.
        grids: grid sizes; views come out in canonical order.
        spec: the teacher's input size, interpolation, mean and std.
        device: where to cut and resize (upload is uint8, a quarter of float32's bytes).
    Returns:
        [B, V, 3, size, size] float32, normalized.
    """
    layout = view_layout(grids)
    out = torch.empty(len(squares), len(layout), 3, spec.size, spec.size, device=device)
    images = [sq.to(device, non_blocking=True).permute(2, 0, 1) for sq in squares]  # [3, S, S] uint8
    # Group the cells of every image by pixel size, so each size is resized in one call.
    groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for b, img in enumerate(images):
        side = img.shape[-1]
        v = 0
        for g in canonical_grids(grids):
            edges = cell_edges(side, g)
            for r in range(g):
                for c in range(g):
                    cell = img[:, edges[r] : edges[r + 1], edges[c] : edges[c + 1]]  # [3, h, w]
                    groups[tuple(cell.shape[-2:])].append((b, v, cell))
                    v += 1
    mode = _TORCH_MODES[spec.interpolation]
    for (h, w), cells in groups.items():
        batch = torch.stack([cell for _, _, cell in cells]).float()  # [n, 3, h, w]
        rh, rw = spec.resized_shape(h, w)
        if (h, w) != (rh, rw):
            batch = F.interpolate(
                batch,
                size=(rh, rw),
                mode=mode,
                antialias=mode in ("bicubic", "bilinear"),
                align_corners=False if mode in ("bicubic", "bilinear") else None,
            )
            batch = batch.clamp_(0, 255).round_()  # the 8-bit levels PIL's resize would produce
        top, left = int(round((rh - spec.size) / 2.0)), int(round((rw - spec.size) / 2.0))
        batch = batch[:, :, top : top + spec.size, left : left + spec.size]  # [n, 3, T, T]
        b_idx = upload(torch.tensor([b for b, _, _ in cells]), device)
        v_idx = upload(torch.tensor([v for _, v, _ in cells]), device)
        out[b_idx, v_idx] = batch
    mean = upload(torch.tensor(spec.mean), device).view(1, 1, 3, 1, 1) * 255.0
    std = upload(torch.tensor(spec.std), device).view(1, 1, 3, 1, 1) * 255.0
    return out.sub_(mean).div_(std)  # [B, V, 3, size, size]


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a small host tensor without waiting for the device.

    `torch.tensor(..., device="cuda")` copies synchronously, and a synchronous copy first waits
    for every kernel queued on the stream: in stage one the teacher's forward of the previous
    batch, launched before this batch's views are cut; in stage two the previous micro-batch's
    backward. An asynchronous copy from pageable memory is staged at once and keeps the GPU busy.
    tests/test_gpu.py checks that no copy waits.
    """
    return t.to(device, non_blocking=True)
