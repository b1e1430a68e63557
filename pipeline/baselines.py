"""Training-free baselines: the teacher alone, no student, through the same protocol.

- `training_free` (any teacher): classify every cell of 2x2, 3x3 and 4x4 grids over the
  resized image (the cache's own kind of views) and average the cells' class scores per pixel.
- `maskclip` (open_clip ViT teachers): dense CLIP as MaskCLIP does it; the last block's value
  embeddings of the patch tokens, through its output projection, the final LayerNorm and the
  image projection, give one embedding per patch; teacher-sized windows slide over the image
  with half-window stride and overlapping scores are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from pipeline.errors import InputError
from pipeline.inference import BackgroundRule, Prediction, class_scores, finish, keep_topk, resize_short_side, window_origins
from pipeline.teacher import Teacher
from pipeline.views import cell_edges


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


class GridTeacherSegmenter:
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

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> Prediction:
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
        acc = _restrict(acc.permute(1, 2, 0), self.teacher, x, self.text, self.scale, self.rule, self.topk, self.center)  # [h, w, K]
        score, label = self.rule.decide(acc)  # [h, w]
        return finish(label, score, self.rule, image.shape[:2])


class MaskCLIPSegmenter:
    """Dense CLIP from an open_clip ViT teacher (MaskCLIP): one class decision per patch.

    Args:
        teacher: an open_clip model whose image tower is a VisionTransformer with a class token.
        text, logit_scale, rule, short_side, topk_classes, center: as for the grid baseline.
    """

    def __init__(self, teacher: Teacher, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int = 448, topk_classes: int = 0, center: torch.Tensor | None = None):
        visual = teacher.model.visual
        if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise InputError(f"eval.baselines: maskclip needs an open_clip ViT teacher with a class token, not {teacher.identity.model}")
        if not isinstance(visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention):
            raise InputError(f"eval.baselines: maskclip does not know the attention of {teacher.identity.model}")
        self.teacher, self.text, self.scale, self.rule = teacher, text.to(teacher.device), logit_scale, rule
        self.short_side, self.topk, self.center = short_side, topk_classes, center

    def dense_features(self, views: torch.Tensor) -> torch.Tensor:
        """[n, 3, T, T] normalized -> [n, gh, gw, D] per-patch embeddings in the text space."""
        visual = self.teacher.model.visual
        x = visual._embeds(views.to(self.teacher.view_dtype))  # [n, 1 + N, C]
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        y = last.ln_1(x)
        c = y.shape[-1]
        v = F.linear(y, last.attn.in_proj_weight[2 * c :], last.attn.in_proj_bias[2 * c :])  # [n, 1 + N, C] values only
        v = visual.ln_post(last.attn.out_proj(v)[:, 1:])  # [n, N, C], class token dropped
        feats = (v @ visual.proj).float()  # [n, N, D]
        side = int(round(feats.shape[1] ** 0.5))
        return feats.view(feats.shape[0], side, side, -1)  # [n, gh, gw, D]

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> Prediction:
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
        acc = torch.zeros(scores.shape[1], h, w, device=scores.device)  # [K, h, w]
        count = torch.zeros(1, h, w, device=scores.device)
        for s, (t, l) in zip(scores, origins):
            acc[:, t : t + size, l : l + size] += s
            count[:, t : t + size, l : l + size] += 1
        scores = _restrict((acc / count).permute(1, 2, 0), self.teacher, x, self.text, self.scale, self.rule, self.topk, self.center)  # [h, w, K]
        score, label = self.rule.decide(scores)  # [h, w]
        return finish(label, score, self.rule, image.shape[:2])
