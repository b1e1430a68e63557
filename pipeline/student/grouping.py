"""GroupViT's grouping block: group tokens take the image tokens they win, by attention.

Order of operations follows NVlabs/GroupViT (models/group_vit.py, `GroupingBlock`):
LayerNorm groups and tokens; a token-mixing MLP over the group axis (S1 -> S2 groups); a
post-norm cross-attention block (groups attend to tokens); a single-head assign attention
whose softmax runs over the GROUP axis, so that each image token picks a group (Gumbel noise
and a hard straight-through one-hot in training); the assignment normalized over tokens by
(sum + 1); out = assignment @ v, projected, added to the groups; a channel MLP.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

# Every norm of the grouping head is GroupViT's nn.LayerNorm (eps 1e-5), named here so that no
# library default decides it; the encoder and decoder use MAE's (eps 1e-6, model.MAE_NORM).
GROUPVIT_NORM = functools.partial(nn.LayerNorm, eps=1e-5)

class Grouped(NamedTuple):
    """Output of `GroupingBlock`."""

    tokens: Tensor  # [B, S2, C] new segment tokens
    soft: Tensor  # [B, S2, N] noise-free softmax over groups (columns sum to 1): for masks
    hard: Tensor  # [B, S2, N] the assignment actually used (straight-through one-hot if hard)


class TokenMixingMlp(nn.Module):
    """An MLP over the token axis: [B, S_in, C] -> [B, S_out, C] (MLP-Mixer's token mixing)."""

    def __init__(self, *, num_tokens: int, hidden: int, num_out: int) -> None:
        super().__init__()
        self.mlp = Mlp(in_features=num_tokens, hidden_features=hidden, out_features=num_out)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, S_in, C] -> [B, S_out, C]."""
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)  # [B, C, S_in] -> [B, C, S_out] -> back


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, S, C] to keys/values [B, N, C]."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """query: [B, S, C], key: [B, N, C] (also the values) -> [B, S, C]."""
        B, S, C = query.shape
        N = key.shape[1]
        h = self.num_heads
        q = self.q_proj(query).reshape(B, S, h, C // h).transpose(1, 2)  # [B, h, S, C/h]
        k = self.k_proj(key).reshape(B, N, h, C // h).transpose(1, 2)  # [B, h, N, C/h]
        v = self.v_proj(key).reshape(B, N, h, C // h).transpose(1, 2)  # [B, h, N, C/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, S, C/h]
        return self.proj(out.transpose(1, 2).reshape(B, S, C))  # [B, S, C]


class CrossAttentionBlock(nn.Module):
    """Residual cross-attention + MLP; post-norm (GroupViT's `pre_assign_attn`)."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = CrossAttention(dim=dim, num_heads=num_heads)
        self.norm2 = GROUPVIT_NORM(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.norm_post = GROUPVIT_NORM(dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """query: [B, S, C], key: [B, N, C] -> [B, S, C]."""
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel samples shaped like `like`, finite (uniforms clamped away from 0)."""
    u = torch.rand_like(like).clamp_(min=torch.finfo(like.dtype).tiny)
    return -torch.log(-torch.log(u))


def straight_through_one_hot(probs: Tensor, dim: int) -> Tensor:
    """One-hot of the argmax in the forward pass, gradient of `probs` in the backward pass."""
    index = probs.argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(probs).scatter_(dim, index, 1.0)
    return hard - probs.detach() + probs


class AssignAttention(nn.Module):
    """Single-head attention of groups to tokens, softmax over groups.

    Args:
        dim: channels C.
        hard: use a straight-through one-hot assignment (training and evaluation, as GroupViT).
        gumbel: add Gumbel noise to the logits in training.
        gumbel_tau: temperature of the noisy softmax.
        assign_eps: added to each group's token count before normalizing (GroupViT: 1).
    """

    def __init__(
        self,
        *,
        dim: int,
        hard: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
    ) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim**-0.5
        self.hard, self.gumbel, self.gumbel_tau, self.assign_eps = hard, gumbel, gumbel_tau, assign_eps

    def forward(self, groups: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pool tokens into groups.

        Args:
            groups: [B, S, C] group tokens (queries).
            x: [B, N, C] image tokens (keys and values).

        Returns:
            out [B, S, C], soft [B, S, N], used [B, S, N] (see `Grouped`).
        """
        q, k, v = self.q_proj(groups), self.k_proj(x), self.v_proj(x)
        logits = torch.einsum("bsc,bnc->bsn", q, k).float() * self.scale  # [B, S, N] fp32
        soft = logits.softmax(dim=1)  # [B, S, N] over groups
        if self.training and self.gumbel:
            probs = ((logits + gumbel_noise(logits)) / self.gumbel_tau).softmax(dim=1)  # [B, S, N]
        else:
            probs = soft
        used = straight_through_one_hot(probs, dim=1) if self.hard else probs  # [B, S, N]
        weights = used / (used.sum(dim=-1, keepdim=True) + self.assign_eps)  # [B, S, N] over tokens
        out = torch.einsum("bsn,bnc->bsc", weights.to(v.dtype), v)  # [B, S, C]
        return self.proj(out), soft, used


class GroupingBlock(nn.Module):
    """Turn N image tokens into S2 segment tokens using S1 group tokens.

    Args:
        dim: channels C (kept: GroupViT's optional width reduction is not needed here).
        num_heads: heads of the cross-attention block.
        num_group_tokens: S1, group tokens coming in.
        num_output_groups: S2, segments going out (the token-mixing MLP maps S1 to S2).
        mlp_ratio: channel MLP ratio.
        token_mlp_ratio: hidden width of the token-mixing MLP as a fraction of C (GroupViT 0.5).
        hard, gumbel, gumbel_tau, assign_eps: see `AssignAttention`.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        mlp_ratio: float = 4.0,
        token_mlp_ratio: float = 0.5,
        hard: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_output_groups = num_output_groups
        self.norm_tokens = GROUPVIT_NORM(dim)
        self.mlp_inter = TokenMixingMlp(
            num_tokens=num_group_tokens, hidden=int(dim * token_mlp_ratio), num_out=num_output_groups
        )
        self.norm_post_tokens = GROUPVIT_NORM(dim)
        self.norm_x = GROUPVIT_NORM(dim)
        self.pre_assign_attn = CrossAttentionBlock(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.assign = AssignAttention(
            dim=dim, hard=hard, gumbel=gumbel, gumbel_tau=gumbel_tau,
            assign_eps=assign_eps,
        )
        self.norm_new_x = GROUPVIT_NORM(dim)
        self.mlp_channels = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: Tensor, group_tokens: Tensor) -> Grouped:
        """Group image tokens.

        Args:
            x: [B, N, C] image (or previous segment) tokens.
            group_tokens: [B, S1, C] group tokens after the shared transformer layers.

        Returns:
            `Grouped(tokens [B, S2, C], soft [B, S2, N], hard [B, S2, N])`.
        """
        group_tokens = self.norm_tokens(group_tokens)  # [B, S1, C]
        x = self.norm_x(x)  # [B, N, C]
        groups = self.norm_post_tokens(self.mlp_inter(group_tokens))  # [B, S2, C]
        groups = self.pre_assign_attn(groups, x)  # [B, S2, C]
        pooled, soft, used = self.assign(groups, x)  # [B, S2, C], [B, S2, N] x2
        new = pooled + groups  # [B, S2, C]
        new = new + self.mlp_channels(self.norm_new_x(new))  # [B, S2, C]
        return Grouped(tokens=new, soft=soft, hard=used)


def compose_assignments(assignments: Sequence[Tensor]) -> Tensor:
    """Chain the stages' assignments into token-to-final-segment weights.

    Each stage's matrix has columns summing to 1 over its groups, so the product does too.
    Computed in fp32 with autocast off, so masks keep summing to 1 under bf16 autocast.

    Args:
        assignments: [B, S_1, N], [B, S_2, S_1], ..., [B, S_K, S_{K-1}].

    Returns:
        [B, S_K, N] float32.
    """
    with torch.autocast(device_type=assignments[0].device.type, enabled=False):
        out = assignments[0].float()  # [B, S_1, N]
        for a in assignments[1:]:
            out = torch.bmm(a.float(), out)  # [B, S_k, S_{k-1}] @ [B, S_{k-1}, N] -> [B, S_k, N]
    return out
