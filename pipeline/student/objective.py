"""The student's objective: every loss term, weighted in one place."""

from __future__ import annotations

import torch

from pipeline.config import Params
from pipeline.core.errors import ConfigError
from pipeline.core.views import view_layout
from pipeline.student.anchors import anchor_logits, anchor_prior
from pipeline.student.grouping import compose_assignments
from pipeline.student.losses import (
    AssignmentInfoMaxLoss,
    ContrastiveRegionLoss,
    DistillationLoss,
    ReconstructionLoss,
    RegionMatchingLoss,
    SegmentCropLoss,
    SegmentMatchingLoss,
    TokenDistillationLoss,
    TokenRelationLoss,
    cell_layout,
    local_view_mask,
    token_cells,
)
from pipeline.student.prototypes import (
    SegmentPrototypeLoss,
    TokenPrototypeLoss,
    view_prototypes,
)
from pipeline.student.target_space import TargetSpace


class StudentObjective(torch.nn.Module):
    """All loss terms, weighted in this one place. Returns (total, {term: unweighted value})."""

    def __init__(self, params: Params, grids: tuple[int, ...]):
        super().__init__()
        self.cfg = params.loss
        # Under a centered or standardised target space both sides arrive transformed (forward).
        self.affine = self.cfg.target_norm != "none"
        unit = not self.affine
        self.distill = DistillationLoss(normalize=unit)
        self.matching = SegmentMatchingLoss(bidirectional=self.cfg.bidirectional_matching, normalize=unit)
        self.reconstruction = ReconstructionLoss(norm_pix=self.cfg.norm_pix)
        self.infomax = AssignmentInfoMaxLoss(usage=self.cfg.infomax_usage)
        self.region = RegionMatchingLoss(normalize=unit)
        self.contrastive = ContrastiveRegionLoss(tau=self.cfg.contrastive_tau)
        self.segment_crop = SegmentCropLoss()
        self.token = TokenDistillationLoss(normalize=unit)
        self.token_relation = TokenRelationLoss(tau=self.cfg.contrastive_tau)
        self.token_prototypes = TokenPrototypeLoss(tau=self.cfg.prototype_tau)
        self.segment_prototypes = SegmentPrototypeLoss(tau=self.cfg.prototype_tau)
        # Set by `set_prototypes` before training when loss.token_prototypes is on (from the cache sample).
        self.register_buffer("prototypes", torch.zeros(0), persistent=False)
        self.register_buffer("view_mean", torch.zeros(0), persistent=False)
        # Set by `set_anchors` before training when loss.segment_anchors or loss.token_anchors is on.
        self.register_buffer("anchors", torch.zeros(0), persistent=False)
        self.register_buffer("anchor_origin", torch.zeros(0), persistent=False)  # the anchor terms' zero "mean" [D]
        self.register_buffer("anchor_prior", torch.zeros(0), persistent=False)  # [K] taken out of the targets' cosines
        self.segment_anchors = SegmentPrototypeLoss(tau=self.cfg.anchor_tau, name="segment_anchors")
        self.token_anchors = TokenPrototypeLoss(tau=self.cfg.anchor_tau, name="token_anchors")
        self.grids = grids
        # Local views as indices, not a mask, and their presence as a Python bool: indexing with
        # a boolean CUDA mask and `bool(tensor)` each make the host wait for the GPU.
        local = local_view_mask(grids)
        self.has_local = bool(local.any())
        self.register_buffer("local", local.nonzero().squeeze(1), persistent=False)  # [V_local] view indices
        region = set(self.cfg.region_grids or grids)
        if self.cfg.region_grids and (not region <= set(grids) or region == {1}):
            raise ConfigError(f"loss.region_grids {list(self.cfg.region_grids)}: must be local grids among loss.grids {list(grids)}")
        self.register_buffer("region_views", torch.tensor([float(g in region) for g, _, _ in view_layout(grids)]), persistent=False)
        self.register_buffer("layout", cell_layout(grids), persistent=False)  # [3, V]

    def fit_prototypes(self, sample: torch.Tensor, mean: torch.Tensor, *, seed: int) -> None:
        """With a prototype term on: take `loss.prototypes` prototypes of the local views of a cache
        sample [n, V, D] (`teacher_sample`, as cached) around the teacher's unit mean [D]."""
        if self.cfg.token_prototypes or self.cfg.segment_prototypes:
            local = sample[:, self.local.cpu()].flatten(0, 1)  # [n * V_local, D]
            self.set_prototypes(view_prototypes(local, mean, self.cfg.prototypes, seed=seed), mean)

    def set_prototypes(self, prototypes: torch.Tensor, mean: torch.Tensor) -> None:
        """The teacher's prototypes [K, D] and unit-vector dataset mean [D] (`prototypes.py`)."""
        self.prototypes = prototypes.to(self.local.device, torch.float32)
        self.view_mean = mean.to(self.local.device, torch.float32)

    def set_anchors(self, anchors: torch.Tensor, *, background: torch.Tensor | None = None, sample: torch.Tensor | None = None) -> None:
        """The anchor terms' [K, D] unit text embeddings (`anchors.text_anchors`). With
        `loss.anchor_prior: balance`, also their [K] prior (`anchors.anchor_prior`) from the views of
        a cache sample [n, V, D] that the terms read (the local views of the region grids), the
        words flagged in `background` [K] (bool) keeping a zero prior."""
        self.anchors = anchors.to(self.local.device, torch.float32)
        self.anchor_origin = self.anchors.new_zeros(self.anchors.shape[1])  # a residual around zero is the unit embedding
        self.anchor_prior = self.anchors.new_zeros(len(self.anchors))
        if self.cfg.anchor_prior == "balance":
            if sample is None or background is None:
                raise RuntimeError("loss.anchor_prior balance needs a cache sample and the background words (StudentObjective.set_anchors)")
            used = self.local[self.region_views[self.local] > 0].cpu()
            self.anchor_prior = anchor_prior(sample[:, used].flatten(0, 1), anchors, background).to(self.anchors)

    def _require_anchors(self, term: str) -> None:
        if not len(self.anchors):
            raise RuntimeError(f"loss.{term} needs the teacher's text anchors (StudentObjective.set_anchors)")

    def _require_prototypes(self, term: str) -> None:
        if not len(self.prototypes):
            raise RuntimeError(f"loss.{term} needs the teacher's prototypes (StudentObjective.set_prototypes)")

    def forward(self, out, targets: torch.Tensor, patches: torch.Tensor, space: TargetSpace,
                crops: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args:
            out: the student's `StudentOutput`.
            targets: [B, V, D] teacher views as cached.
            patches: [B, L, p*p*3] the images' patches (reconstruction targets).
            space: the student's target space (`model.target_space`).
            crops: with `loss.segment_crop`, the teacher's embeddings of the segments' crops and
                which segments have one (`SegmentCropTargets`).
        """
        c = self.cfg
        z, segments = out.z, out.segments
        out_targets = targets  # [B, V, D] as cached (the relational term compares unit vectors)
        if self.affine:
            targets = space.targets(targets)  # [B, V, D]
            z, segments = space.predictions(z, affine=True), space.predictions(segments, affine=True)
        terms = dict(self.distill(z, targets))
        weights = {"distill": c.distill}
        if c.segment_match and self.has_local:
            terms.update(self.matching(segments, targets, self.local))
            weights.update(segment_match=c.segment_match, view_match=c.view_match)
        cells = None
        if (c.region_match or c.contrastive or c.token_distill or c.token_relation or c.token_prototypes or c.segment_prototypes
                or c.segment_anchors or c.token_anchors) and self.has_local:
            cells = token_cells(out.ids_keep, out.grid, self.layout) * self.region_views  # [B, N, V]
        if (c.region_match or c.contrastive or c.segment_prototypes or c.segment_anchors) and cells is not None:
            assignment = compose_assignments(out.hard_assignments)  # [B, S, N]
            if c.region_match:
                terms.update(self.region(segments, targets, assignment, cells))
                weights["region_match"] = c.region_match
            if c.contrastive:
                terms.update(self.contrastive(segments, targets, assignment, cells))
                weights["contrastive"] = c.contrastive
            if c.segment_prototypes:
                self._require_prototypes("segment_prototypes")
                terms.update(self.segment_prototypes(space.to_teacher(out.segments), out_targets, assignment, cells, self.prototypes, self.view_mean))
                weights["segment_prototypes"] = c.segment_prototypes
            if c.segment_anchors:
                self._require_anchors("segment_anchors")
                terms.update(self.segment_anchors(space.to_teacher(out.segments), out_targets, assignment, cells, self.anchors, self.anchor_origin,
                                                    self.anchor_prior))
                weights["segment_anchors"] = c.segment_anchors
        if c.token_distill and cells is not None and out.tokens is not None:
            tokens = space.predictions(out.tokens, affine=True) if self.affine else out.tokens  # [B, N, D]
            terms.update(self.token(tokens, targets, cells))
            weights["token_distill"] = c.token_distill
        if c.token_relation and cells is not None and out.tokens is not None:
            terms.update(self.token_relation(out.tokens, out_targets, cells, self.local))
            weights["token_relation"] = c.token_relation
        if c.token_prototypes and cells is not None and out.prototype_logits is not None:
            self._require_prototypes("token_prototypes")
            terms.update(self.token_prototypes(out.prototype_logits, out_targets, cells, self.prototypes, self.view_mean))
            weights["token_prototypes"] = c.token_prototypes
        if c.token_anchors and cells is not None and out.tokens is not None:
            self._require_anchors("token_anchors")
            logits = anchor_logits(space.to_teacher(out.tokens), self.anchors, c.anchor_tau)  # [B, N, K]
            terms.update(self.token_anchors(logits, out_targets, cells, self.anchors, self.anchor_origin, self.anchor_prior))
            weights["token_anchors"] = c.token_anchors
        if c.segment_crop and crops is not None:
            terms.update(self.segment_crop(out.segments, *crops, compose_assignments(out.hard_assignments)))
            weights["segment_crop"] = c.segment_crop
        if c.reconstruction and out.pred is not None:
            terms.update(self.reconstruction(out.pred, patches, out.mask))
            weights["reconstruction"] = c.reconstruction
        if c.infomax:
            terms.update(self.infomax(out.soft_assignments))
            weights.update(usage_neg_entropy=c.infomax, token_entropy=c.infomax)
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms
