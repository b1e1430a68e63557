"""The cells of the multi-scale views, on the student's patch grid: which view's box each token lies in.

The teacher's views are ordered grid by grid, cells row-major (`pipeline.core.views`); a grid g
cuts the center square at i * S / g. The losses that follow the image's layout (region matching,
the token terms) ask, for every token the student saw, which view's box holds its patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.views import view_layout


def local_view_mask(grids: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
    """Which views are local (not the whole image), for views ordered grid by grid.

    Args:
        grids: the cache's grids in view order, e.g. [1, 2, 3, 4] (V = sum g*g).

    Returns:
        [V] bool, False for every view of a 1x1 grid.
    """
    flags = [g != 1 for g in grids for _ in range(g * g)]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def cell_layout(grids: Sequence[int]) -> Tensor:
    """The views' (grid, row, col) as a float tensor, for `token_cells`.

    Built once per objective and kept on the device as a buffer: made anew per step it would be
    a synchronous host-to-device copy, which waits for every queued kernel.

    Args:
        grids: the targets' grids in canonical order (V = sum g*g).

    Returns:
        [3, V] float32: grid sizes, cell rows, cell columns.
    """
    return torch.tensor(view_layout(grids), dtype=torch.float32).T.contiguous()  # [V, 3] -> [3, V]


def token_cells(ids_keep: Tensor, grid: tuple[int, int], layout: Tensor) -> Tensor:
    """Which view's box each token's patch lies in, for views ordered grid by grid.

    A patch belongs to the cell that contains its center (cells cut the square at i*S/g, so a
    patch on a 3x3 edge goes to one side). 1x1 views get no tokens: they are not regions.

    Args:
        ids_keep: [B, N] patch index (row-major on `grid`) of each token.
        grid: (h, w) patch grid of the input.
        layout: [3, V] from `cell_layout`, on the device of ids_keep.

    Returns:
        [B, N, V] float, 1 where the token lies in the view's box.
    """
    h, w = grid
    g, r, c = layout  # [V] each
    rows = (ids_keep // w).float()[..., None] + 0.5  # [B, N, 1] patch centers
    cols = (ids_keep % w).float()[..., None] + 0.5
    inside = (torch.floor(rows * g / h) == r) & (torch.floor(cols * g / w) == c) & (g > 1)  # [B, N, V]
    return inside.float()


def region_targets(targets: Tensor, assignment: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Each segment's region target and its share of the image's tokens.

    The target is the mean of the local views weighted by the segment's mass inside each view's
    box (so, grid by grid, the views of the cells it covers; grids weigh alike, as each grid's
    boxes tile the image), as a unit vector.

    Args:
        targets: [B, V, D] teacher views, unit vectors.
        assignment: [B, S, N] token-to-segment weights, summing to 1 over S.
        cells: [B, N, V] from `token_cells` (zero columns for views not used).

    Returns:
        (target [B, S, D], share [B, S] summing to 1 over S).
    """
    a = assignment.float()
    weight = torch.bmm(a, cells.float())  # [B, S, V] segment mass inside each view
    target = F.normalize(torch.bmm(weight, targets.float()), dim=-1)  # [B, S, D]
    return target, a.sum(dim=2) / a.shape[2]
