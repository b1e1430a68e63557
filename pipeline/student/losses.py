"""Stage-two losses. Each module returns a dict of named, unweighted terms.

Weights are applied in one place (`objective.py`), so the same dict feeds the optimizer and the
logger. The embedding losses compare unit vectors (student and teacher both L2-normalized) and
reduce the L1 distance by its mean over dimensions (METHOD.md "Losses": the paper gives none of
this).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.student.cells import region_targets


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over the last axis (broadcasting): [..., D] x [..., D] -> [...]."""
    return (a - b).abs().mean(dim=-1)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


class DistillationLoss(nn.Module):
    """Multi-scale distillation: the global embedding z to every teacher view, 1x1 included."""

    def forward(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Args:
            z: [B, D] student global embedding.
            targets: [B, V, D] teacher view embeddings.

        Returns:
            {"distill": mean over B, V of the L1 distance (mean over D)}.
        """
        return {"distill": l1_distance(_unit(z)[:, None, :], _unit(targets)).mean()}  # [B, V] -> scalar


class SegmentMatchingLoss(nn.Module):
    """Each segment embedding to its nearest local teacher view, by L1.

    The choice of neighbour is made without gradient; only the distance to the chosen view
    is minimized. With `bidirectional=True`, each local view is also pulled to its nearest
    segment (a separate term, `view_match`): a stabilizer against every segment settling on
    the one background view (METHOD.md, prototype findings).

    Args:
        bidirectional: add the view-to-segment term.
    """

    def __init__(self, *, bidirectional: bool = False) -> None:
        super().__init__()
        self.bidirectional = bidirectional

    def forward(self, segments: Tensor, targets: Tensor, local: Tensor) -> dict[str, Tensor]:
        """Args:
            segments: [B, S, D] segment embeddings g_i.
            targets: [B, V, D] teacher view embeddings.
            local: the views segments may match (1x1 excluded): [V_local] indices (no host
                sync on a GPU), or a [V] bool mask.

        Returns:
            {"segment_match": mean over B, S of L1(g_i, nearest local view)} and, when
            bidirectional, {"view_match": mean over B, V_local of L1(view, nearest segment)}.
        """
        g = _unit(segments)  # [B, S, D]
        t = _unit(targets)[:, local]  # [B, Vl, D]
        B, S, D = g.shape
        with torch.no_grad():
            dist = torch.cdist(g, t, p=1) / D  # [B, S, Vl] mean-over-D L1
        nearest_view = dist.argmin(dim=2)  # [B, S]
        chosen_view = torch.gather(t, 1, nearest_view[..., None].expand(B, S, D))  # [B, S, D]
        out = {"segment_match": l1_distance(g, chosen_view).mean()}
        if self.bidirectional:
            Vl = t.shape[1]
            nearest_seg = dist.argmin(dim=1)  # [B, Vl]
            chosen_seg = torch.gather(g, 1, nearest_seg[..., None].expand(B, Vl, D))  # [B, Vl, D]
            out["view_match"] = l1_distance(chosen_seg, t).mean()
        return out


class RegionMatchingLoss(nn.Module):
    """Each segment to the teacher views of the cells it covers (a stabilizer, not in the paper).

    A segment's target is `region_targets`'. Unlike nearest-view matching the target depends
    on where the segment lies, and the gradient reaches the assignment too: a segment is
    pulled both to say what the teacher sees in its cells and to lie where the teacher sees
    what it says. Segments are weighted by their share of the image's tokens, so an empty
    segment costs nothing.
    """

    def forward(self, segments: Tensor, targets: Tensor, assignment: Tensor, cells: Tensor) -> dict[str, Tensor]:
        """Args:
            segments: [B, S, D] segment embeddings.
            targets: [B, V, D] teacher view embeddings.
            assignment: [B, S, N] token-to-segment weights, summing to 1 over S.
            cells: [B, N, V] from `token_cells` (zero columns for views not used).

        Returns:
            {"region_match": mean over B of sum over S of share_i * L1(g_i, target_i)}.
        """
        target, share = region_targets(_unit(targets), assignment, cells)
        return {"region_match": (share * l1_distance(_unit(segments), target)).sum(dim=1).mean()}


class ReconstructionLoss(nn.Module):
    """MAE's pixel loss: MSE per patch, averaged over the removed patches only.

    Args:
        norm_pix: normalize each target patch by its own mean and (unbiased) variance, eps 1e-6.
    """

    def __init__(self, *, norm_pix: bool = True) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Args:
            pred: [B, L, P] decoder output.
            target: [B, L, P] image patches (`patchify(imgs)`).
            mask: [B, L] 1 = removed (scored), 0 = visible (ignored).

        Returns:
            {"reconstruction": sum(mse * mask) / sum(mask)} (0 when nothing is masked).
        """
        target = target.float()
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)  # [B, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [B, L, 1]
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, L]
        mask = mask.float()
        return {"reconstruction": (per_patch * mask).sum() / mask.sum().clamp_min(1.0)}


def _entropy(p: Tensor, dim: int) -> Tensor:
    """Shannon entropy (nats) along `dim`; 0 log 0 taken as 0."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=dim)


class AssignmentInfoMaxLoss(nn.Module):
    """Information maximization on soft group assignments (a stabilizer, not in the paper).

    Minimizing `usage_neg_entropy` spreads each image's tokens over its groups (against the
    collapse to one segment); minimizing `token_entropy` makes each token's choice confident.
    Entropies are divided by log(S_k) so stages of different sizes weigh alike: the terms lie in
    [-1, 0] and [0, 1]. Terms are averaged over the stages given.
    """

    def forward(self, assignments: Sequence[Tensor]) -> dict[str, Tensor]:
        """Args:
            assignments: per stage [B, S_k, N_k], each column a distribution over groups
                (the noise-free soft assignments).

        Returns:
            {"usage_neg_entropy": -H(mean usage)/log S, "token_entropy": mean H(token)/log S}.
        """
        usage_terms, token_terms = [], []
        for p in assignments:
            p = p.float()
            S = p.shape[1]
            scale = math.log(S) if S > 1 else 1.0
            usage = p.mean(dim=2)  # [B, S] share of the image's tokens per group
            usage_terms.append(-_entropy(usage, dim=1).mean() / scale)
            token_terms.append(_entropy(p, dim=1).mean() / scale)  # [B, N] -> scalar
        return {
            "usage_neg_entropy": torch.stack(usage_terms).mean(),
            "token_entropy": torch.stack(token_terms).mean(),
        }
