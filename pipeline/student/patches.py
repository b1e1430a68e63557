"""Images to flat pixel patches and back, MAE's layout (`nchpwq -> nhwpqc`)."""

from __future__ import annotations

from torch import Tensor


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, row-major over the grid.

    Args:
        imgs: [B, C, H, W], H and W multiples of `patch_size`.
        patch_size: p.

    Returns:
        [B, h*w, p*p*C] with h = H/p, w = W/p; channel is the fastest axis inside a patch.
    """
    B, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)  # [B, C, h, p, w, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(B, h * w, p * p * C)  # [B, L, p*p*C]


def unpatchify(x: Tensor, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3) -> Tensor:
    """Inverse of `patchify`.

    Args:
        x: [B, h*w, p*p*C].
        patch_size: p.
        grid: (h, w); None means a square grid.
        channels: C.

    Returns:
        [B, C, h*p, w*p].
    """
    B, L, _ = x.shape
    p = patch_size
    if grid is None:
        side = int(round(L**0.5))
        if side * side != L:
            raise ValueError(f"{L} patches are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(B, h, w, p, p, channels)  # [B, h, w, p, p, C]
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return x.reshape(B, channels, h * p, w * p)  # [B, C, H, W]
