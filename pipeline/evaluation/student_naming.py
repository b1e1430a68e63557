"""The student's own naming at another scale: its patch tokens over the whole image name its window segments.

`eval.student_naming: tokens` with `eval.token_short_side` N: the segments come from the student's
windows (`StudentSegmenter`), their names from `StudentTokenScores`, through the same pooling the
grouped baselines use (`TeacherNamedSegmenter`). No teacher runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.evaluation.baselines import ScoreMapSegmenter, TeacherNamedSegmenter
from pipeline.evaluation.inference import (
    BackgroundRule,
    StudentSegmenter,
    class_scores,
    keep_topk,
    resize_short_side,
)
from pipeline.student.normalize import normalize_images


class StudentTokenScores(ScoreMapSegmenter):
    """The student's own dense naming: every patch token of the whole image, resized to
    `short_side`, classified by its cosine to the class words (`ZeroSegStudent.token_embeddings`).

    With `eval.student_naming: tokens` and `eval.token_short_side` N, the student's window segments
    are named by these scores (`TeacherNamedSegmenter`): each segment takes the class whose scores,
    averaged over its pixels, are best. The demo student is trained on whole scenes at 64 px and
    evaluated on 64-px windows of them at twice that scale; its tokens name the shapes at the
    scale it was trained at, its grouping follows them best at the evaluation's (docs/demo.md).
    """

    def __init__(self, student, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int, ratios: Sequence[float] = (1.0,),
                 topk_classes: int = 0, center: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        p = student.arch.patch_size
        self.short_sides = [round(short_side * r) for r in ratios]  # eval.token_ratios
        if min(self.short_sides) < p:
            raise ConfigError(f"eval.token_short_side: {min(self.short_sides)} px (x eval.token_ratios) is smaller than the student's patch size ({p} px)")
        self.student, self.text, self.scale, self.rule = student.eval().to(device), text.to(device), logit_scale, rule
        self.topk, self.center, self.device = topk_classes, center, torch.device(device)

    def compute_scores(self, image: np.ndarray) -> torch.Tensor:
        """[gh, gw, K] at one scale (the token grid); with several, [H, W, K]: each scale's scores
        resized bilinearly to the image and averaged."""
        if len(self.short_sides) == 1:
            return self.scores_at(image, self.short_sides[0])
        size = image.shape[:2]
        total = sum(F.interpolate(self.scores_at(image, side).permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[0] for side in self.short_sides)
        return (total / len(self.short_sides)).permute(1, 2, 0)  # [H, W, K]

    def scores_at(self, image: np.ndarray, short_side: int) -> torch.Tensor:
        """[gh, gw, K]: the class scores of the student's tokens of the whole image at `short_side`."""
        p = self.student.arch.patch_size
        x = resize_short_side(image, short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        x = x[:, : h - h % p, : w - w % p].round().to(torch.uint8)[None]  # what the patch embedding covers
        out = self.student.token_embeddings(normalize_images(x), pos_mode="interpolate", with_image=bool(self.topk))  # [1, gh, gw, D] (and z [1, D] for top-k)
        tokens, image_emb = out if self.topk else (out, None)
        tokens = tokens[0].float()
        scores = class_scores(tokens.flatten(0, 1), self.text, self.scale, self.rule.mode, self.center)  # [gh*gw, K']
        if self.topk:
            scores = keep_topk(scores, class_scores(image_emb.float(), self.text, self.scale, self.rule.mode, self.center)[0], self.topk, self.rule.background_rows)
        return scores.view(*tokens.shape[:2], -1)


def student_segmenter(student, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, e, device, center: torch.Tensor | None) -> StudentSegmenter | TeacherNamedSegmenter:
    """The student as the `eval` section `e` sets it up: its windows at `student_short_side` (0:
    `short_side`), its segments named by `student_naming`; with `token_short_side` N, by its own
    tokens over the whole image at N px (`StudentTokenScores`)."""
    if e.token_short_side and e.student_naming != "tokens":
        raise ConfigError(f"eval.token_short_side: {e.token_short_side} names the segments by the student's tokens; it needs eval.student_naming: tokens")
    windows = StudentSegmenter(student, text, logit_scale, rule, short_side=e.student_short_side or e.short_side, window=e.window, stride=e.stride, topk_classes=e.topk_classes,
                               device=device, center=center, protocol=e.protocol, naming=e.student_naming)
    if not e.token_short_side:
        return windows
    tokens = StudentTokenScores(student, text, logit_scale, rule, short_side=e.token_short_side, ratios=e.token_ratios, topk_classes=e.topk_classes, center=center, device=device)
    return TeacherNamedSegmenter(windows, tokens)
