"""Fixed 2-D sin-cos position embeddings, MAE convention, for any patch grid.

MAE (models_mae.py / util/pos_embed.py) builds the table from `np.meshgrid(grid_w, grid_h)`:
the first half of the channels encodes the patch's column, the second half its row, each
half being `[sin(pos * omega), cos(pos * omega)]` with `omega_k = 10000^(-k / (D/4))`.
Positions here are floats so that a grid of another size can be evaluated exactly instead of
interpolating a table: because the embedding is a closed-form function of position, "resizing"
it is just evaluating it at the new grid's positions. Two choices of those positions exist:

- `recompute`: integer positions 0..h'-1 of the new grid (neighbouring patches keep the
  same relative code; positions beyond the training range are extrapolated);
- `rescale`: the new grid's patch centres mapped into the training grid's range
  (`(i + 0.5) * h / h' - 0.5`), which is what bicubic interpolation of the table
  (MAE's and GroupViT's recipe for a new resolution) approximates.

And the reference recipe itself, `interpolate`: bicubic interpolation of the trained table's
numbers to the new grid (`F.interpolate`, align_corners False, as GroupViT resizes its table
for a window larger than its training grid), for numbers comparable with theirs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1-D sin-cos code.

    Args:
        dim: output channels, even.
        pos: positions, [M] (any float values).

    Returns:
        [M, dim] float64: `[sin(pos * omega), cos(pos * omega)]`.
    """
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega  # [dim/2]
    out = pos.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)  # [M, dim]


def sincos_2d(
    dim: int,
    grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 0,
    source_grid: tuple[int, int] | None = None,
) -> Tensor:
    """2-D sin-cos table for a patch grid, flattened row-major, MAE channel order.

    Args:
        dim: embedding width, a multiple of 4.
        grid: (rows, cols) of the patch grid.
        num_prefix_tokens: zero rows prepended (MAE gives the cls token a zero embedding).
        source_grid: when given, positions are rescaled from `grid` into this grid's range
            (see the module docstring, `rescale`); when None, integer positions are used.

    Returns:
        [num_prefix_tokens + rows * cols, dim] float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    rows, cols = grid
    pos_r = torch.arange(rows, dtype=torch.float64)  # [h]
    pos_c = torch.arange(cols, dtype=torch.float64)  # [w]
    if source_grid is not None:
        pos_r = (pos_r + 0.5) * source_grid[0] / rows - 0.5
        pos_c = (pos_c + 0.5) * source_grid[1] / cols - 0.5
    rr, cc = torch.meshgrid(pos_r, pos_c, indexing="ij")  # [h, w] each
    emb = torch.cat(
        [sincos_1d(dim // 2, cc.reshape(-1)), sincos_1d(dim // 2, rr.reshape(-1))], dim=1
    )  # [h*w, dim]: columns first, as MAE
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_sincos_pos_embed(
    pos_embed: Tensor,
    *,
    source_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: Literal["recompute", "rescale", "interpolate"] = "recompute",
) -> Tensor:
    """A sin-cos table for `new_grid`, given the one built for `source_grid`.

    Since the table is a closed-form function of position, this recomputes it rather than
    interpolating numbers; the prefix rows (cls token) are carried over unchanged.

    Args:
        pos_embed: [1, num_prefix_tokens + h*w, D], built by `sincos_2d` for `source_grid`.
        source_grid: (h, w) the table was built for.
        new_grid: (h', w') wanted.
        num_prefix_tokens: leading non-patch rows.
        mode: `recompute` (integer positions of the new grid), `rescale` (positions
            mapped into the source grid's range) or `interpolate` (bicubic interpolation of
            the table's values, GroupViT's way).

    Returns:
        [1, num_prefix_tokens + h'*w', D], on `pos_embed`'s device and dtype.
    """
    if tuple(new_grid) == tuple(source_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    if mode == "interpolate":
        h, w = source_grid
        grid = pos_embed[:, num_prefix_tokens:].float().reshape(1, h, w, dim).permute(0, 3, 1, 2)  # [1, D, h, w]
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)  # [1, D, h', w']
        table = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
        return torch.cat([pos_embed[:, :num_prefix_tokens], table], dim=1)
    table = sincos_2d(dim, new_grid, source_grid=source_grid if mode == "rescale" else None)
    table = table.to(device=pos_embed.device, dtype=pos_embed.dtype)[None]  # [1, h'*w', D]
    return torch.cat([pos_embed[:, :num_prefix_tokens], table], dim=1)
