"""The segmentation head: transformer layers with group tokens and grouping blocks (GroupViT).

Layer layout for `depth=5, group_stages=((2, 32), (4, 8))` (the paper's):

    [patches N | 32 group tokens] -> layers 1-2 -> grouping -> 32 segments
    [32 segments | 8 group tokens] -> layers 3-4 -> grouping -> 8 segments
    [8 segments]                   -> layer 5   -> norm

Group tokens ride along through the layers before their grouping block (full self-attention
over tokens and groups together). The head is agnostic to how many tokens come in: in
training it sees the visible patches only, at inference all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pipeline.student.grouping import GROUPVIT_NORM, GroupingBlock, TokenMixingMlp


class HeadOutput(NamedTuple):
    """Output of `SegmentationHead`."""

    tokens: Tensor  # [B, S_last, C] normalized segment tokens
    soft: list[Tensor]  # per stage k: [B, S_k, N_k] noise-free soft assignment (for masks, losses)
    hard: list[Tensor]  # per stage k: [B, S_k, N_k] assignment used in the forward pass


class SegmentationHead(nn.Module):
    """GroupViT-style head over encoder patch tokens.

    Args:
        dim: token width C (the encoder's).
        num_heads: attention heads of the transformer layers and cross-attention.
        mlp_ratio: MLP ratio of all blocks.
        depth: total transformer layers in the head.
        group_stages: `((after_layer, num_groups), ...)`, see `StudentArch`.
        hard_assignment: Gumbel + straight-through hard assignment in training.
        gumbel_tau: Gumbel-softmax temperature.
        group_token_projector: GroupViT's projector of stage k-1 group tokens into stage k.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        depth: int,
        group_stages: tuple[tuple[int, int], ...],
        hard_assignment: bool = True,
        gumbel_tau: float = 1.0,
        group_token_projector: bool = True,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.group_stages = tuple(tuple(s) for s in group_stages)
        self.blocks = nn.ModuleList(
            Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=GROUPVIT_NORM) for _ in range(depth)
        )
        counts = [n for _, n in self.group_stages]
        self.group_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, n, dim)) for n in counts)
        self.grouping = nn.ModuleList(
            GroupingBlock(
                dim=dim, num_heads=num_heads, num_group_tokens=n, num_output_groups=n,
                mlp_ratio=mlp_ratio, hard=hard_assignment, gumbel=hard_assignment,
                gumbel_tau=gumbel_tau,
            )
            for n in counts
        )
        # projector k maps stage k's outgoing group tokens into stage k+1's incoming ones
        self.group_projectors = nn.ModuleList(
            nn.Sequential(GROUPVIT_NORM(dim), TokenMixingMlp(num_tokens=prev, hidden=dim // 2, num_out=n))
            for prev, n in zip(counts[:-1], counts[1:])
        ) if group_token_projector else None
        self.norm = GROUPVIT_NORM(dim)
        for k, tokens in enumerate(self.group_tokens):
            if k == 0 or self.group_projectors is None:  # GroupViT: zero init where projected
                trunc_normal_(tokens, std=0.02)

    def forward(self, x: Tensor) -> HeadOutput:
        """Group tokens into segments.

        Args:
            x: [B, N, C] patch tokens (any N: visible ones in training, all at inference).

        Returns:
            `HeadOutput`: tokens [B, S_last, C]; per stage k soft and used assignments
            [B, S_k, N_k] with N_0 = N and N_k = S_{k-1}.
        """
        B = x.shape[0]
        soft, hard = [], []
        layer = 0
        prev_groups = None
        for k, (after, _) in enumerate(self.group_stages):
            groups = self.group_tokens[k].expand(B, -1, -1)  # [B, S_k, C]
            if prev_groups is not None and self.group_projectors is not None:
                groups = groups + self.group_projectors[k - 1](prev_groups)  # [B, S_k, C]
            n = x.shape[1]
            cat = torch.cat([x, groups], dim=1)  # [B, N_k + S_k, C]
            for blk in self.blocks[layer:after]:
                cat = blk(cat)
            x, groups = cat[:, :n], cat[:, n:]  # [B, N_k, C], [B, S_k, C]
            out = self.grouping[k](x, groups)
            x = out.tokens  # [B, S_k, C]
            soft.append(out.soft)
            hard.append(out.hard)
            prev_groups = groups
            layer = after
        for blk in self.blocks[layer:]:
            x = blk(x)  # [B, S_last, C]
        return HeadOutput(tokens=self.norm(x), soft=soft, hard=hard)
