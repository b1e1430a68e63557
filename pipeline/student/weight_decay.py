"""AdamW parameter groups: no weight decay on norms, biases, position embeddings and tokens."""

from __future__ import annotations

from typing import Any

from torch import nn

# Parameters that are vectors of learned embeddings rather than weights (MAE/timm `no_weight_decay`).
NO_DECAY_NAMES = ("cls_token", "mask_token", "group_tokens", "pos_embed", "logit_scale")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for biases, norm gains (1-D), scalars and the named embedding parameters."""
    leaf = name.split(".")
    return param.ndim <= 1 or any(part in NO_DECAY_NAMES or part.endswith("pos_embed") for part in leaf)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups; frozen parameters (requires_grad False, e.g. sin-cos tables) are left out.

    Args:
        model: any module (the student).
        weight_decay: decay of the weight matrices (paper: 0.05).

    Returns:
        `[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]`.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
