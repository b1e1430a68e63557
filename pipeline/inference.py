"""Zero-shot segmentation of an image with any vocabulary: the student, and the teacher alone.

Both segmenters share the protocol: resize to a short side, classify regions by cosine
similarity to the class embeddings (times the teacher's logit scale, softmax over the
vocabulary), mark background where the best score is under the threshold, and return labels at
the input's resolution (0 = background, k = vocabulary entry k-1).

The student slides a square window over the resized image (GroupViT: 448 window, 224 stride),
runs the windows in batches with position embeddings recomputed for the window's grid, gives
each pixel the segment with the largest (bilinearly upsampled) soft assignment, and each
segment its class. Where windows overlap, the more confident window wins. The training-free
baselines that use the teacher alone are in pipeline/baselines.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.student import ZeroSegStudent
from pipeline.student_data import normalize_images


@dataclass(frozen=True)
class BackgroundRule:
    """Which pixels are background.

    `probability` thresholds the best softmax probability over the vocabulary (cosine x logit
    scale; GroupViT's rule); `cosine` thresholds the best raw cosine similarity. `class` puts
    `background_rows` background words first in the vocabulary (see `vocabulary`): a pixel is
    background where one of them scores best (SCLIP and NACLIP evaluate VOC and Context so);
    `vocabulary` sets its threshold to -inf, so no pixel is thresholded away.
    """

    mode: str = "probability"
    threshold: float = 0.5
    background_rows: int = 0

    def __post_init__(self):
        if self.mode not in ("probability", "cosine", "class"):
            raise ValueError(f"unknown background rule {self.mode!r} (probability, cosine, class)")
        if (self.mode == "class") != (self.background_rows > 0):
            raise ValueError("background_rows > 0 goes with mode 'class', and only with it")

    def decide(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., K'] scores over the vocabulary -> best score [...] and label [...] (0 = background).

        The threshold is applied later, by `finish`, on the best score.
        """
        best, idx = scores.max(dim=-1)
        return best, (idx + 1 - self.background_rows).clamp_min(0)


def name_key(name: str) -> str:
    """A class name as CLIP's tokenizer sees it: lowercased, whitespace runs as one space."""
    return " ".join(name.lower().split())


def vocabulary(embed, classes: list[str], templates, *, mode: str, threshold: float, bg_words=("background",)) -> tuple[torch.Tensor, BackgroundRule]:
    """Class embeddings and the background rule that reads them.

    Args:
        embed: `ClassEmbedder`-like: (names, templates) -> [n, D] unit embeddings.
        classes: the K class names (background excluded).
        mode, threshold: the rule; under `class` the background words' rows come first and
            `threshold` is not used (-inf).

    Returns:
        text [K', D] (K' = K, or K + len(bg_words) under `class`) and the rule.
    """
    if mode != "class":
        return embed(list(classes), templates), BackgroundRule(mode, threshold)
    if not bg_words:
        raise ConfigError("eval.bg_words: bg_rule 'class' needs at least one background word")
    words = {name_key(w) for w in bg_words}
    clash = [c for c in classes if name_key(c) in words]
    if clash:  # it would tie with the background word, which is listed first and wins the tie
        raise ConfigError(f"class {clash[0]!r} is also a background word (eval.bg_words) under bg_rule class: it could never be shown; "
                          "drop it from the classes or from eval.bg_words")
    return embed([*bg_words, *classes], templates), BackgroundRule(mode, -math.inf, background_rows=len(bg_words))


@dataclass
class Prediction:
    """labels: [H, W] int64, 0 = background, k = class k-1 of the vocabulary; score: [H, W] float32.

    segments: [H, W] int64 region ids (window x S + segment for the student), for grouping
    oracles; None where the method has no regions of its own.
    segments_per_window: the student's segments that own at least 1% of a window's pixels,
    averaged over its windows (1.0 means the grouping collapsed); None for other methods.
    """

    labels: np.ndarray
    score: np.ndarray
    segments: np.ndarray | None = None
    segments_per_window: float | None = None


def class_scores(emb: torch.Tensor, text: torch.Tensor, logit_scale: float, mode: str, center: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] region embeddings x [K, D] unit class embeddings -> [N, K] scores under `mode`.

    Args:
        center: [D] the teacher's dataset mean of unit image embeddings (`eval.calibration:
            center`): subtracted from the unit region embeddings before the cosine, so the
            component every image shares stops favouring the class words nearest it.
    """
    emb = F.normalize(emb.float(), dim=-1)  # [N, D]
    if center is not None:
        emb = F.normalize(emb - center.to(emb.device), dim=-1)
    cos = emb @ text.T  # [N, K]
    return cos if mode == "cosine" else (cos * logit_scale).softmax(dim=-1)  # probability and class


def keep_topk(scores: torch.Tensor, image_scores: torch.Tensor, k: int, background_rows: int = 0) -> torch.Tensor:
    """`scores` [..., K'] with every class outside the image's k best set to -inf.

    Args:
        image_scores: [K'] the image's scores from its global embedding; they pick the k classes.
        k: classes kept (0, or k >= the vocabulary: all).
        background_rows: background words (the `class` rule's first rows): always kept.
    """
    n = scores.shape[-1] - background_rows
    if not k or k >= n:
        return scores
    allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    allowed[:background_rows] = True
    allowed[image_scores[background_rows:].topk(k).indices + background_rows] = True
    return scores.masked_fill(~allowed, -math.inf)


def resize_short_side(image: np.ndarray, short: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in 0..255 with min(h, w) == short (antialiased bicubic)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    h, w = x.shape[-2:]
    scale = short / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 255)[0]


def window_origins(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); the last one is flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def finish(labels: torch.Tensor, score: torch.Tensor, rule: BackgroundRule, out_hw: tuple[int, int], segments: torch.Tensor | None = None) -> Prediction:
    """Apply the background rule and bring [h, w] maps to the input's resolution (nearest)."""
    labels = torch.where(score < rule.threshold, torch.zeros_like(labels), labels)

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None, None].double(), size=out_hw, mode="nearest")[0, 0]

    segments = resize(segments).long().cpu().numpy() if segments is not None else None
    return Prediction(resize(labels).long().cpu().numpy(), resize(score).float().cpu().numpy(), segments)


class StudentSegmenter:
    """The ZeroSeg student's zero-shot segmentation.

    Args:
        student: a trained student in eval mode.
        text: [K', D] unit class embeddings (background words first under the `class` rule).
        logit_scale: the teacher's.
        rule: background rule.
        short_side, window, stride: resolution protocol, in pixels of the resized image.
        topk_classes: keep only the image's k best classes by its global embedding, the mean
            of its windows' (0: all).
        windows_per_forward: windows run through the model at once (memory: a tall or wide
            image has many).
        center: [D] eval.calibration's mean (`class_scores`); None: no calibration.
    """

    def __init__(self, student: ZeroSegStudent, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int = 448, window: int = 448, stride: int = 224, topk_classes: int = 0, device: torch.device | str = "cpu", windows_per_forward: int = 32, center: torch.Tensor | None = None):
        p = student.arch.patch_size
        for key, value in (("eval.short_side", short_side), ("eval.window", window)):
            if value < p:
                raise ConfigError(f"{key}: {value} px is smaller than the student's patch size ({p} px)")
        self.student = student.eval().to(device)
        self.text, self.scale, self.rule = text.to(device), logit_scale, rule
        self.short_side, self.window, self.stride = short_side, window - window % p, stride
        self.topk, self.device = topk_classes, torch.device(device)
        self.windows_per_forward = max(1, windows_per_forward)
        self.center = center

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> Prediction:
        """image: [H, W, 3] uint8 RGB."""
        x = resize_short_side(image, self.short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        win = min(self.window, h - h % self.student.arch.patch_size, w - w % self.student.arch.patch_size)
        stride = min(self.stride, win)  # the window shrinks to a small image's side: no strip left between windows
        origins = [(t, l) for t in window_origins(h, win, stride) for l in window_origins(w, win, stride)]
        crops = torch.stack([x[:, t : t + win, l : l + win] for t, l in origins])  # [n, 3, win, win]
        outs = []
        for a in range(0, len(crops), self.windows_per_forward):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = self.student.infer(normalize_images(crops[a : a + self.windows_per_forward]))
            outs.append((out.masks.float(), out.segments.float(), out.z.float()))
        masks, segments_emb, z = (torch.cat(parts) for parts in zip(*outs))  # [n, S, gh, gw], [n, S, D], [n, D]
        probs = class_scores(segments_emb.flatten(0, 1), self.text, self.scale, self.rule.mode, self.center).view(len(origins), -1, self.text.shape[0])  # [n, S, K]
        if self.topk:
            image_emb = F.normalize(z, dim=-1).mean(dim=0, keepdim=True)  # [1, D] the image's, from all its windows
            probs = keep_topk(probs, class_scores(image_emb, self.text, self.scale, self.rule.mode, self.center)[0], self.topk, self.rule.background_rows)
        best, cls = self.rule.decide(probs)  # [n, S] score and label of each segment
        masks = F.interpolate(masks, size=(win, win), mode="bilinear", align_corners=False)  # [n, S, win, win]
        seg = masks.argmax(dim=1)  # [n, win, win] segment of each pixel
        n, S = masks.shape[:2]
        counts = torch.bincount((seg + S * torch.arange(n, device=seg.device).view(n, 1, 1)).flatten(), minlength=n * S).view(n, S)  # pixels per segment
        per_window = float((counts >= 0.01 * win * win).sum(dim=1).float().mean())
        labels = torch.zeros(h, w, dtype=torch.long, device=self.device)
        segments = torch.zeros(h, w, dtype=torch.long, device=self.device)
        score = torch.full((h, w), -math.inf, device=self.device)
        for i, (t, l) in enumerate(origins):
            s_win, c_win = best[i][seg[i]], cls[i][seg[i]]  # [win, win]
            region = score[t : t + win, l : l + win]
            better = s_win > region
            region[better] = s_win[better]
            labels[t : t + win, l : l + win][better] = c_win[better]
            segments[t : t + win, l : l + win][better] = (i * best.shape[1] + seg[i])[better]
        pred = finish(labels, score, self.rule, image.shape[:2], segments)
        pred.segments_per_window = per_window
        return pred
