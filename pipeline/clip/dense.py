"""Dense CLIP: one embedding per patch (ViT) or location (ResNet) of an open_clip teacher.

Shared by the evaluation's dense baselines (`maskclip`, `sclip`, `naclip`) and stage one's dense
grids (`cache.dense_grids`), so the teacher's dense embeddings are computed by one piece of code:

- on a ViT each method rewrites the last transformer block only (`DENSE_CLIP`), then every
  token goes through the final LayerNorm and the image projection into the text space;
- on a ResNet (CLIP's ModifiedResNet) only MaskCLIP is defined: the attention pool's query and
  key are dropped and every location of the last feature map goes through the pool's value
  and output projections (`resnet_value_features`).

Written here rather than taken from a library: MaskCLIP, SCLIP and NACLIP publish their code as
patches to their own copies of CLIP, not as functions over an open_clip model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from pipeline.core.errors import InputError

NACLIP_STD = 5.0  # NACLIP's Gaussian neighbourhood, in patches (its published setting)


def neighbourhood_bias(grid: tuple[int, int], std: float = NACLIP_STD, prefix: int = 1) -> torch.Tensor:
    """NACLIP's attention addition [prefix + h*w, prefix + h*w]: between patches at (r, c) and
    (r', c'), exp(-((r - r')^2 + (c - c')^2) / (2 std^2)); 0 in the class token's row and column."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # [N, 2]
    bias = torch.exp(-torch.cdist(pos, pos).square() / (2 * std**2))  # [N, N]
    return F.pad(bias, (prefix, 0, prefix, 0)).float()


def last_block_attention(q: torch.Tensor, k: torch.Tensor, kind: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention weights [n, heads, L, L] of the dense-CLIP variants from per-head q, k [n, heads, L, d].

    `identity`: each token attends to itself only (MaskCLIP's value embeddings); `csa`: SCLIP's
    correlative self-attention, softmax(q q^T) + softmax(k k^T); `neighbourhood`: NACLIP's,
    softmax(k k^T + the Gaussian neighbourhood bias over the patch grid). Scaled by d^-1/2.
    """
    n, heads, L, d = q.shape
    scale = d**-0.5
    if kind == "identity":
        return torch.eye(L, dtype=q.dtype, device=q.device).expand(n, heads, L, L)
    if kind == "csa":
        return (q @ q.transpose(-1, -2) * scale).softmax(dim=-1) + (k @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    if kind == "neighbourhood":
        bias = neighbourhood_bias(grid, prefix=L - grid[0] * grid[1]).to(device=q.device, dtype=q.dtype)
        return (k @ k.transpose(-1, -2) * scale + bias).softmax(dim=-1)
    raise ValueError(f"unknown attention {kind!r}")


# What each method changes in the last block of the teacher's ViT (nothing before it):
# (attention, keep the residual, keep the feed-forward).
DENSE_CLIP = {
    "maskclip": ("identity", False, False),  # MaskCLIP: value embeddings, no residual, no FFN
    "sclip": ("csa", True, True),  # SCLIP: correlative self-attention, residual and FFN kept
    "naclip": ("neighbourhood", False, False),  # NACLIP: neighbourhood attention, "reduced" block
}


def resnet_value_features(visual: ModifiedResNet, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP for a CLIP ResNet: [n, 3, H, W] normalized -> [n, gh, gw, D] per-location embeddings.

    The attention pool would mix every location into one query (the mean token); MaskCLIP keeps
    each location to itself: value projection then output projection of the feature map plus
    the pool's position embedding, whose square table is interpolated bicubically to the map
    (as open_clip resizes position tables). gh, gw = H / 32, W / 32 (rounded up).
    """
    pool = visual.attnpool
    f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))  # [n, C, gh, gw]
    n, c, gh, gw = f.shape
    table = pool.positional_embedding[1:]  # [G*G, C], the mean token's row dropped
    side = round(len(table) ** 0.5)
    if (gh, gw) != (side, side):
        table = F.interpolate(table.T.reshape(1, c, side, side).float(), size=(gh, gw), mode="bicubic", align_corners=False).reshape(c, gh * gw).T
    tokens = f.flatten(2).transpose(1, 2) + table.to(f.dtype)  # [n, gh*gw, C]
    return pool.c_proj(pool.v_proj(tokens)).float().view(n, gh, gw, -1)


