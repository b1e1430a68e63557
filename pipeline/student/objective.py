"""The student's objective: every loss term, weighted in one place, and what a step needs for it."""

from __future__ import annotations

import torch

from pipeline.config import LossConfig
from pipeline.core.errors import ConfigError
from pipeline.core.views import view_layout
from pipeline.student.anchors import anchor_prior, view_anchors
from pipeline.student.cells import cell_layout, local_view_mask, token_cells
from pipeline.student.grouping import compose_assignments
from pipeline.student.losses import (
    AssignmentInfoMaxLoss,
    DistillationLoss,
    ReconstructionLoss,
    RegionMatchingLoss,
    SegmentMatchingLoss,
)
from pipeline.student.tokens import TokenAnchorLoss, token_targets


class StudentObjective(torch.nn.Module):
    """All loss terms, weighted in this one place. Returns (total, {term: unweighted value}).

    It also says what a training step must compute for it (`needs_tokens`, `needs_decoder`) and
    what must be set before the first step (`needs_anchors`: `set_anchors`), so the engine and the
    run ask it instead of reading loss keys.

    Args:
        cfg: the `loss` section.
        grids: the targets' grids in canonical order (V = sum g*g).
    """

    def __init__(self, cfg: LossConfig, grids: tuple[int, ...]):
        super().__init__()
        self.cfg = cfg
        self.distill = DistillationLoss()
        self.matching = SegmentMatchingLoss(bidirectional=cfg.bidirectional_matching)
        self.reconstruction = ReconstructionLoss(norm_pix=cfg.norm_pix)
        self.infomax = AssignmentInfoMaxLoss()
        self.region = RegionMatchingLoss()
        self.token_anchors = TokenAnchorLoss(tau=cfg.anchor_tau)
        self.view_ranking = TokenAnchorLoss(tau=cfg.view_anchor_tau, name="token_views")
        # Set by `set_anchors` before training when loss.token_anchors is on.
        self.register_buffer("anchors", torch.zeros(0), persistent=False)  # [K, D]
        self.register_buffer("anchor_prior", torch.zeros(0), persistent=False)  # [K] taken out of the targets' cosines
        self.register_buffer("background_words", torch.zeros(0, dtype=torch.long), persistent=False)  # the background words, as indices
        self.register_buffer("object_words", torch.zeros(0, dtype=torch.long), persistent=False)  # the others, as indices
        self.register_buffer("view_anchors", torch.zeros(0), persistent=False)  # [K_v, D] loss.view_anchors' directions
        self.grids = grids
        # Local views as indices, not a mask, and their presence as a Python bool: indexing with
        # a boolean CUDA mask and `bool(tensor)` each make the host wait for the GPU.
        local = local_view_mask(grids)
        self.has_local = bool(local.any())
        self.register_buffer("local", local.nonzero().squeeze(1), persistent=False)  # [V_local] view indices
        region = set(cfg.region_grids or grids)
        if cfg.region_grids and (not region <= set(grids) or region == {1}):
            raise ConfigError(f"loss.region_grids {list(cfg.region_grids)}: must be local grids among loss.grids {list(grids)}")
        if cfg.view_anchors and not self.needs_tokens:
            raise ConfigError("loss.view_anchors ranks beside the word anchors: it needs loss.token_anchors and a local grid among loss.grids")
        layout = view_layout(grids)
        self.register_buffer("region_views", torch.tensor([float(g in region) for g, _, _ in layout]), persistent=False)
        # The token terms' targets (tokens.py): each token's region-grid cells, and the crop grids'
        # cells that hold it, weighted by loss.token_crop_weight over the crop grids.
        crops = [g for g in grids if g != 1 and g not in region]
        crop_views = torch.tensor([float(g in crops) for g, _, _ in layout])
        self.register_buffer("token_views", self.region_views + cfg.token_crop_weight * crop_views / max(1, len(crops)), persistent=False)
        self.register_buffer("layout", cell_layout(grids), persistent=False)  # [3, V]

    @property
    def needs_tokens(self) -> bool:
        """Whether a step must map the visible patch tokens into the teacher's space (`StudentOutput.tokens`)."""
        return bool(self.has_local and self.cfg.token_anchors)

    @property
    def needs_decoder(self) -> bool:
        """Whether a step must run the reconstruction decoder."""
        return bool(self.cfg.reconstruction)

    @property
    def needs_anchors(self) -> bool:
        """Whether `set_anchors` must be called before the first step (the token term is the anchor term)."""
        return self.needs_tokens

    @property
    def needs_sample(self) -> bool:
        """Whether `set_anchors` needs a cache sample (`loss.anchor_prior: balance`, `loss.view_anchors`)."""
        return self.needs_anchors and (self.cfg.anchor_prior == "balance" or bool(self.cfg.view_anchors))

    def set_anchors(
        self, anchors: torch.Tensor, *, background: torch.Tensor | None = None, sample: torch.Tensor | None = None, seed: int = 0
    ) -> None:
        """The anchor term's [K, D] unit text embeddings (`anchors.text_anchors`). From the views of
        a cache sample [n, V, D] that the term reads (the local views of the region grids): with
        `loss.anchor_prior: balance`, the words' [K] prior (`anchors.anchor_prior`), the words
        flagged in `background` [K] (bool) keeping a zero prior; with `loss.view_anchors`, the
        wordless anchors (`anchors.view_anchors`, k-means seeded by `seed`)."""
        self.anchors = anchors.to(self.local.device, torch.float32)
        self.anchor_prior = self.anchors.new_zeros(len(self.anchors))
        if self.cfg.token_background:
            if background is None or not background.any() or background.all():
                raise ConfigError("loss.token_background needs background words (eval.bg_words) and object words among loss.anchor_vocabulary")
            self.background_words = background.nonzero().squeeze(1).to(self.local.device)
            self.object_words = (~background).nonzero().squeeze(1).to(self.local.device)
        if not self.needs_sample:
            return
        if sample is None:
            raise RuntimeError("loss.anchor_prior balance and loss.view_anchors need a cache sample (StudentObjective.set_anchors)")
        views = sample[:, self.local[self.region_views[self.local] > 0].cpu()].flatten(0, 1)  # [n * V_region, D]
        if self.cfg.anchor_prior == "balance":
            if background is None:
                raise RuntimeError("loss.anchor_prior balance needs the background words (StudentObjective.set_anchors)")
            self.anchor_prior = anchor_prior(views, anchors, background).to(self.anchors)
        if self.cfg.view_anchors:
            self.view_anchors = view_anchors(views, self.cfg.view_anchor_count, seed=seed).to(self.anchors)

    def forward(self, out, targets: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args:
            out: the student's `StudentOutput`.
            targets: [B, V, D] teacher views as cached.
            patches: [B, L, p*p*3] the images' patches (reconstruction targets).
        """
        c = self.cfg
        terms = dict(self.distill(out.z, targets))
        weights = {"distill": c.distill}
        if c.segment_match and self.has_local:
            terms.update(self.matching(out.segments, targets, self.local))
            weights.update(segment_match=c.segment_match, view_match=c.view_match)
        tokens = self.needs_tokens and out.tokens is not None
        if (c.region_match and self.has_local) or tokens:
            cells = token_cells(out.ids_keep, out.grid, self.layout)  # [B, N, V], shared by both terms
        if c.region_match and self.has_local:
            terms.update(self.region(out.segments, targets, compose_assignments(out.hard_assignments), cells * self.region_views))
            weights["region_match"] = c.region_match
        if tokens:
            if not len(self.anchors):
                raise RuntimeError("loss.token_anchors needs the teacher's text anchors (StudentObjective.set_anchors)")
            target, has = token_targets(targets, cells * self.token_views)  # [B, N, D], [B, N]
            words = (self.background_words, self.object_words) if c.token_background else None
            terms.update(self.token_anchors(out.tokens, target, has, self.anchors, self.anchor_prior, words))
            weights.update(token_anchors=c.token_anchors, token_background=c.token_background)
            if c.view_anchors:
                terms.update(self.view_ranking(out.tokens, target, has, self.view_anchors))
                weights["token_views"] = c.view_anchors
        if c.reconstruction and out.pred is not None:
            terms.update(self.reconstruction(out.pred, patches, out.mask))
            weights["reconstruction"] = c.reconstruction
        if c.infomax:
            terms.update(self.infomax(out.soft_assignments))
            weights.update(usage_neg_entropy=c.infomax, token_entropy=c.infomax)
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms
