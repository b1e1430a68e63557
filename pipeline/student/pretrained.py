"""Initialize the student's encoder from a timm or MAE ViT checkpoint, by parameter name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.", "cls_token", "pos_embed")
DECODER_PREFIXES = (
    "decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.",
)
_FIXED = ("pos_embed", "decoder_pos_embed")  # our fixed sin-cos tables


@dataclass
class LoadReport:
    """What `load_encoder_state_dict` did; nothing is raised, the caller decides."""

    loaded: list[str] = field(default_factory=list)  # copied
    missing: list[str] = field(default_factory=list)  # model keys in scope that the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys out of scope or unknown
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason (shape, fixed sin-cos)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"skipped {len(self.skipped)}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in self.skipped.items())})" if self.skipped else "")
        )


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Accept `{'model': sd}` (MAE), `{'state_dict': sd}`, and DDP's `module.` prefix."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_encoder_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    load_pos_embed: bool = False,
    include_decoder: bool = False,
) -> LoadReport:
    """Copy encoder weights whose names and shapes match.

    Position embeddings are skipped by default: the student's are fixed 2-D sin-cos and are
    recomputed at other resolutions, so a learned table (timm's supervised ViTs) copied in
    would disagree with what the model uses off its training grid. MAE's own table equals ours.

    Args:
        model: a `ZeroSegStudent`.
        state_dict: a timm `VisionTransformer` or MAE state dict (optionally wrapped).
        load_pos_embed: copy `pos_embed` (and the decoder's) when the shapes match.
        include_decoder: also copy MAE's decoder (`decoder_*`, `mask_token`).

    Returns:
        `LoadReport` of loaded, missing, unexpected and skipped keys.
    """
    source = _unwrap(state_dict)
    prefixes = ENCODER_PREFIXES + (DECODER_PREFIXES if include_decoder else ())
    target = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(prefixes)}
    report = LoadReport()
    with torch.no_grad():
        for key, param in target.items():
            if key not in source:
                report.missing.append(key)
                continue
            value = source[key]
            if key in _FIXED and not load_pos_embed:
                report.skipped[key] = "fixed sin-cos position embedding"
            elif tuple(value.shape) != tuple(param.shape):
                report.skipped[key] = f"shape {tuple(value.shape)} != {tuple(param.shape)}"
            else:
                param.copy_(value.to(dtype=param.dtype, device=param.device))
                report.loaded.append(key)
    report.unexpected = sorted(k for k in source if k not in target)
    return report
