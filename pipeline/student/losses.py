"""Stage-two losses. Each module returns a dict of named, unweighted terms.

Weights are applied in one place (the training step), so the same dict feeds the optimizer
and the logger. The embedding losses reduce the L1 distance by its mean over dimensions. By
default (`normalize=True`) they L2-normalize student and teacher vectors (METHOD.md "Losses":
the paper gives none of this); with `normalize=False` they take both already in a target
space (`pipeline/student/target_space.py`: centered or standardised teacher statistics) and
compare them as they are.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.views import view_layout


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over the last axis (broadcasting): [..., D] x [..., D] -> [...]."""
    return (a - b).abs().mean(dim=-1)


def local_view_mask(grids: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
    """Which views are local (not the whole image), for views ordered grid by grid.

    Args:
        grids: the cache's grids in view order, e.g. [1, 2, 3, 4] (V = sum g*g).

    Returns:
        [V] bool, False for every view of a 1x1 grid.
    """
    flags = [g != 1 for g in grids for _ in range(g * g)]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def _unit(x: Tensor, normalize: bool) -> Tensor:
    """x as float, L2-normalized over the last axis when `normalize` (else already in a target space)."""
    return F.normalize(x.float(), dim=-1) if normalize else x.float()


class DistillationLoss(nn.Module):
    """Multi-scale distillation: the global embedding z to every teacher view, 1x1 included.

    Args:
        normalize: L2-normalize both sides (False: both are given in a target space).
    """

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Args:
            z: [B, D] student global embedding.
            targets: [B, V, D] teacher view embeddings.

        Returns:
            {"distill": mean over B, V of the L1 distance (mean over D)}.
        """
        z = _unit(z, self.normalize)  # [B, D]
        t = _unit(targets, self.normalize)  # [B, V, D]
        return {"distill": l1_distance(z[:, None, :], t).mean()}  # [B, V] -> scalar


class SegmentMatchingLoss(nn.Module):
    """Each segment embedding to its nearest local teacher view, by L1.

    The choice of neighbour is made without gradient; only the distance to the chosen view
    is minimized. With `bidirectional=True`, each local view is also pulled to its nearest
    segment (a separate term, `view_match`): a stabilizer against every segment settling on
    the one background view (METHOD.md, prototype findings).

    Args:
        bidirectional: add the view-to-segment term.
        normalize: L2-normalize both sides (False: both are given in a target space).
    """

    def __init__(self, *, bidirectional: bool = False, normalize: bool = True) -> None:
        super().__init__()
        self.bidirectional, self.normalize = bidirectional, normalize

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
        g = _unit(segments, self.normalize)  # [B, S, D]
        t = _unit(targets, self.normalize)[:, local]  # [B, Vl, D]
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


def region_targets(targets: Tensor, assignment: Tensor, cells: Tensor, *, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Each segment's region target and its share of the image's tokens.

    The target is the mean of the local views weighted by the segment's mass inside each view's
    box (so, grid by grid, the views of the cells it covers; grids weigh alike, as each grid's
    boxes tile the image).

    Args:
        targets: [B, V, D] teacher views, unit vectors or in a target space.
        assignment: [B, S, N] token-to-segment weights, summing to 1 over S.
        cells: [B, N, V] from `token_cells` (zero columns for views not used).
        normalize: L2-normalize the target (the unit-vector space); else the plain weighted mean.

    Returns:
        (target [B, S, D], share [B, S] summing to 1 over S).
    """
    a = assignment.float()
    weight = torch.bmm(a, cells.float())  # [B, S, V] segment mass inside each view
    mixed = torch.bmm(weight, targets.float())  # [B, S, D]
    target = F.normalize(mixed, dim=-1) if normalize else mixed / weight.sum(dim=2, keepdim=True).clamp_min(1e-6)
    return target, a.sum(dim=2) / a.shape[2]


class RegionMatchingLoss(nn.Module):
    """Each segment to the teacher views of the cells it covers (a stabilizer, not in the paper).

    A segment's target is `region_targets`'. Unlike nearest-view matching the target depends
    on where the segment lies, and the gradient reaches the assignment too: a segment is
    pulled both to say what the teacher sees in its cells and to lie where the teacher sees
    what it says. Segments are weighted by their share of the image's tokens, so an empty
    segment costs nothing.

    Args:
        normalize: L2-normalize both sides (False: both are given in a target space).
    """

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, segments: Tensor, targets: Tensor, assignment: Tensor, cells: Tensor) -> dict[str, Tensor]:
        """Args:
            segments: [B, S, D] segment embeddings.
            targets: [B, V, D] teacher view embeddings.
            assignment: [B, S, N] token-to-segment weights, summing to 1 over S.
            cells: [B, N, V] from `token_cells` (zero columns for 1x1 views).

        Returns:
            {"region_match": mean over B of sum over S of share_i * L1(g_i, target_i)}.
        """
        g = _unit(segments, self.normalize)  # [B, S, D]
        target, share = region_targets(_unit(targets, self.normalize), assignment, cells, normalize=self.normalize)
        return {"region_match": (share * l1_distance(g, target)).sum(dim=1).mean()}


class TokenDistillationLoss(nn.Module):
    """Each visible patch token to the teacher's views of the cells it lies in (not in the paper).

    The token, through the segment projection, regresses onto the mean of the views whose box
    holds its patch (grid by grid, one cell each; `cells` says which): the region target of a
    one-token segment. Segment-level targets ask the encoder only for what a whole segment
    shows, and a student trained on them alone keeps the shapes apart in its patch tokens
    little better than chance (`bench.science.probe`); this asks every token for its cell.

    Args:
        normalize: L2-normalize both sides (False: both are given in a target space).
    """

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, tokens: Tensor, targets: Tensor, cells: Tensor) -> dict[str, Tensor]:
        """Args:
            tokens: [B, N, D] visible patch tokens in the teacher's space.
            targets: [B, V, D] teacher view embeddings.
            cells: [B, N, V] from `token_cells` (zero columns for views not used).

        Returns:
            {"token_distill": mean over tokens of L1(token, its cells' target)}.
        """
        mixed = torch.bmm(cells.float(), _unit(targets, self.normalize))  # [B, N, D] sum of its cells' views
        target = F.normalize(mixed, dim=-1) if self.normalize else mixed / cells.sum(dim=2, keepdim=True).clamp_min(1.0)
        return {"token_distill": l1_distance(_unit(tokens, self.normalize), target).mean()}


class TokenRelationLoss(nn.Module):
    """Each visible token's similarities to the batch's local views, as its cells' target has them.

    Relational distillation (as SEED and CompRess distil a teacher's similarity distribution): a
    token's softmax over its cosines to every local view of the batch must match that of the
    mean of its own cells' views (`TokenDistillationLoss`'s target), both at temperature
    `tau`. Cosines are taken after the batch's mean view is subtracted from every side (unit
    vectors first, whatever the target space): the teacher's views share a large component, so
    raw cosines are all alike and their softmax nearly flat. What is left is what tells the
    views apart, and predicting the shared mean, which nearly meets L1 regression, does not
    meet this.

    Args:
        tau: the softmax temperature over cosines.
    """

    def __init__(self, *, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, tokens: Tensor, targets: Tensor, cells: Tensor, local: Tensor) -> dict[str, Tensor]:
        """Args:
            tokens: [B, N, D] visible patch tokens in the teacher's space.
            targets: [B, V, D] teacher view embeddings (as cached).
            cells: [B, N, V] from `token_cells` (zero columns for views not used).
            local: [V_local] indices of the local views: the batch's views compared against.

        Returns:
            {"token_relation": mean over tokens of KL(teacher's distribution || the token's)}.
        """
        views = F.normalize(targets.float(), dim=-1)  # [B, V, D]
        batch = views[:, local].flatten(0, 1)  # [B*V_local, D]
        center = batch.mean(dim=0)  # [D] the views' shared component in this batch
        own = F.normalize(torch.bmm(cells.float(), views), dim=-1).flatten(0, 1)  # [B*N, D] each token's cells' target
        student = F.normalize(tokens.float(), dim=-1).flatten(0, 1)  # [B*N, D]
        own, student, batch = (F.normalize(x - center, dim=-1) for x in (own, student, batch))
        p_teacher = F.softmax(own @ batch.T / self.tau, dim=-1)  # [B*N, B*V_local]
        log_student = F.log_softmax(student @ batch.T / self.tau, dim=-1)
        kl = (p_teacher * (torch.log(p_teacher.clamp_min(1e-12)) - log_student)).sum(dim=-1)  # [B*N]
        return {"token_relation": kl.mean()}


class SegmentCropLoss(nn.Module):
    """Each segment to the teacher's embedding of its own masked crop (`segment_crops.py`; not in
    the paper), weighted by its share of the image's tokens, as in region matching."""

    def forward(self, segments: Tensor, crops: Tensor, valid: Tensor, assignment: Tensor) -> dict[str, Tensor]:
        """Args:
            segments: [B, S, D] segment embeddings.
            crops: [B, S, D] unit teacher embeddings of the segments' crops; valid: [B, S] bool.
            assignment: [B, S, N] token-to-segment weights, summing to 1 over S.

        Returns:
            {"segment_crop": mean over B of sum over S of share_i * L1(g_i, crop_i)}.
        """
        share = assignment.float().sum(dim=2) / assignment.shape[2] * valid  # [B, S]
        return {"segment_crop": (share * l1_distance(F.normalize(segments.float(), dim=-1), crops)).sum(dim=1).mean()}


class ContrastiveRegionLoss(nn.Module):
    """Each segment must pick its own region target out of the batch's (InfoNCE; not in the paper).

    L1 regression to targets that share a large common component is nearly met by predicting
    that component; a contrastive term is not: a segment's cosine to its own region target
    (`region_targets`) competes with its cosine to every region target of the other images in
    the batch, at temperature `tau`, so only what tells the images apart lowers it. Segments
    are weighted by their share of the image's tokens, as in region matching.

    Args:
        tau: the softmax temperature over cosines.
    """

    def __init__(self, *, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, segments: Tensor, targets: Tensor, assignment: Tensor, cells: Tensor) -> dict[str, Tensor]:
        """Args: as `RegionMatchingLoss.forward` (targets unit vectors or in a target space).

        Returns:
            {"contrastive": mean over B of sum over S of share_i * cross-entropy of own target}.
        """
        B, S, _ = segments.shape
        target, share = region_targets(targets, assignment, cells, normalize=True)  # [B, S, D] unit
        g = F.normalize(segments.float(), dim=-1).flatten(0, 1)  # [B*S, D]
        logits = g @ target.flatten(0, 1).T / self.tau  # [B*S, B*S]
        image = torch.arange(B, device=g.device).repeat_interleave(S)  # [B*S] image of each row / column
        own = torch.arange(B * S, device=g.device)
        # Other segments of the same image are neither positives nor negatives.
        logits = logits.masked_fill((image[:, None] == image[None, :]) & (own[:, None] != own[None, :]), -math.inf)
        nll = F.cross_entropy(logits, own, reduction="none").view(B, S)  # [B, S]
        return {"contrastive": (share * nll).sum(dim=1).mean()}


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

    Minimizing `usage_neg_entropy` spreads tokens over the groups (against the collapse to one
    segment); minimizing `token_entropy` makes each token's choice confident. Entropies are
    divided by log(S_k) so stages of different sizes weigh alike: the terms lie in [-1, 0] and
    [0, 1]. Terms are averaged over the stages given.

    Args:
        usage: "image" spreads each image's tokens evenly over its groups, which also splits a
            large background into equal parts; "batch" spreads the batch's tokens (the marginal
            of IIC-style clustering), so one image may keep a large group and small ones.
    """

    def __init__(self, usage: str = "image") -> None:
        super().__init__()
        if usage not in ("image", "batch"):
            raise ValueError(f"infomax usage {usage!r}: image or batch")
        self.usage = usage

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
            if self.usage == "batch":
                usage = usage.mean(dim=0, keepdim=True)  # [1, S] share of the batch's tokens
            usage_terms.append(-_entropy(usage, dim=1).mean() / scale)
            token_terms.append(_entropy(p, dim=1).mean() / scale)  # [B, N] -> scalar
        return {
            "usage_neg_entropy": torch.stack(usage_terms).mean(),
            "token_entropy": torch.stack(token_terms).mean(),
        }
