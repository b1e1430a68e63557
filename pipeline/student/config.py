"""The student's architecture as a frozen dataclass, and the named variants.

The teacher's embedding width (`out_dim`) is deliberately not a field: it is a fact of the
teacher cache, read from the store when the model is built, never restated here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class StudentArch:
    """Shape of the ZeroSeg student: MAE encoder/decoder plus a GroupViT-style head.

    `group_stages` lists `(after_layer, num_groups)`: a grouping block runs after head layer
    `after_layer` (1-based count of head layers done) with `num_groups` learnable group tokens,
    which also is its number of output segments. `((2, 32), (4, 8))` with `head_depth=5` is the
    paper's head: layers 1-2 over patches + 32 group tokens, grouping to 32 segments, layers 3-4
    over those + 8 group tokens, grouping to 8 segments, layer 5 over the 8 segments.
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    head_depth: int = 5
    group_stages: tuple[tuple[int, int], ...] = ((2, 32), (4, 8))
    gumbel_tau: float = 1.0
    hard_assignment: bool = True  # Gumbel noise + hard straight-through in training
    # GroupViT's group projector: stage k>0 group tokens = learned tokens + a token-mixing
    # MLP of the previous stage's group tokens. False: independent learned tokens per stage.
    group_token_projector: bool = True
    # Position embeddings at a grid other than img_size/patch_size: "recompute" evaluates
    # sin-cos at the new integer patch positions; "rescale" evaluates it at positions mapped
    # into the training grid's range (what bicubic interpolation of the table approximates);
    # "interpolate" interpolates the table's values bicubically (GroupViT's evaluation).
    pos_embed_resize: Literal["recompute", "rescale", "interpolate"] = "recompute"

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"student arch: {msg}")

        # accept lists (YAML, JSON checkpoints) and store hashable tuples
        object.__setattr__(self, "group_stages", tuple((int(a), int(n)) for a, n in self.group_stages))

        if self.img_size % self.patch_size:
            fail(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, dim, heads in (
            ("embed_dim", self.embed_dim, self.num_heads),
            ("decoder_embed_dim", self.decoder_embed_dim, self.decoder_num_heads),
        ):
            if dim % heads:
                fail(f"{name} {dim} is not divisible by its number of heads {heads}")
            if dim % 4:
                fail(f"{name} {dim} must be a multiple of 4 for 2-D sin-cos position embeddings")
        if not self.group_stages:
            fail("group_stages is empty: the head needs at least one grouping block")
        prev = 0
        for after, groups in self.group_stages:
            if not prev < after <= self.head_depth:
                fail(f"group_stages {self.group_stages}: layers must increase within 1..{self.head_depth}")
            if groups < 1:
                fail(f"group_stages {self.group_stages}: group counts must be positive")
            prev = after
        if self.pos_embed_resize not in ("recompute", "rescale", "interpolate"):
            fail(f"pos_embed_resize: expected recompute, rescale or interpolate, got {self.pos_embed_resize!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the training resolution."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_segments(self) -> int:
        """Number of final segment tokens (groups of the last grouping block)."""
        return self.group_stages[-1][1]


_PAPER_HEAD = dict(head_depth=5, group_stages=((2, 32), (4, 8)))

VARIANTS: dict[str, dict[str, Any]] = {
    # Paper (section 4.1): ViT-B/16 at 224, MAE decoder 8 x 512 with 16 heads.
    "zeroseg_vit_b16": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, **_PAPER_HEAD,
    ),
    # ViT-S/16 encoder (timm vit_small_patch16_224 names and sizes), lighter decoder.
    "zeroseg_vit_s16": dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, **_PAPER_HEAD,
    ),
    # CPU-sized: 8x8 patch grid, about 1.8M parameters; keeps the paper's head layout.
    "zeroseg_tiny": dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        head_depth=5, group_stages=((2, 16), (4, 4)),
    ),
    # zeroseg_tiny with 4-pixel patches: a 16x16 grid, so a demo shape spans 4-9 patches
    # instead of 2-4 (same weights per token, about 4x the compute).
    "zeroseg_tiny_p4": dict(
        img_size=64, patch_size=4, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        head_depth=5, group_stages=((2, 16), (4, 4)),
    ),
    # zeroseg_tiny with the paper's 8 final segments instead of 4: a whole demo scene holds up
    # to 4 shapes and the background, which 4 segments cannot separate.
    "zeroseg_tiny_g8": dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        head_depth=5, group_stages=((2, 16), (4, 8)),
    ),
    # zeroseg_tiny_g8 at the demo scenes' full resolution: 128-px input, 16-px patches, the same
    # 8x8 token grid (the same compute per image but the patch embedding), four times the pixels.
    "zeroseg_tiny_g8_128": dict(
        img_size=128, patch_size=16, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        head_depth=5, group_stages=((2, 16), (4, 8)),
    ),
    # Unit-test sized: 4x4 patch grid, a few tens of thousands of parameters.
    "zeroseg_micro": dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
        head_depth=3, group_stages=((1, 8), (2, 4)),
    ),
}


def student_arch(name: str, **overrides: Any) -> StudentArch:
    """Build a registered variant, optionally overriding fields.

    Args:
        name: a key of `VARIANTS`.
        **overrides: `StudentArch` fields that replace the variant's values.

    Raises:
        ConfigError: unknown variant or unknown field (the message names it).
    """
    if name not in VARIANTS:
        raise ConfigError(f"unknown student variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    fields = {f.name for f in dataclasses.fields(StudentArch)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown student arch field(s) {', '.join(unknown)} for {name!r}")
    return StudentArch(**{**VARIANTS[name], **overrides})
