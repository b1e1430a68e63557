"""The space in which the student's embeddings are compared with the teacher's views.

The teacher's views of one dataset share a large common component: on the demo their unit
vectors have a mean resultant length of 0.61 (a random set would have ~0), and what tells a
star from a circle is a small residual around that mean. An L1 loss on unit vectors is then
met almost as well by predicting the mean as by predicting the view, and the student learns
exactly that (its segments came out 0.95 cosine-similar whatever shape they covered).

Feature-distillation practice answers this by changing the target space, not the loss: the
targets are whitened or standardised teacher features (Wei et al. 2022, "Contrastive learning
rivals masked image modeling in fine-tuning via feature distillation"; data2vec's normalised
targets). `loss.target_norm` chooses:

- `none`: unit vectors (the paper's implicit choice): targets `t/|t|`, predictions `x/|x|`;
- `center`: `(t/|t| - mean) / (rms sqrt(D))`, one scale for every dimension;
- `standardize`: `(t/|t| - mean) / (std sqrt(D))`, per dimension.

The sqrt(D) keeps the transformed targets' expected squared norm at 1, as unit vectors have, so
the loss weights in params.yaml mean the same in every space. Without it the L1 terms grew about
14x on the demo (per-dimension values of ~1 instead of ~1/sqrt(D)), which is a 14x heavier
region-matching weight, and the grouping collapsed to one segment per window.

`mean` and `std` are the teacher's statistics over a sample of the cache (unit vectors, every
view of the training grids pooled), kept as buffers of this module and so in every checkpoint.
Under `center` and `standardize` the student regresses the transformed targets directly (no
normalisation of its output), and `to_teacher` maps its output back, exactly, into the
teacher's space for classification against text embeddings: the map is affine and invertible.
Under `none` the buffers stay 0 and 1 and `to_teacher` is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_NORMS = ("none", "center", "standardize")


class TargetSpace(nn.Module):
    """Buffers `mean` [D] and `scale` [D] of the affine map between teacher and target space.

    Args:
        dim: the teacher's embedding width D.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @property
    def affine(self) -> bool:
        """True under `center` / `standardize`: predictions are compared as they are, not normalised."""
        return bool(torch.any(self.mean != 0) or torch.any(self.scale != 1))

    def set_statistics(self, mode: str, mean: Tensor, std: Tensor) -> None:
        """Fix the map for `mode` from the teacher's unit-vector statistics (`mean`, `std`: [D])."""
        if mode not in TARGET_NORMS:
            raise ValueError(f"target norm {mode!r}: one of {', '.join(TARGET_NORMS)}")
        if mode == "none":
            self.mean.zero_()
            self.scale.fill_(1.0)
            return
        self.mean.copy_(mean)
        root_d = len(mean) ** 0.5
        if mode == "center":
            self.scale.fill_(float(std.pow(2).mean().sqrt()) * root_d)  # the rms of the centered components, x sqrt(D)
        else:
            self.scale.copy_(std.clamp_min(1e-3 * float(std.max())) * root_d)  # a constant dimension must not blow up

    def targets(self, teacher: Tensor) -> Tensor:
        """[..., D] teacher embeddings (as cached) -> target space."""
        return (F.normalize(teacher.float(), dim=-1) - self.mean) / self.scale

    def predictions(self, student: Tensor, affine: bool | None = None) -> Tensor:
        """[..., D] student outputs -> target space (unit vectors under `none`).

        Args:
            affine: whether the space is affine (pass it when known, to avoid a device sync).
        """
        affine = self.affine if affine is None else affine
        return student.float() if affine else F.normalize(student.float(), dim=-1)

    def to_teacher(self, student: Tensor) -> Tensor:
        """[..., D] student outputs -> the teacher's space (a direction: classification normalises)."""
        return student * self.scale.to(student.dtype) + self.mean.to(student.dtype)


@torch.no_grad()
def unit_statistics(views: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [D], std [D]) of `views` [N, D] as unit vectors (NaN rows, failed images, skipped)."""
    views = views.float()
    views = views[~torch.isnan(views).any(dim=-1)]
    unit = F.normalize(views, dim=-1)
    return unit.mean(dim=0), unit.std(dim=0, unbiased=False)
