"""Label-free health of a training student: is it grouping, and do its segments say anything?

A run on ImageNet cannot be checked against masks, but the two ways ZeroSeg training fails show
without labels, on the batch that was just trained on:

- the grouping collapses: one segment takes every token (`segments_per_image` -> 1, and the
  assignment entropy -> 0 with it), or none is confident (entropy -> 1);
- the naming collapses: every segment says the teacher's dataset mean, whatever it covers. Its
  segments then sit around one direction (`segment_resultant`, the mean resultant length of
  their unit vectors, above the teacher views' `teacher_resultant`), span few directions beyond
  it (`segment_rank` against `teacher_rank`: effective ranks of the centered vectors), and
  cannot be told apart across images: `segment_retrieval`, the share of segments whose nearest
  teacher view in the batch is one of their own image's, falls to chance (1 / batch size),
  and the same-image minus cross-image cosine gap (`segment_image_gap`) falls to 0.

How these curves read for a collapsed and for a healthy run: docs/training.md, "Training health".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.student.grouping import compose_assignments

USED_SHARE = 0.01  # a segment that owns at least this share of an image's tokens is in use


def effective_rank(x: Tensor) -> float:
    """exp(entropy of the normalized singular values) of [N, D] centered rows (Roy & Vetterli 2007)."""
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def resultant(x: Tensor) -> float:
    """Mean resultant length of [N, D] unit vectors: 1 all alike, ~0 spread over the sphere."""
    return float(x.mean(dim=0).norm())


def _image_gap(x: Tensor, image: Tensor) -> float:
    """Mean cosine of [N, D] unit rows within an image minus across images (pairs of distinct rows)."""
    cos = x @ x.T  # [N, N]
    same = image[:, None] == image[None, :]
    other = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    within, across = cos[same & other], cos[~same]
    if not len(within) or not len(across):
        return float("nan")
    return float(within.mean() - across.mean())


IMAGES = 16  # the batch's first images the figures are taken on: the teacher's pairwise cosines grow with its square


@torch.no_grad()
def health_metrics(out, targets: Tensor, local: Tensor, images: int = IMAGES) -> dict[str, float]:
    """The health figures of the first `images` images of one training batch (a logging cadence's
    worth of them costs under 1% of the steps; the whole demo batch's pairwise cosines cost more
    than a step).

    Args:
        out: the student's `StudentOutput` for the batch.
        targets: [B, V, D] teacher views as cached.
        local: [V_local] indices of the local views (1x1 excluded).

    Returns:
        {name: value}; see the module docstring.
    """
    targets = targets[:images]
    hard = compose_assignments([a[:images] for a in out.hard_assignments]).float()  # [B, S, N]
    soft = compose_assignments([a[:images] for a in out.soft_assignments]).float()  # [B, S, N]
    B, S, _ = hard.shape
    used = hard.mean(dim=2) >= USED_SHARE  # [B, S]
    entropy = -(soft * soft.clamp_min(1e-12).log()).sum(dim=1).mean() / math.log(S) if S > 1 else soft.new_zeros(())
    seg = F.normalize(out.segments[:images].float(), dim=-1)[used]  # [U, D] teacher space
    seg_image = torch.arange(B, device=seg.device)[:, None].expand(B, S)[used]  # [U]
    views = F.normalize(targets.float(), dim=-1)
    views = views[:, local] if len(local) else views  # [B, Vl, D]; all views when there is no local one (loss.grids [1])
    Vl = views.shape[1]
    view_image = torch.arange(B, device=seg.device).repeat_interleave(Vl)  # [B*Vl]
    views = views.flatten(0, 1)  # [B*Vl, D]
    figures = {
        "segments_per_image": float(used.sum(dim=1).float().mean()),
        "assignment_entropy": float(entropy),
        "teacher_resultant": resultant(views),
        "teacher_rank": effective_rank(views),
        "retrieval_chance": 1.0 / B,
        "teacher_image_gap": _image_gap(views, view_image),
    }
    if not len(seg):  # no segment in use (hard assignments can leave every share under 1%)
        return {**figures, **dict.fromkeys(("segment_resultant", "segment_rank", "segment_retrieval", "segment_image_gap"), float("nan"))}
    nearest = (seg @ views.T).argmax(dim=1)  # [U] nearest view in the whole batch
    return {
        **figures,
        "segment_resultant": resultant(seg),
        "segment_rank": effective_rank(seg),
        "segment_retrieval": float((view_image[nearest] == seg_image).float().mean()),
        "segment_image_gap": _image_gap(seg, seg_image),
    }
