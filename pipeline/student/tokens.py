"""The token terms: every visible patch token, through the segment projection, is asked for what the
teacher sees where it lies (not in the paper; docs/training.md "Dense targets").

A token's target is one embedding: the sum of the unit views whose boxes hold its patch, each
weighted (`StudentObjective.token_views`: the dense grid's cell at 1, the crop grids' cells at
`loss.token_crop_weight` over the crop grids). Summing unit embeddings multiplies the softmaxes the
views would give any vocabulary: the dense map says where, the crops (the teacher's most reliable
outputs, whole views through its attention pool) say what, and neither needs a word to say it.

`token_anchors` asks the token to rank fixed anchors (the teacher's text embeddings of a
vocabulary, `anchors.py`) as the target ranks them. (Regressing the token onto the target
instead named every demo shape "circle": docs/findings.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_targets(targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's target embedding and whether it has one.

    Args:
        targets: [B, V, D] teacher views as cached.
        weights: [B, N, V] each view's weight in each token's target (0 where the box misses it).

    Returns:
        (target [B, N, D] unit vectors, has [B, N] bool).
    """
    mixed = torch.bmm(weights.float(), F.normalize(targets.float(), dim=-1))  # [B, N, D]
    return F.normalize(mixed, dim=-1), weights.sum(dim=2) > 0


class TokenAnchorLoss(nn.Module):
    """Each visible token ranks the anchors as its target does: KL(target's softmax || token's),
    both over cosines to the anchors at temperature `tau`, the target's less the anchors' prior
    (`anchors.anchor_prior`).

    Args:
        tau: the temperature of both softmaxes.
        name: the term's name in the returned dict (`token_views` for the wordless anchors).
    """

    def __init__(self, *, tau: float = 0.05, name: str = "token_anchors") -> None:
        super().__init__()
        self.tau = tau
        self.name = name

    def forward(
        self, tokens: Tensor, target: Tensor, has: Tensor, anchors: Tensor, prior: Tensor | float = 0.0, words: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Args:
            tokens: [B, N, D] visible patch tokens in the teacher's space.
            target, has: from `token_targets`.
            anchors: [K, D] unit anchor embeddings; prior: [K], taken out of the target's cosines.
            words: (background, objects), the indices of the background words and of the others:
                when given, also `token_background`, the KL over the object words alone, the
                target's background mass spread evenly over them.

        Returns:
            {"token_anchors": mean over tokens with a target of the KL} (and "token_background").
        """
        q = F.softmax((target @ anchors.T - prior) / self.tau, dim=-1)  # [B, N, K]
        logits = F.normalize(tokens.float(), dim=-1) @ anchors.T / self.tau  # [B, N, K]
        out = {self.name: _mean_kl(q, logits.log_softmax(dim=-1), has)}
        if words is not None:  # indices, not masks: a boolean CUDA mask would make the host wait every step
            background, objects = words
            q_objects = q.index_select(-1, objects) + q.index_select(-1, background).sum(dim=-1, keepdim=True) / len(objects)
            out["token_background"] = _mean_kl(q_objects, logits.index_select(-1, objects).log_softmax(dim=-1), has)
        return out


def _mean_kl(q: Tensor, log_p: Tensor, has: Tensor) -> Tensor:
    """Mean over the tokens with a target of KL(q || p), both [B, N, K]."""
    kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=-1)  # [B, N]
    return (kl * has).sum() / has.sum().clamp_min(1)