def check_dense_teacher(visual: torch.nn.Module, model: str, method: str, what: str) -> bool:
    """Whether `visual` is a ResNet (True) or a ViT (False) that `method` can run on.

    Raises:
        InputError: an unknown method, or a tower it does not apply to (`what` names the setting).
    """
    if method not in DENSE_CLIP:
        raise InputError(f"{what}: unknown dense-CLIP method {method!r} (known: {', '.join(DENSE_CLIP)})")
    if isinstance(visual, ModifiedResNet):
        if method != "maskclip":
            raise InputError(f"{what}: {method} rewrites a ViT's last attention block; {model} is a ResNet (maskclip runs on it)")
        return True
    if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None or visual.proj is None:
        raise InputError(f"{what}: {method} needs an open_clip ViT teacher with a class token or a CLIP ResNet, not {model}")
    if not isinstance(visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention):
        raise InputError(f"{what}: {method} does not know the attention of {model}")
    return False


def dense_features(visual: torch.nn.Module, x: torch.Tensor, method: str = "maskclip") -> torch.Tensor:
    """[n, 3, H, W] normalized (H = W = the input size for a ViT) -> [n, gh, gw, D] embeddings in the text space."""
    if isinstance(visual, ModifiedResNet):
        return resnet_value_features(visual, x)
    x = visual._embeds(x)  # [n, 1 + N, C]
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    kind, residual, ffn = DENSE_CLIP[method]
    n, L, c = x.shape
    heads = last.attn.num_heads
    side = round((L - 1) ** 0.5)
    q, k, v = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias).view(n, L, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x [n, h, L, d]
    attn = last_block_attention(q, k, kind, (side, side))  # [n, h, L, L]
    y = last.attn.out_proj((attn @ v).transpose(1, 2).reshape(n, L, c))  # [n, L, C]
    ls_1, ls_2 = getattr(last, "ls_1", torch.nn.Identity()), getattr(last, "ls_2", torch.nn.Identity())
    if residual:
        y = x + ls_1(y)
    if ffn:
        y = y + ls_2(last.mlp(last.ln_2(y)))
    feats = (visual.ln_post(y[:, 1:]) @ visual.proj).float()  # [n, N, D], class token dropped
    return feats.view(n, side, side, -1)  # [n, gh, gw, D]


def dense_grid_side(visual: torch.nn.Module, size: int, grid: int) -> int:
    """The side a center square is resized to for a `grid` x `grid` dense map (`dense_grid`).

    A ResNet sees the whole square at 32 px per cell (one location of its last map per cell). A
    ViT sees windows of its input size `size` at half-window stride over a square of at least
    one patch per cell.
    """
    if isinstance(visual, ModifiedResNet):
        return 32 * grid
    return max(size, grid * _patch(visual))


def dense_grid(visual: torch.nn.Module, x: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """MaskCLIP embeddings of whole squares, averaged over the cells of a `grid` x `grid` grid.

    Args:
        visual: the teacher's image tower (ResNet or ViT with a class token).
        x: [B, 3, S, S] normalized squares, S = `dense_grid_side`.
        grid: cells per side.
        size: the teacher's input size (a ViT's window).
    Returns:
        [B, grid * grid, D] float32, row-major cells: each cell's mean embedding (not normalized).
    """
    if isinstance(visual, ModifiedResNet):
        feats = resnet_value_features(visual, x)  # [B, gh, gw, D]
    else:
        feats = _vit_windows(visual, x, size)
    pooled = F.adaptive_avg_pool2d(feats.permute(0, 3, 1, 2), grid)  # [B, D, grid, grid]
    return pooled.flatten(2).transpose(1, 2)  # [B, grid*grid, D]


def _patch(visual: VisionTransformer) -> int:
    patch = visual.patch_size
    return int(patch[0] if isinstance(patch, tuple) else patch)


def _vit_windows(visual: VisionTransformer, x: torch.Tensor, size: int) -> torch.Tensor:
    """A ViT's MaskCLIP map of squares larger than its input: windows of `size` at half-window
    stride (snapped to whole patches), each location's embeddings averaged over the windows
    that cover it. [B, 3, S, S] -> [B, S / patch, S / patch, D]."""
    b, _, side, _ = x.shape
    patch = _patch(visual)
    stride = max(patch, size // 2 // patch * patch)
    starts = sorted({*range(0, side - size, stride), side - size}) if side > size else [0]
    cells = side // patch
    total = counts = None
    for top in starts:
        for left in starts:
            f = dense_features(visual, x[:, :, top : top + size, left : left + size])  # [B, n, n, D]
            if total is None:
                total = f.new_zeros(b, cells, cells, f.shape[-1])
                counts = f.new_zeros(1, cells, cells, 1)
            r, c, n = top // patch, left // patch, f.shape[1]
            total[:, r : r + n, c : c + n] += f
            counts[:, r : r + n, c : c + n] += 1
    return total / counts
