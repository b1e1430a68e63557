"""Per-sample random masking of patch tokens, as MAE does it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Masked(NamedTuple):
    """Result of `random_masking`."""

    kept: Tensor  # [B, L_keep, C] the visible tokens, in shuffled order
    mask: Tensor  # [B, L] 1 = removed, 0 = kept, in the original patch order
    ids_restore: Tensor  # [B, L] argsort of the shuffle: un-shuffles a [B, L, ...] sequence
    ids_keep: Tensor  # [B, L_keep] original patch index of each kept token


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens per image: `int(L * (1 - r))`, MAE's rounding."""
    return int(num_tokens * (1 - mask_ratio))


def random_masking(x: Tensor, mask_ratio: float, *, generator: torch.Generator | None = None) -> Masked:
    """Keep a uniformly random subset of `int(L * (1 - mask_ratio))` tokens per image.

    Sorting uniform noise gives an independent random permutation per sample; the first
    `L_keep` indices of it are kept. With `mask_ratio == 0` no noise is drawn and the order is
    the identity, so that token `n` of the output is patch `n` (inference relies on it).

    Args:
        x: [B, L, C] patch tokens (position embeddings already added).
        mask_ratio: fraction removed, in [0, 1).
        generator: optional RNG for the noise; must live on `x`'s device.

    Returns:
        `Masked(kept, mask, ids_restore, ids_keep)`, shapes in its fields.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    B, L, C = x.shape
    len_keep = num_kept(L, mask_ratio)
    if mask_ratio == 0.0:
        ids_shuffle = torch.arange(L, device=x.device).expand(B, L)  # [B, L]
    else:
        noise = torch.rand(B, L, device=x.device, generator=generator)  # [B, L] in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)  # [B, L] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, L_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(B, len_keep, C))  # [B, L_keep, C]

    mask = (ids_restore >= len_keep).float()  # [B, L] in patch order: its place in the shuffle is past the kept ones
    return Masked(kept=kept, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)


def unshuffle(tokens: Tensor, ids_restore: Tensor, fill: Tensor) -> Tensor:
    """Put kept tokens back at their patch positions, `fill` at the removed ones.

    Args:
        tokens: [B, L_keep, C] kept tokens in shuffled order (no prefix tokens).
        ids_restore: [B, L] from `random_masking`.
        fill: [1, 1, C] token placed at removed positions (MAE's mask token).

    Returns:
        [B, L, C] in patch order.
    """
    B, L_keep, C = tokens.shape
    L = ids_restore.shape[1]
    fills = fill.to(tokens.dtype).expand(B, L - L_keep, C)  # [B, L - L_keep, C]
    full = torch.cat([tokens, fills], dim=1)  # [B, L, C] shuffled order
    index = ids_restore.unsqueeze(-1).expand(B, L, C)  # [B, L, C]
    return torch.gather(full, 1, index)  # [B, L, C] patch order
