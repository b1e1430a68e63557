"""Fixed anchors for the KL terms: the teacher's text embeddings of a vocabulary (`loss.segment_anchors`,
`loss.token_anchors`).

The prototype terms (`prototypes.py`) compare residuals around the teacher's mean with k-means
directions of the cache. These compare unit embeddings, as zero-shot naming does, with the
teacher's text embeddings of a vocabulary: a segment's (or a visible token's) softmax over its
cosines to the words must match its region target's (its cells' views'). The loss then acts on
what inference reads, the order of the words, and not on the shared component that a regression
onto the views is nearly met by. The vocabulary is a fixed list chosen before training (ImageNet's
1,000 class names by default), not the benchmark's classes, and no image is labelled.

The KL itself is the prototype terms' (`SegmentPrototypeLoss`, `TokenPrototypeLoss`) with a zero
mean: a residual around zero is the unit embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from pipeline.clip.text import SINGLE_TEMPLATE, ClassEmbedder, parse_vocabulary
from pipeline.core.errors import InputError

if TYPE_CHECKING:
    from pipeline.clip.model import Teacher


def anchor_names(spec: str) -> list[str]:
    """`loss.anchor_vocabulary` -> the words: `imagenet`, `@FILE` (one per line) or a comma-separated list.

    Raises:
        InputError: a missing or empty file, no names, or repeated names (one line naming the option).
    """
    if spec.strip() == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    names = parse_vocabulary(spec, f"loss.anchor_vocabulary {spec!r}")
    if len(names) < 2:
        raise InputError(f"loss.anchor_vocabulary {spec!r}: give at least two names (one anchor ranks nothing)")
    return names


def text_anchors(teacher: Teacher, names: list[str]) -> torch.Tensor:
    """[K, D] unit text embeddings of `names` (`anchor_names`), prompt "a photo of a {}." (cached on disk by `ClassEmbedder`)."""
    return ClassEmbedder(teacher)(names, SINGLE_TEMPLATE)


def anchor_logits(embeddings: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """[..., D] embeddings x [K, D] unit anchors -> [..., K] cosines / tau."""
    return F.normalize(embeddings.float(), dim=-1) @ anchors.T / tau
