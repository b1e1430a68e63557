"""Vocabularies and background rules: what turns region embeddings into class labels.

A `Namer` is one vocabulary under one background rule. Every method of an evaluation computes
its embeddings once per image and asks each namer for its labels, so the demo's class rule and
GroupViT's probability rule are scored from the same forward passes:

- `probability` (GroupViT's rule, the paper's benchmarks): softmax of cosine x logit scale over
  the classes; background where the best probability is under the threshold;
- `cosine`: background where the best raw cosine is under the threshold;
- `class`: background words (`eval.bg_words`) join the vocabulary, first; a pixel is background
  where one of them wins (how SCLIP and NACLIP evaluate VOC and Context), no threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.text import name_key
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

RULES = ("probability", "cosine", "class")


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


@dataclass(frozen=True, eq=False)
class Namer:
    """A vocabulary under one background rule.

    Attributes:
        rule: `probability`, `cosine` or `class`.
        text: [K', D] unit class embeddings; under `class` the background words' rows come first.
        logit_scale: the teacher's (cosine x scale before the softmax).
        threshold: the background threshold on the best score (-inf under `class`).
        background_rows: how many rows of `text` are background words (`class` only).
        topk: keep only each image's k best classes (0: all), by the image's own embedding.
    """

    rule: str
    text: torch.Tensor
    logit_scale: float
    threshold: float = 0.5
    background_rows: int = 0
    topk: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown background rule {self.rule!r} ({', '.join(RULES)})")
        if (self.rule == "class") != (self.background_rows > 0):
            raise ValueError("background_rows > 0 goes with the class rule, and only with it")

    @property
    def channels(self) -> int:
        """Label channels: background, then the K classes."""
        return 1 + self.text.shape[0] - self.background_rows

    def scores(self, emb: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """[N, D] region embeddings -> [N, K'] cosines (`cosine`) or softmax(cosine x scale)."""
        cos = F.normalize(emb.float(), dim=-1) @ self.text.to(emb.device).T  # [N, K']
        return cos if self.rule == "cosine" else (cos * (self.logit_scale if scale is None else scale)).softmax(dim=-1)

    def decide(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., K'] scores -> best score [...] and label [...] (0 = background); the threshold comes in `finish`."""
        best, idx = scores.max(dim=-1)
        return best, (idx + 1 - self.background_rows).clamp_min(0)

    def keep_topk(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`scores` [..., K'] with every class outside the image's k best set to -inf.

        Args:
            image: [D] the image's own embedding (a method's whole-image view); it picks the k
                classes. Background words are always kept.
        """
        bg = self.background_rows
        if not self.topk or self.topk >= scores.shape[-1] - bg:
            return scores
        image_scores = self.scores(image[None])[0]  # [K']
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[:bg] = True
        allowed[image_scores[bg:].topk(self.topk).indices + bg] = True
        return scores.masked_fill(~allowed, -math.inf)

    def finish(self, labels: torch.Tensor, score: torch.Tensor, out_hw: tuple[int, int], segments: torch.Tensor | None = None) -> Prediction:
        """Apply the threshold and bring [h, w] maps to the input's resolution (nearest)."""
        labels = torch.where(score < self.threshold, torch.zeros_like(labels), labels)
        return finish(labels, score, out_hw, segments)


def finish(labels: torch.Tensor, score: torch.Tensor, out_hw: tuple[int, int], segments: torch.Tensor | None = None) -> Prediction:
    """[h, w] labels, scores (and segment ids) -> a `Prediction` at `out_hw` (nearest)."""

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None, None].double(), size=out_hw, mode="nearest")[0, 0]

    segments = resize(segments).long().cpu().numpy() if segments is not None else None
    return Prediction(resize(labels).long().cpu().numpy(), resize(score).float().cpu().numpy(), segments)


def namers(embed, classes: Sequence[str], templates: Sequence[str], *, rules: Sequence[str], thresholds: Mapping[str, float], logit_scale: float,
           bg_words: Sequence[str] = ("background",), topk: int = 0) -> dict[str, Namer]:
    """The vocabulary `classes` under each of `rules`, from one call to the text tower.

    Args:
        embed: `ClassEmbedder`-like: (names, templates) -> [n, D] unit embeddings.
        classes: the K class names (background excluded).
        rules: background rules, e.g. ("class", "probability").
        thresholds: rule -> threshold (the `class` rule takes none).
        bg_words: the background words of the `class` rule.

    Raises:
        ConfigError: `class` without background words, or a class that is also a background word.
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ConfigError(f"unknown background rule {unknown[0]!r} ({', '.join(RULES)})")
    words = list(bg_words) if "class" in rules else []
    if "class" in rules:
        if not words:
            raise ConfigError("eval.bg_words: the class rule needs at least one background word")
        keys = {name_key(w) for w in words}
        clash = [c for c in classes if name_key(c) in keys]
        if clash:  # it would tie with the background word, which is listed first and wins the tie
            raise ConfigError(f"class {clash[0]!r} is also a background word (eval.bg_words) under the class rule: it could never be shown; "
                              "drop it from the classes or from eval.bg_words")
    text = embed([*words, *classes], templates)  # [len(words) + K, D]
    out = {}
    for rule in rules:
        if rule == "class":
            out[rule] = Namer(rule, text, logit_scale, -math.inf, background_rows=len(words), topk=topk)
        else:
            out[rule] = Namer(rule, text[len(words):], logit_scale, thresholds[rule], topk=topk)
    return out


def student_calibrated(namer: Namer, e: EvalConfig, threshold: float) -> Namer:
    """`namer` as the student reads it: under a threshold rule, its own softmax scale
    (`eval.student_logit_scale`, 0: the teacher's) and `threshold`; the class rule as it is."""
    if namer.rule == "class":
        return namer
    return dataclasses.replace(namer, logit_scale=e.student_logit_scale or namer.logit_scale, threshold=threshold)


def student_threshold(e: EvalConfig, dataset: str, teachers: float | None) -> float | None:
    """The student's threshold for `dataset`: `eval.student_bg_threshold` (the dataset's, else its
    `default`), else the teachers' (`teachers`)."""
    own = e.student_bg_threshold
    return own.get(dataset, own.get("default", teachers))
