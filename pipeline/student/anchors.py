"""Fixed anchors for the token term `loss.token_anchors`: the teacher's text embeddings of a vocabulary.

The term (`tokens.TokenAnchorLoss`) compares unit embeddings, as zero-shot naming does, with the
teacher's text embeddings of a vocabulary: a visible token's softmax over its cosines to the words
must match its target's. The loss then acts on what inference reads, the order of the words, and
not on the shared component that a regression onto the views is nearly met by. The vocabulary is
a fixed list chosen before training (`imagenet`, or a file or list of words); no image is labelled.

`view_anchors` are a second, wordless set (`loss.view_anchors`): k-means directions of the cache's
own views. The words constrain a token only along the directions they span, so a word outside them
is ranked by whatever the rest of the token happens to be; ranking these directions as the target
does pins the rest of it where the teacher's views lie.
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


def anchor_prior(views: torch.Tensor, anchors: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """`loss.anchor_prior: balance`: [K] each word's bias, to be taken out of the targets' cosines.

    A teacher favours some words everywhere (the demo's calls 2.6x too many patches "circle"), and a
    student that is unsure of a view's class falls back on the favoured word. Among the views that
    some non-background word wins, each such word's mean cosine, centred over those words, is its
    bias: a label-free class balancing of the pseudo-labels (as class-balanced self-training
    balances them, here by the teacher's own statistics). The background words keep a zero bias,
    so whether a view shows an object is decided as before.

    Args:
        views: [n, D] a sample of the teacher's views (as cached; the grids the terms read).
        anchors: [K, D] unit text embeddings.
        background: [K] bool, the words that name background (`eval.bg_words` in the vocabulary).

    Returns:
        [K] float32; zeros where no view is won by a non-background word.
    """
    cosines = F.normalize(views.float(), dim=-1) @ anchors.float().T  # [n, K]
    objects = ~background[cosines.argmax(dim=1)]  # [n] views some non-background word wins
    prior = torch.zeros(anchors.shape[0])
    if objects.any() and not background.all():
        mean = cosines[objects][:, ~background].mean(dim=0)  # [K_objects]
        prior[~background] = mean - mean.mean()
    return prior


def view_anchors(views: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """`loss.view_anchors`: [k, D] unit centroids of a sample of the teacher's views [n, D] (cosine
    k-means, k-means++ seeding; a centroid left with no member is re-seeded at the worst-fit view).

    Written here rather than taken from a library: it runs once at the start of a training, on the
    CPU over a few hundred thousand rows (seconds on two cores), seeded by `train.seed`, with torch alone.

    Raises:
        InputError: fewer views than k.
    """
    x = F.normalize(views.float(), dim=-1)
    if len(x) < k:
        raise InputError(f"loss.view_anchor_count {k}: the cache sample has {len(x)} views, fewer than that")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]  # [1, D]
    while len(centroids) < k:  # k-means++: the next seed far (in cosine) from those chosen
        far = (1 - (x @ centroids.T).max(dim=1).values).clamp_min(0)  # [n]
        centroids = torch.cat([centroids, x[torch.multinomial(far + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        fit, member = (x @ centroids.T).max(dim=1)  # [n] each view's cosine to its centroid, and which
        sums = torch.zeros_like(centroids).index_add_(0, member, x)  # [k, D]
        counts = torch.bincount(member, minlength=k)  # [k]
        for j in torch.nonzero(counts == 0).flatten().tolist():
            worst = fit.argmin()
            sums[j], fit[worst] = x[worst], float("inf")
        centroids = F.normalize(sums, dim=-1)
    return centroids
