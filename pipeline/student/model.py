"""The ZeroSeg student: a masked ViT encoder, an MAE decoder and a GroupViT-style head.

Parameter names of the encoder are those of timm's `VisionTransformer` and MAE's encoder
(`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.N.*`, `norm.*`), and of the decoder
those of MAE (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N.*`,
`decoder_norm`, `decoder_pred`), so that their checkpoints load by name. The segmentation
head lives under `seg_head.*` (not `head.*`, which is timm's classifier).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pipeline.student.config import StudentArch
from pipeline.student.grouping import compose_assignments
from pipeline.student.head import SegmentationHead
from pipeline.student.masking import random_masking, unshuffle
from pipeline.student.patches import patchify, unpatchify
from pipeline.student.pos_embed import resize_sincos_pos_embed, sincos_2d
from pipeline.student.pretrained import LoadReport, load_encoder_state_dict

# MAE's norms (eps 1e-6) for the encoder, the decoder and the global branch, named here so that
# no library default decides them (timm's Block happens to default to the same today).
MAE_NORM = functools.partial(nn.LayerNorm, eps=1e-6)

class EncoderOutput(NamedTuple):
    """Output of `ZeroSegStudent.forward_encoder` (unpacks like MAE's triple)."""

    latent: Tensor  # [B, 1 + L_keep, C] cls token first, then visible patches (shuffled order)
    mask: Tensor  # [B, L] 1 = removed
    ids_restore: Tensor  # [B, L]


@dataclass
class StudentOutput:
    """Everything the losses and the logger need from one training forward pass."""

    z: Tensor  # [B, D] global embedding
    segments: Tensor  # [B, S, D] segment embeddings g_i
    pred: Tensor | None  # [B, L, p*p*3] reconstructed pixels (None when decode=False)
    mask: Tensor  # [B, L] 1 = removed (reconstruction targets)
    ids_restore: Tensor  # [B, L]
    ids_keep: Tensor  # [B, L_keep] patch index of each token the head saw
    soft_assignments: list[Tensor]  # per stage [B, S_k, N_k], noise-free softmax over groups
    hard_assignments: list[Tensor]  # per stage [B, S_k, N_k], what the forward pass used
    grid: tuple[int, int]  # (h, w) patch grid of the input
    tokens: Tensor | None = None  # [B, L_keep, D] visible patch tokens through the segment projection (asked for)


@dataclass
class SegmentPrediction:
    """Inference output: per-patch soft masks and the segments' embeddings."""

    masks: Tensor  # [B, S, h, w] patch-to-segment weights, sum to 1 over S
    segments: Tensor  # [B, S, D] in the teacher's space
    z: Tensor  # [B, D] in the teacher's space


class ZeroSegStudent(nn.Module):
    """ZeroSeg student.

    Args:
        arch: the architecture.
        out_dim: the teacher's embedding width D, read from the teacher cache.
    """

    def __init__(self, *, arch: StudentArch, out_dim: int) -> None:
        super().__init__()
        self.arch, self.out_dim = arch, out_dim
        C, Cd, p = arch.embed_dim, arch.decoder_embed_dim, arch.patch_size
        self.grid_size = arch.grid_size

        # encoder (timm / MAE names)
        self.patch_embed = PatchEmbed(
            img_size=arch.img_size, patch_size=p, in_chans=3, embed_dim=C, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(sincos_2d(C, self.grid_size, num_prefix_tokens=1)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim=C, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=MAE_NORM) for _ in range(arch.depth)
        )
        self.norm = MAE_NORM(C)

        # reconstruction decoder (MAE names)
        self.decoder_embed = nn.Linear(C, Cd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(Cd, self.grid_size, num_prefix_tokens=1)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dim=Cd, num_heads=arch.decoder_num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=MAE_NORM)
            for _ in range(arch.decoder_depth)
        )
        self.decoder_norm = MAE_NORM(Cd)
        self.decoder_pred = nn.Linear(Cd, p * p * 3)

        # segmentation head and the outputs in the teacher's space
        self.seg_head = SegmentationHead(
            dim=C, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, depth=arch.head_depth,
            group_stages=arch.group_stages, hard_assignment=arch.hard_assignment,
            gumbel_tau=arch.gumbel_tau, group_token_projector=arch.group_token_projector,
        )
        self.segment_proj = nn.Linear(C, out_dim)
        # the global branch reads the encoder's tokens: the encoder's norms
        self.global_block = Block(dim=C, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=MAE_NORM)
        self.global_norm = MAE_NORM(C)
        self.global_mlp = Mlp(in_features=C, hidden_features=int(C * arch.mlp_ratio), out_features=out_dim)

        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialization: xavier-uniform linears (patch embedding as a linear), 0.02 tokens."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # [C, 3*p*p] view of the conv kernel
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- geometry -------------------------------------------------------------------------
    def grid_of(self, imgs: Tensor) -> tuple[int, int]:
        """Patch grid (h, w) of an image batch [B, 3, H, W]; H, W must be multiples of p."""
        H, W = imgs.shape[-2:]
        p = self.arch.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def _pos(self, table: Tensor, grid: tuple[int, int], mode: str | None = None) -> Tensor:
        """The [1, 1 + h*w, C] position table for `grid` (resized by `mode`, default the arch's,
        when not the training grid)."""
        return resize_sincos_pos_embed(
            table, source_grid=self.grid_size, new_grid=grid, num_prefix_tokens=1,
            mode=mode or self.arch.pos_embed_resize,
        )

    def patchify(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, L, p*p*3] (MAE layout)."""
        return patchify(imgs, self.arch.patch_size)

    def unpatchify(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """[B, L, p*p*3] -> [B, 3, H, W]; `grid` (h, w) for non-square inputs."""
        return unpatchify(x, self.arch.patch_size, grid)

    # ---- parts ----------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None, pos_mode: str | None = None
    ) -> EncoderOutput:
        """Embed patches, drop a random `mask_ratio` of them per image, encode the rest.

        Args:
            imgs: [B, 3, H, W] normalized images, H and W multiples of the patch size.
            mask_ratio: fraction of patches removed; 0 keeps all in patch order.
            generator: optional RNG for the masking noise (on the images' device).
            pos_mode: how the position table is resized to another grid (None: the arch's
                `pos_embed_resize`).

        Returns:
            `EncoderOutput(latent [B, 1+L_keep, C], mask [B, L], ids_restore [B, L])`.
        """
        grid = self.grid_of(imgs)
        pos = self._pos(self.pos_embed, grid, pos_mode)  # [1, 1+L, C]
        x = self.patch_embed(imgs) + pos[:, 1:]  # [B, L, C]
        masked = random_masking(x, mask_ratio, generator=generator)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, C]
        x = torch.cat([cls, masked.kept], dim=1)  # [B, 1+L_keep, C]
        for blk in self.blocks:
            x = blk(x)
        return EncoderOutput(latent=self.norm(x), mask=masked.mask, ids_restore=masked.ids_restore)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """Predict the pixels of every patch from the visible latents and mask tokens.

        Args:
            latent: [B, 1+L_keep, C] from `forward_encoder`.
            ids_restore: [B, L].
            grid: (h, w) with h*w = L.

        Returns:
            [B, L, p*p*3] predicted (normalized-target) pixels, patch order.
        """
        x = self.decoder_embed(latent)  # [B, 1+L_keep, Cd]
        patches = unshuffle(x[:, 1:], ids_restore, self.mask_token)  # [B, L, Cd]
        x = torch.cat([x[:, :1], patches], dim=1) + self._pos(self.decoder_pos_embed, grid)  # [B, 1+L, Cd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, 1+L, p*p*3]
        return x[:, 1:]  # [B, L, p*p*3] cls dropped

    def forward_segments(self, patch_tokens: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Group patch tokens and map segments and the image into the teacher's space.

        Args:
            patch_tokens: [B, N, C] encoder patch tokens (no cls), any N.

        Returns:
            z [B, D], segments [B, S, D], soft and used assignments per stage [B, S_k, N_k].
        """
        head = self.seg_head(patch_tokens)  # tokens [B, S, C]
        segments = self.segment_proj(head.tokens)  # [B, S, D]
        pooled = self.global_norm(self.global_block(head.tokens)).mean(dim=1)  # [B, C]
        z = self.global_mlp(pooled)  # [B, D]
        return z, segments, head.soft, head.hard

    # ---- entry points ---------------------------------------------------------------------
    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float,
        *,
        generator: torch.Generator | None = None,
        decode: bool = True,
        tokens: bool = False,
    ) -> StudentOutput:
        """Training forward pass. The head sees only the visible patches.

        Args:
            imgs: [B, 3, H, W].
            mask_ratio: fraction of patches removed (paper: 0.6).
            generator: optional RNG for the masking.
            decode: run the reconstruction decoder (skip it when its loss weight is 0).
            tokens: also map the visible patch tokens into the teacher's space with the segment
                projection (the token terms, `StudentObjective.needs_tokens`).
        """
        grid = self.grid_of(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : latent.shape[1] - 1]  # [B, L_keep]
        z, segments, soft, hard = self.forward_segments(latent[:, 1:])
        pred = self.forward_decoder(latent, ids_restore, grid) if decode else None
        return StudentOutput(
            z=z, segments=segments, pred=pred, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep,
            soft_assignments=soft, hard_assignments=hard, grid=grid,
            tokens=self.segment_proj(latent[:, 1:]) if tokens else None,
        )

    @torch.no_grad()
    def infer(self, imgs: Tensor, pos_mode: str | None = None, naming: str = "segment") -> SegmentPrediction:
        """Inference on all patches: soft masks of the final segments and their embeddings.

        Masks multiply the stages' noise-free soft assignments (GroupViT's evaluation), giving
        patch-to-segment weights on the patch grid; upsampling to pixels is the caller's job.
        Any input size that is a multiple of the patch size works (non-square too).

        Args:
            imgs: [B, 3, H, W].
            pos_mode: position-table resizing for this call (None: the arch's).
            naming: the segments' embeddings: `segment` (the group tokens', the paper's) or
                `tokens` (the assignment-weighted mean of the unit patch tokens through the
                segment projection, the space `loss.token_anchors` trains).

        Returns:
            `SegmentPrediction(masks [B, S, H/p, W/p], segments [B, S, D], z [B, D])`.
        """
        if self.training:
            raise RuntimeError("infer/segment_masks need eval mode (model.eval()): training adds Gumbel noise")
        h, w = self.grid_of(imgs)
        latent, _, _ = self.forward_encoder(imgs, 0.0, pos_mode=pos_mode)  # all patches, patch order
        z, segments, soft, _ = self.forward_segments(latent[:, 1:])
        weights = compose_assignments(soft)  # [B, S, L]
        if naming == "tokens":  # each segment's patch tokens, unit vectors, averaged under its weights
            tokens = self._unit_tokens(latent)  # [B, L, D]
            segments = torch.bmm(weights, tokens) / weights.sum(dim=2, keepdim=True).clamp_min(1e-6)  # [B, S, D]
        elif naming != "segment":
            raise ValueError(f"naming: expected segment or tokens, got {naming!r}")
        masks = weights.reshape(weights.shape[0], weights.shape[1], h, w)  # [B, S, h, w]
        return SegmentPrediction(masks=masks, segments=segments, z=z)

    @torch.no_grad()
    def token_embeddings(self, imgs: Tensor, pos_mode: str | None = None, *, with_image: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """[B, 3, H, W] -> [B, H/p, W/p, D]: every patch token through the segment projection, as a unit vector
        in the teacher's space (what `loss.token_anchors` trains; eval mode); `with_image`: and z [B, D] as `infer`'s."""
        if self.training:
            raise RuntimeError("token_embeddings needs eval mode (model.eval())")
        h, w = self.grid_of(imgs)
        latent, _, _ = self.forward_encoder(imgs, 0.0, pos_mode=pos_mode)
        tokens = self._unit_tokens(latent).reshape(len(imgs), h, w, -1)  # [B, h, w, D]
        if not with_image:
            return tokens
        return tokens, self.forward_segments(latent[:, 1:])[0]

    def _unit_tokens(self, latent: Tensor) -> Tensor:
        """[B, 1 + L, C] encoder output -> [B, L, D] patch tokens through the segment projection, unit vectors."""
        return F.normalize(self.segment_proj(latent[:, 1:]), dim=-1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, for checkpoints of every version (`legacy.upgrade_state_dict`)."""
        from pipeline.student.legacy import upgrade_state_dict

        return super().load_state_dict(upgrade_state_dict(state_dict), strict=strict, assign=assign)

    def segment_masks(self, imgs: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, S, H/p, W/p] soft patch-to-segment weights (eval mode)."""
        return self.infer(imgs).masks

    def load_encoder_state_dict(self, state_dict: dict[str, Tensor], *, load_pos_embed: bool = False) -> LoadReport:
        """Load a timm or MAE ViT's encoder weights by name; see `pretrained.load_encoder_state_dict`."""
        return load_encoder_state_dict(self, state_dict, load_pos_embed=load_pos_embed)
