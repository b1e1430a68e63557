"""Training-free baselines: the teacher alone, no student, through the same protocol.

- `training_free` (any teacher): classify every cell of 2x2, 3x3 and 4x4 grids over the
  resized image (the cache's own kind of views) and average the cells' class scores per pixel.
- `maskclip`, `sclip`, `naclip` (open_clip ViT teachers): dense CLIP as MaskCLIP, SCLIP and
  NACLIP do it, each rewriting the teacher's last block only (`DENSE_CLIP`): one embedding per
  patch, through the final LayerNorm and the image projection; teacher-sized windows slide over
  the image with half-window stride and overlapping scores are averaged.
- `maskclip` also for open_clip ResNet teachers (CLIP's ModifiedResNet), as the MaskCLIP paper
  runs RN50: the attention pool's query and key are dropped, and every location of the last
  feature map goes through the pool's value and output projections (with its position
  embedding, interpolated to the map); a ResNet is convolutional, so it sees the whole image.
- `grouped_maskclip`, `grouped_sclip`, `grouped_naclip`, `grouped_training_free`: not the teacher
  alone but the student's segments named by that method's scores (`TeacherNamedSegmenter`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.dense import check_dense_teacher, dense_features
from pipeline.clip.model import Teacher
from pipeline.core.views import cell_edges
from pipeline.evaluation.inference import (
    BackgroundRule,
    Prediction,
    StudentSegmenter,
    WindowAverage,
    class_scores,
    finish,
    keep_topk,
    resize_short_side,
    window_origins,
)


def _normalize(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """[n, 3, T, T] in 0..255 -> the teacher's normalized input."""
    mean = torch.tensor(teacher.spec.mean, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(teacher.spec.std, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels - mean) / std


def _to_view(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """[3, h, w] in 0..255 -> [3, T, T] at the teacher's input size (8-bit levels, as the cache's views)."""
    size = teacher.spec.size
    return F.interpolate(pixels[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp_(0, 255).round_()


def _restrict(scores: torch.Tensor, teacher: Teacher, x: torch.Tensor, text: torch.Tensor, scale: float, rule: BackgroundRule, topk: int, center: torch.Tensor | None) -> torch.Tensor:
    """`keep_topk` with the image's classes picked by the teacher's whole-image (1x1) view."""
    if not topk:
        return scores
    image = class_scores(teacher.encode(_normalize(teacher, _to_view(teacher, x.to(teacher.device))[None])), text, scale, rule.mode, center)[0]  # [K']
    return keep_topk(scores, image, topk, rule.background_rows)


class ScoreMapSegmenter:
    """A teacher method that scores every pixel: `predict` decides on `scores`, which are computed
    once per image (the method's own column and its grouped one share the pass)."""

    rule: BackgroundRule
    _last: tuple[np.ndarray, torch.Tensor] | None = None  # (image, its scores)

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> Prediction:
        score, label = self.rule.decide(self.scores(image))  # [h, w]
        return finish(label, score, self.rule, image.shape[:2])

    @torch.inference_mode()
    def scores(self, image: np.ndarray) -> torch.Tensor:
        """[h, w, K] class scores over the image at the method's resolution (top-k restricted)."""
        if self._last is None or self._last[0] is not image:
            self._last = (image, self.compute_scores(image))
        return self._last[1]

    def compute_scores(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class GridTeacherSegmenter(ScoreMapSegmenter):
    """The training-free baseline: the teacher classifies grid cells, pixels average their cells.

    Args:
        teacher: the loaded CLIP teacher.
        text: [K', D] unit class embeddings (background words first under the `class` rule).
        logit_scale, rule, short_side: as for the student.
        grids: grid sizes whose cells are classified (the cache's local views by default).
        topk_classes: keep only the image's k best classes by its whole-image view (0: all).
        center: [D] eval.calibration's mean, as for the student (`class_scores`).
    """

    def __init__(self, teacher: Teacher, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int = 448, grids: Sequence[int] = (2, 3, 4), topk_classes: int = 0, center: torch.Tensor | None = None):
        self.teacher, self.text, self.scale, self.rule = teacher, text.to(teacher.device), logit_scale, rule
        self.short_side, self.grids, self.topk, self.center = short_side, tuple(grids), topk_classes, center

    def compute_scores(self, image: np.ndarray) -> torch.Tensor:
        """Every pixel's cells' class scores, averaged over the grids."""
        x = resize_short_side(image, self.short_side).round_()  # [3, h, w] 8-bit levels
        h, w = x.shape[-2:]
        cells, boxes = [], []
        for g in self.grids:
            ys, xs = cell_edges(h, g), cell_edges(w, g)
            for r in range(g):
                for c in range(g):
                    cells.append(_to_view(self.teacher, x[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]]))
                    boxes.append((ys[r], ys[r + 1], xs[c], xs[c + 1]))
        views = torch.stack(cells)  # [n, 3, T, T]
        probs = class_scores(self.teacher.encode(_normalize(self.teacher, views)), self.text, self.scale, self.rule.mode, self.center)  # [n, K]
        acc = torch.zeros(self.text.shape[0], h, w, device=probs.device)  # [K, h, w]
        for p, (y0, y1, x0, x1) in zip(probs, boxes):
            acc[:, y0:y1, x0:x1] += p[:, None, None]
        acc /= len(self.grids)  # every pixel lies in exactly one cell per grid
        return _restrict(acc.permute(1, 2, 0), self.teacher, x, self.text, self.scale, self.rule, self.topk, self.center)  # [h, w, K]


class MaskCLIPSegmenter(ScoreMapSegmenter):
    """Dense CLIP from an open_clip teacher: one class decision per patch (ViT) or location (ResNet).

    `method` is `maskclip` (MaskCLIP), `sclip` (SCLIP) or `naclip` (NACLIP): on a ViT each
    rewrites the last transformer block only (`DENSE_CLIP`), then every token goes through the
    final LayerNorm and the image projection into the text space, and teacher-sized windows
    slide with half-window stride (their published 224/112 for a 224-px teacher), overlapping
    scores averaged. On a ResNet only `maskclip` is defined (`resnet_value_features`), over the
    whole image in one pass. Scores are resized bilinearly to the image.

    Args:
        teacher: an open_clip model whose image tower is a VisionTransformer with a class token,
            or (maskclip) a ModifiedResNet.
        text, logit_scale, rule, topk_classes, center: as for the grid baseline.
        short_side: the image's short side for these methods (`eval.dense_short_side`, else
            `eval.short_side`); a ViT's windows need at least its input size.
    """

    def __init__(self, teacher: Teacher, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int = 448, topk_classes: int = 0, center: torch.Tensor | None = None,
                 method: str = "maskclip"):
        self.resnet = check_dense_teacher(teacher.model.visual, teacher.identity.model, method, "eval.baselines")
        self.teacher, self.text, self.scale, self.rule = teacher, text.to(teacher.device), logit_scale, rule
        self.short_side, self.topk, self.center = short_side, topk_classes, center
        self.method = method

    def dense_features(self, views: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] normalized (H = W = T for a ViT) -> [n, gh, gw, D] embeddings in the text space."""
        return dense_features(self.teacher.model.visual, views.to(self.teacher.view_dtype), self.method)

    def compute_scores(self, image: np.ndarray) -> torch.Tensor:
        return self.scores_whole(image) if self.resnet else self.scores_windows(image)

    def scores_windows(self, image: np.ndarray) -> torch.Tensor:
        """The ViT's: teacher-sized windows with half-window stride, overlapping scores averaged."""
        size = self.teacher.spec.size
        x = resize_short_side(image, max(self.short_side, size)).round_().to(self.teacher.device)  # [3, h, w]
        h, w = x.shape[-2:]
        origins = [(t, l) for t in window_origins(h, size, size // 2) for l in window_origins(w, size, size // 2)]
        crops = torch.stack([x[:, t : t + size, l : l + size] for t, l in origins])  # [n, 3, T, T]
        feats = self.dense_features(_normalize(self.teacher, crops))  # [n, gh, gw, D]
        n, gh, gw, _ = feats.shape
        scores = class_scores(feats.reshape(n * gh * gw, -1), self.text, self.scale, self.rule.mode, self.center)  # [n*gh*gw, K]
        scores = scores.view(n, gh, gw, -1).permute(0, 3, 1, 2)  # [n, K, gh, gw]
        scores = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)  # [n, K, T, T]
        merged = WindowAverage(scores.shape[1], h, w, scores.device)
        for s, (t, l) in zip(scores, origins):
            merged.add(t, l, s)
        return _restrict(merged.result().permute(1, 2, 0), self.teacher, x, self.text, self.scale, self.rule, self.topk, self.center)  # [h, w, K]

    def scores_whole(self, image: np.ndarray) -> torch.Tensor:
        """The ResNet's MaskCLIP: the whole image in one pass, scores resized bilinearly."""
        x = resize_short_side(image, self.short_side).round_().to(self.teacher.device)  # [3, h, w]
        h, w = x.shape[-2:]
        feats = self.dense_features(_normalize(self.teacher, x[None]))[0]  # [gh, gw, D]
        gh, gw, _ = feats.shape
        scores = class_scores(feats.reshape(gh * gw, -1), self.text, self.scale, self.rule.mode, self.center)  # [gh*gw, K]
        scores = F.interpolate(scores.T.reshape(1, -1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)[0]  # [K, h, w]
        return _restrict(scores.permute(1, 2, 0), self.teacher, x, self.text, self.scale, self.rule, self.topk, self.center)  # [h, w, K]


class TeacherNamedSegmenter:
    """The student groups, a score map names: the teacher's in `grouped_maskclip` (and
    `grouped_sclip`, `grouped_naclip`, `grouped_training_free`), or the student's own tokens at
    another scale (`StudentTokenScores`, eval.student_naming: tokens with eval.token_short_side).

    The student's segments (its segmentation under the evaluation's protocol, `Prediction.segments`)
    are kept; each takes the class whose teacher scores (`MaskCLIPSegmenter.scores` or
    `GridTeacherSegmenter.scores`, resized bilinearly to the image), averaged over the segment's
    pixels, are best, under the same background rule (a threshold applies to that average). Not
    the student alone: the teacher runs at inference, one pass per image. It measures what the
    student's grouping is worth to the teacher's naming: better than the method alone where the
    segments follow the objects more closely than the method's own map does.
    """

    def __init__(self, student: StudentSegmenter, teacher: ScoreMapSegmenter):
        self.student, self.teacher, self.rule = student, teacher, teacher.rule

    @torch.inference_mode()
    def predict(self, image: np.ndarray, segments: np.ndarray | None = None) -> Prediction:
        """image: [H, W, 3] uint8; segments: [H, W] the student's segment ids when already computed."""
        per_window = None
        if segments is None:
            grouped = self.student.predict(image)
            segments, per_window = grouped.segments, grouped.segments_per_window
        height, width = image.shape[:2]
        scores = self.teacher.scores(image).permute(2, 0, 1)[None]  # [1, K, h, w]
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)[0].flatten(1)  # [K, H*W]
        segments = torch.as_tensor(segments, device=scores.device)  # [H, W]
        ids, inverse = torch.unique(segments.flatten(), return_inverse=True)  # [S], [H*W]
        summed = torch.zeros(len(ids), scores.shape[0], device=scores.device).index_add_(0, inverse, scores.T)  # [S, K]
        mean = summed / torch.bincount(inverse, minlength=len(ids))[:, None]
        best, label = self.rule.decide(mean)  # [S]
        pred = finish(label[inverse].view(height, width), best[inverse].view(height, width), self.rule, (height, width), segments)
        pred.segments_per_window = per_window
        return pred


def teacher_segmenter(method: str, teacher: Teacher, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, e, center: torch.Tensor | None) -> ScoreMapSegmenter:
    """The teacher-alone method `method` (`training_free` or one of `DENSE_CLIP`) as the `eval`
    section `e` sets it up: the grid at `short_side`, dense CLIP at `dense_short_side`."""
    if method == "training_free":
        return GridTeacherSegmenter(teacher, text, logit_scale, rule, short_side=e.short_side, topk_classes=e.topk_classes, center=center)
    return MaskCLIPSegmenter(teacher, text, logit_scale, rule, short_side=e.dense_short_side or e.short_side, topk_classes=e.topk_classes, center=center, method=method)
