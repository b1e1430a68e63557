"""Prototypes of the teacher's views, and the two loss terms that use them (`loss.token_prototypes`,
`loss.segment_prototypes`).

The teacher's views of one dataset share a large component (`target_space.py`), so the classes
live in the residual around the dataset mean. Spherical k-means on those residuals (unit views
minus the mean, renormalised) gives K directions that tile what tells views apart; a view's
softmax over its cosines to them is a soft pseudo-label drawn from the cache alone, no
vocabulary and no human labels. Written here (about twenty lines of torch) rather than taken
from scikit-learn: it runs on the sample the teacher's statistics are taken from, on the CPU,
deterministically from the run's seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.student.losses import region_targets


def residuals(views: Tensor, mean: Tensor) -> Tensor:
    """[..., D] teacher views -> unit vectors of their residual around the dataset's unit mean `mean` [D]."""
    return F.normalize(F.normalize(views.float(), dim=-1) - mean, dim=-1)


def spherical_kmeans(x: Tensor, k: int, *, iters: int = 30, seed: int = 0) -> Tensor:
    """K unit centroids of the unit vectors x [n, D] (cosine k-means, k-means++ seeding).

    A centroid left with no member is re-seeded at the point farthest from its own centroid,
    so all K stay in use.

    Returns:
        [k, D] unit vectors.
    """
    if len(x) < k:
        raise ValueError(f"{len(x)} vectors for {k} prototypes")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]  # [1, D]
    while len(centroids) < k:  # k-means++: the next seed far (in cosine) from those chosen
        far = (1 - (x @ centroids.T).max(dim=1).values).clamp_min(0)  # [n]
        centroids = torch.cat([centroids, x[torch.multinomial(far + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        sim = x @ centroids.T  # [n, k]
        member = sim.argmax(dim=1)  # [n]
        sums = torch.zeros_like(centroids).index_add_(0, member, x)  # [k, D]
        counts = torch.bincount(member, minlength=k)  # [k]
        fit = sim.gather(1, member[:, None]).squeeze(1)  # [n] each point's cosine to its centroid
        for j in torch.nonzero(counts == 0).flatten().tolist():
            worst = fit.argmin()
            sums[j], fit[worst] = x[worst], float("inf")
        centroids = F.normalize(sums, dim=-1)
    return centroids


def pseudo_labels(views: Tensor, prototypes: Tensor, mean: Tensor, tau: float, prior: Tensor | None = None) -> Tensor:
    """[..., D] embeddings -> [..., K] their residuals' softmax over cosines to the prototypes at `tau`,
    less a [K] `prior` on the cosines where one is given (`anchors.anchor_prior`)."""
    cosines = residuals(views, mean) @ prototypes.T  # [..., K]
    return F.softmax((cosines if prior is None else cosines - prior) / tau, dim=-1)


def view_prototypes(views: Tensor, mean: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """K prototypes [k, D] of the local views [n, D] (as cached), on their residuals around `mean`."""
    return spherical_kmeans(residuals(views, mean), k, seed=seed)


class TokenPrototypeLoss(nn.Module):
    """Each visible token classifies its cells' views among the teacher's prototypes (not in the paper).

    A view's soft pseudo-label is its softmax over cosines to K prototypes (`prototypes.py`:
    k-means of the views' residuals around the dataset mean) at temperature `tau`; a token's is
    the mean of its cells' (grid by grid, as `TokenDistillationLoss` takes them). The token's own
    logits come from a linear head on the encoder (`ZeroSegStudent.prototype_head`), so the
    encoder is asked, with a classification's gradient, which of the residual's directions each
    patch shows. Regression onto the views is nearly met by their shared mean; this is not.

    Args:
        tau: the temperature of the views' softmax over prototypes.
        name: the term's name in the returned dict (the anchor terms reuse this one, `anchors.py`).
    """

    def __init__(self, *, tau: float = 0.05, name: str = "token_prototypes") -> None:
        super().__init__()
        self.tau, self.name = tau, name

    def forward(self, logits: Tensor, targets: Tensor, cells: Tensor, prototypes: Tensor, mean: Tensor,
                prior: Tensor | None = None) -> dict[str, Tensor]:
        """Args:
            logits: [B, N, K] the visible tokens' prototype logits.
            targets: [B, V, D] teacher view embeddings (as cached).
            cells: [B, N, V] from `token_cells` (zero columns for views not used).
            prototypes: [K, D] unit prototypes of the views' residuals.
            mean: [D] the teacher's unit-vector dataset mean.
            prior: optional [K] taken out of the views' cosines before their softmax (`pseudo_labels`).

        Returns:
            {"token_prototypes": mean over tokens of KL(the cells' pseudo-label || the token's softmax)}.
        """
        labels = pseudo_labels(targets, prototypes, mean, self.tau, prior)  # [B, V, K]
        weight = cells.float()
        q = torch.bmm(weight, labels) / weight.sum(dim=2, keepdim=True).clamp_min(1.0)  # [B, N, K]
        has = weight.sum(dim=2) > 0  # [B, N] tokens in some used cell
        kl = (q * (torch.log(q.clamp_min(1e-12)) - F.log_softmax(logits.float(), dim=-1))).sum(dim=-1)  # [B, N]
        return {self.name: (kl * has).sum() / has.sum().clamp_min(1)}


class SegmentPrototypeLoss(nn.Module):
    """Each segment's embedding places its region target among the teacher's prototypes (not in the paper).

    Both the segment and its region target (`region_targets`) are taken as residuals around the
    teacher's dataset mean and compared with the K prototypes (`prototypes.py`) by cosine at
    temperature `tau`: the segment's softmax must match its target's (KL, weighted by the
    segment's share as region matching weighs it). The loss acts on the embedding that is named,
    and only on what is left once the views' shared component is taken out.

    Args:
        tau: the temperature of both softmaxes over prototypes.
        name: the term's name in the returned dict (the anchor terms reuse this one, `anchors.py`).
    """

    def __init__(self, *, tau: float = 0.05, name: str = "segment_prototypes") -> None:
        super().__init__()
        self.tau, self.name = tau, name

    def forward(self, segments: Tensor, targets: Tensor, assignment: Tensor, cells: Tensor, prototypes: Tensor, mean: Tensor,
                prior: Tensor | None = None) -> dict[str, Tensor]:
        """Args:
            segments: [B, S, D] segment embeddings (the teacher's space).
            targets: [B, V, D] teacher view embeddings (as cached).
            assignment: [B, S, N] token-to-segment weights, summing to 1 over S.
            cells: [B, N, V] from `token_cells` (zero columns for views not used).
            prototypes: [K, D] unit prototypes of the views' residuals.
            mean: [D] the teacher's unit-vector dataset mean.
            prior: optional [K] taken out of the region targets' cosines (`pseudo_labels`), not the segment's.

        Returns:
            {"segment_prototypes": mean over B of sum over S of share_i * KL(target_i || segment_i)}.
        """
        target, share = region_targets(F.normalize(targets.float(), dim=-1), assignment, cells)  # [B, S, D] unit
        q = pseudo_labels(target, prototypes, mean, self.tau, prior)  # [B, S, K]
        log_p = F.log_softmax(residuals(segments, mean) @ prototypes.T / self.tau, dim=-1)
        kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=-1)  # [B, S]
        return {self.name: (share * kl).sum(dim=1).mean()}
