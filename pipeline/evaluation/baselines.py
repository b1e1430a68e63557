"""Training-free baselines: the teacher alone, no student, through the same protocol.

- `training_free` (any teacher): classify every cell of grids over the resized image (the
  cache's own kind of views; `eval.grid_grids`) and average the cells' class scores per pixel.
- `maskclip`, `sclip`, `naclip`: dense CLIP (`pipeline/clip/dense.py`), one embedding per patch
  (ViT: teacher-sized windows at half-window stride, overlapping scores averaged) or location
  (ResNet, `maskclip` only: the whole image in one pass), at `eval.dense_short_side` times each of
  `eval.dense_ratios` (multi-scale: every scale's scores resized to the image and averaged).
- `grouped_maskclip`, `grouped_sclip`, `grouped_naclip`, `grouped_training_free`: not the teacher
  alone but the student's segments named by that method's scores (`NamedSegments`).

Every method computes its embeddings once per image (`embed`) and names them under each
vocabulary and background rule it is asked for (`scores`), so both rules of an evaluation come
from one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.dense import check_dense_teacher, dense_features
from pipeline.clip.model import Teacher
from pipeline.core.views import cell_edges
from pipeline.evaluation.protocol import StudentSegmenter
from pipeline.evaluation.vocabulary import Namer, Prediction
from pipeline.evaluation.windows import WindowAverage, average_at, resize_short_side, scaled_sides, window_origins


def _normalize(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """[n, 3, T, T] in 0..255 -> the teacher's normalized input."""
    mean = torch.tensor(teacher.spec.mean, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(teacher.spec.std, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels - mean) / std


def _to_view(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """[3, h, w] in 0..255 -> [3, T, T] at the teacher's input size (8-bit levels, as the cache's views)."""
    size = teacher.spec.size
    return F.interpolate(pixels[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp_(0, 255).round_()


class ScoreMapSegmenter:
    """A method that scores every pixel. `embed` runs its model once per image; `scores` names
    those embeddings under a `Namer` (kept per namer: a method's own column and its grouped one
    share them)."""

    _image: np.ndarray | None = None
    _embedded: Any = None
    _named: dict

    def embed(self, image: np.ndarray) -> Any:
        raise NotImplementedError

    def score_map(self, embedded: Any, namer: Namer, image: np.ndarray) -> torch.Tensor:
        """[h, w, K'] class scores of the embedded image (at any resolution over the image)."""
        raise NotImplementedError

    @torch.inference_mode()
    def scores(self, image: np.ndarray, namer: Namer) -> torch.Tensor:
        """[h, w, K'] class scores over the image under `namer` (top-k restricted)."""
        if self._image is not image:
            self._image, self._embedded, self._named = image, self.embed(image), {}
        if namer not in self._named:
            self._named[namer] = self.score_map(self._embedded, namer, image)
        return self._named[namer]

    @torch.inference_mode()
    def predict(self, image: np.ndarray, namer: Namer) -> Prediction:
        score, label = namer.decide(self.scores(image, namer))  # [h, w]
        return namer.finish(label, score, image.shape[:2])


class TeacherOnImage(ScoreMapSegmenter):
    """A teacher method; `image_embedding` is the teacher's whole-image (1x1) view, for top-k."""

    teacher: Teacher

    def image_embedding(self, embedded: dict, image: np.ndarray) -> torch.Tensor:
        if "image" not in embedded:
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().to(self.teacher.device)
            embedded["image"] = self.teacher.encode(_normalize(self.teacher, _to_view(self.teacher, x)[None]))[0]  # [D]
        return embedded["image"]

    def restrict(self, scores: torch.Tensor, embedded: dict, namer: Namer, image: np.ndarray) -> torch.Tensor:
        return namer.keep_topk(scores, self.image_embedding(embedded, image)) if namer.topk else scores


class GridTeacherSegmenter(TeacherOnImage):
    """The training-free baseline: the teacher classifies grid cells, pixels average their cells.

    Args:
        teacher: the loaded CLIP teacher.
        short_side: the image is resized to this short side before it is cut.
        grids: grid sizes whose cells are classified (the cache's local views by default).
    """

    def __init__(self, teacher: Teacher, *, short_side: int = 448, grids: Sequence[int] = (2, 3, 4)):
        self.teacher, self.short_side, self.grids = teacher, short_side, tuple(grids)

    def embed(self, image: np.ndarray) -> dict:
        """Every cell's teacher embedding [n, D] and box, over the image at `short_side`."""
        x = resize_short_side(image, self.short_side).round_()  # [3, h, w] 8-bit levels
        h, w = x.shape[-2:]
        cells, boxes = [], []
        for g in self.grids:
            ys, xs = cell_edges(h, g), cell_edges(w, g)
            for r in range(g):
                for c in range(g):
                    cells.append(_to_view(self.teacher, x[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]]))
                    boxes.append((ys[r], ys[r + 1], xs[c], xs[c + 1]))
        return {"cells": self.teacher.encode(_normalize(self.teacher, torch.stack(cells))), "boxes": boxes, "size": (h, w)}

    def score_map(self, embedded: dict, namer: Namer, image: np.ndarray) -> torch.Tensor:
        """Every pixel's cells' class scores, averaged over the grids."""
        probs = namer.scores(embedded["cells"])  # [n, K']
        acc = torch.zeros(probs.shape[1], *embedded["size"], device=probs.device)  # [K, h, w]
        for p, (y0, y1, x0, x1) in zip(probs, embedded["boxes"]):
            acc[:, y0:y1, x0:x1] += p[:, None, None]
        acc /= len(self.grids)  # every pixel lies in exactly one cell per grid
        return self.restrict(acc.permute(1, 2, 0), embedded, namer, image)  # [h, w, K]


class MaskCLIPSegmenter(TeacherOnImage):
    """Dense CLIP from an open_clip teacher: one class decision per patch (ViT) or location (ResNet).

    `method` is `maskclip` (MaskCLIP), `sclip` (SCLIP) or `naclip` (NACLIP): on a ViT each
    rewrites the last transformer block only (`pipeline/clip/dense.py`), and teacher-sized windows
    slide with half-window stride (their published 224/112 for a 224-px teacher), overlapping
    scores averaged. On a ResNet only `maskclip` is defined, over the whole image in one pass.
    With several `ratios` the image is seen at each round(short_side x ratio) and the scores,
    each resized bilinearly to the image, are averaged (mmseg's multi-scale inference).

    Args:
        teacher: an open_clip model whose image tower is a ViT with a class token, or (maskclip) a
            CLIP ResNet.
        short_side: the image's short side for this method (`eval.dense_short_side`); a ViT's
            windows need at least its input size.
        ratios: the multi-scale ratios of `short_side` (`eval.dense_ratios`).
    """

    def __init__(self, teacher: Teacher, *, short_side: int = 448, ratios: Sequence[float] = (1.0,), method: str = "maskclip"):
        self.resnet = check_dense_teacher(teacher.model.visual, teacher.identity.model, method, "eval.baselines")
        self.teacher, self.method = teacher, method
        self.sides = scaled_sides(short_side, ratios, 32 if self.resnet else 1, "eval.dense_short_side")

    def dense_features(self, views: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] normalized (H = W = T for a ViT) -> [n, gh, gw, D] embeddings in the text space."""
        return dense_features(self.teacher.model.visual, views.to(self.teacher.view_dtype), self.method)

    def embed(self, image: np.ndarray) -> dict:
        """Per scale: the ResNet's feature map [gh, gw, D], or the ViT's windows ([n, gh, gw, D], origins, image size)."""
        return {"scales": [self._embed_at(image, side) for side in self.sides]}

    def _embed_at(self, image: np.ndarray, side: int) -> dict:
        size = self.teacher.spec.size
        x = resize_short_side(image, side if self.resnet else max(side, size)).round_().to(self.teacher.device)  # [3, h, w]
        h, w = x.shape[-2:]
        if self.resnet:
            return {"feats": self.dense_features(_normalize(self.teacher, x[None]))[0], "size": (h, w)}  # [gh, gw, D]
        origins = [(t, l) for t in window_origins(h, size, size // 2) for l in window_origins(w, size, size // 2)]
        crops = torch.stack([x[:, t : t + size, l : l + size] for t, l in origins])  # [n, 3, T, T]
        return {"feats": self.dense_features(_normalize(self.teacher, crops)), "origins": origins, "size": (h, w)}

    def _score_at(self, scale: dict, namer: Namer) -> torch.Tensor:
        """[h, w, K'] the class scores of one scale, over the image resized to that scale."""
        feats = scale["feats"]
        h, w = scale["size"]
        if self.resnet:
            gh, gw, _ = feats.shape
            scores = namer.scores(feats.reshape(gh * gw, -1))  # [gh*gw, K']
            return F.interpolate(scores.T.reshape(1, -1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        size = self.teacher.spec.size
        n, gh, gw, _ = feats.shape
        scores = namer.scores(feats.reshape(n * gh * gw, -1)).view(n, gh, gw, -1).permute(0, 3, 1, 2)  # [n, K, gh, gw]
        scores = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)  # [n, K, T, T]
        merged = WindowAverage(scores.shape[1], h, w, scores.device)
        for s, (t, l) in zip(scores, scale["origins"]):
            merged.add(t, l, s)
        return merged.result().permute(1, 2, 0)

    def score_map(self, embedded: dict, namer: Namer, image: np.ndarray) -> torch.Tensor:
        maps = [self._score_at(scale, namer) for scale in embedded["scales"]]
        return self.restrict(average_at(maps, image.shape[:2]), embedded, namer, image)


class NamedSegments:
    """The student groups, a score map names: the teacher's in `grouped_maskclip` (and
    `grouped_sclip`, `grouped_naclip`, `grouped_training_free`), or the student's own tokens at
    another scale (`StudentTokenScores`, eval.student_naming: tokens with eval.token_short_side).

    The student's segments (its segmentation under GroupViT's protocol, `Prediction.segments`)
    are kept; each takes the class whose scores (resized bilinearly to the image), averaged over
    the segment's pixels, are best, under the same background rule (a threshold applies to that
    average). With the teacher's scores it is not the student alone: the teacher runs at
    inference. It measures what the student's grouping is worth to that naming.
    """

    def __init__(self, student: StudentSegmenter, names: ScoreMapSegmenter):
        self.student, self.names = student, names

    @torch.inference_mode()
    def predict(self, image: np.ndarray, namer: Namer, segments: np.ndarray | None = None) -> Prediction:
        """image: [H, W, 3] uint8; segments: [H, W] the student's segment ids under `namer`, when already computed."""
        per_window = None
        if segments is None:
            grouped = self.student.predict(image, namer)
            segments, per_window = grouped.segments, grouped.segments_per_window
        height, width = image.shape[:2]
        scores = self.names.scores(image, namer).permute(2, 0, 1)[None]  # [1, K, h, w]
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)[0].flatten(1)  # [K, H*W]
        segments = torch.as_tensor(segments, device=scores.device)  # [H, W]
        ids, inverse = torch.unique(segments.flatten(), return_inverse=True)  # [S], [H*W]
        summed = torch.zeros(len(ids), scores.shape[0], device=scores.device).index_add_(0, inverse, scores.T)  # [S, K]
        mean = summed / torch.bincount(inverse, minlength=len(ids))[:, None]
        best, label = namer.decide(mean)  # [S]
        pred = namer.finish(label[inverse].view(height, width), best[inverse].view(height, width), (height, width), segments)
        pred.segments_per_window = per_window
        return pred


def teacher_segmenter(method: str, teacher: Teacher, e) -> ScoreMapSegmenter:
    """The teacher-alone method `method` (`training_free` or a dense-CLIP one) as the `eval` section
    `e` sets it up: the grid's cells of `grid_grids` at `short_side`, dense CLIP at
    `dense_short_side` x `dense_ratios`."""
    if method == "training_free":
        return GridTeacherSegmenter(teacher, short_side=e.short_side, grids=e.grid_grids)
    return MaskCLIPSegmenter(teacher, short_side=e.dense_short_side or e.short_side, ratios=e.dense_ratios, method=method)

