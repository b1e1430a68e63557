"""The student as the evaluation runs it: its windows group, and its own tokens (or segments) name.

`eval.student_naming: tokens` with `eval.token_short_side` N: the segments come from the student's
windows (`StudentSegmenter`), their names from `StudentTokenScores`, the student's patch tokens over
the whole image at N px (times each of `eval.token_ratios`), through the same pooling the grouped
baselines use (`NamedSegments`). No teacher runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.evaluation.baselines import NamedSegments, ScoreMapSegmenter
from pipeline.evaluation.protocol import StudentSegmenter
from pipeline.evaluation.vocabulary import Namer
from pipeline.evaluation.windows import average_at, resize_short_side, scaled_sides
from pipeline.student.normalize import normalize_images


class StudentTokenScores(ScoreMapSegmenter):
    """The student's own dense naming: every patch token of the whole image, resized to each of
    `short_side` x `ratios`, classified by its cosine to the class words
    (`ZeroSegStudent.token_embeddings`); the scales' scores, each resized bilinearly to the image,
    are averaged.

    The demo student is trained on whole scenes at 64 px and evaluated on 64-px windows of them at
    twice that scale; its tokens name the shapes at the scale it was trained at, its grouping
    follows them best at the evaluation's (docs/demo.md).
    """

    def __init__(self, student, *, short_side: int, ratios: Sequence[float] = (1.0,), device: torch.device | str = "cpu"):
        self.student, self.device = student.eval().to(device), torch.device(device)
        self.sides = scaled_sides(short_side, ratios, student.arch.patch_size, "eval.token_short_side")

    def embed(self, image: np.ndarray) -> dict:
        """Per scale the unit tokens [gh, gw, D], and the image's global embedding z [D] (from the first scale)."""
        p = self.student.arch.patch_size
        tokens, z = [], None
        for side in self.sides:
            x = resize_short_side(image, side).to(self.device)  # [3, h, w]
            h, w = x.shape[-2:]
            x = x[:, : h - h % p, : w - w % p].round().to(torch.uint8)[None]  # what the patch embedding covers
            t, image_z = self.student.token_embeddings(normalize_images(x), pos_mode="interpolate", with_image=True)  # [1, gh, gw, D], [1, D]
            tokens.append(t[0].float())
            z = image_z[0].float() if z is None else z
        return {"tokens": tokens, "z": z}

    def score_map(self, embedded: dict, namer: Namer, image: np.ndarray) -> torch.Tensor:
        maps = []
        for tokens in embedded["tokens"]:
            scores = namer.scores(tokens.flatten(0, 1)).view(*tokens.shape[:2], -1)  # [gh, gw, K']
            maps.append(namer.keep_topk(scores, embedded["z"]) if namer.topk else scores)
        return average_at(maps, image.shape[:2])


def student_segmenter(student, e, device, *, token_ratios: Sequence[float] | None = None) -> StudentSegmenter | NamedSegments:
    """The student as the `eval` section `e` sets it up: its windows at `student_short_side` (0:
    `short_side`), its segments named by `student_naming`; with `token_short_side` N, by its own
    tokens over the whole image at N px x `token_ratios` (`StudentTokenScores`; `token_ratios`
    given here overrides the section's)."""
    if e.token_short_side and e.student_naming != "tokens":
        raise ConfigError(f"eval.token_short_side: {e.token_short_side} names the segments by the student's tokens; it needs eval.student_naming: tokens")
    windows = StudentSegmenter(student, short_side=e.student_short_side or e.short_side, window=e.window, stride=e.stride, device=device, naming=e.student_naming)
    if not e.token_short_side:
        return windows
    tokens = StudentTokenScores(student, short_side=e.token_short_side, ratios=e.token_ratios if token_ratios is None else token_ratios, device=device)
    return NamedSegments(windows, tokens)
