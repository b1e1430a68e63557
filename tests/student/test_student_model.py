"""The student model on CPU: shapes, masking, grouping, checkpoint loading, a short overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from pipeline.core.errors import ConfigError
from pipeline.student import (
    AssignmentInfoMaxLoss,
    DistillationLoss,
    ReconstructionLoss,
    SegmentMatchingLoss,
    ZeroSegStudent,
    compose_assignments,
    local_view_mask,
    param_groups_for_weight_decay,
    patchify,
    random_masking,
    resize_sincos_pos_embed,
    sincos_2d,
    student_arch,
    unpatchify,
)
from pipeline.student.grouping import GroupingBlock
from pipeline.student.pos_embed import sincos_1d

D = 24  # teacher width used in the tests


def build(name: str, **overrides) -> ZeroSegStudent:
    torch.manual_seed(0)
    return ZeroSegStudent(arch=student_arch(name, **overrides), out_dim=D)


# ---- config -----------------------------------------------------------------------------------
def test_variants_and_strict_overrides():
    b16 = student_arch("zeroseg_vit_b16")
    assert (b16.embed_dim, b16.depth, b16.num_heads, b16.img_size, b16.patch_size) == (768, 12, 12, 224, 16)
    assert (b16.decoder_embed_dim, b16.decoder_depth, b16.decoder_num_heads) == (512, 8, 16)
    assert (b16.head_depth, b16.group_stages, b16.num_segments) == (5, ((2, 32), (4, 8)), 8)
    assert student_arch("zeroseg_tiny", group_stages=[[1, 8], [3, 2]]).group_stages == ((1, 8), (3, 2))
    with pytest.raises(ConfigError, match="zeroseg_nope"):
        student_arch("zeroseg_nope")
    with pytest.raises(ConfigError, match="embed_dims"):
        student_arch("zeroseg_tiny", embed_dims=8)
    with pytest.raises(ConfigError, match="group_stages"):
        student_arch("zeroseg_tiny", group_stages=((4, 8), (2, 4)))
    with pytest.raises(ConfigError, match="patch_size"):
        student_arch("zeroseg_tiny", img_size=60)


# ---- position embeddings ----------------------------------------------------------------------
def mae_reference(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed (cls_token=True), transcribed."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_mae_and_resizes():
    ours = sincos_2d(64, (5, 5), num_prefix_tokens=1)
    np.testing.assert_allclose(ours.numpy(), mae_reference(64, 5), atol=1e-6)

    table = ours[None]  # [1, 26, 64]
    same = resize_sincos_pos_embed(table, source_grid=(5, 5), new_grid=(5, 5))
    assert same is table
    big = resize_sincos_pos_embed(table, source_grid=(5, 5), new_grid=(3, 7))
    assert big.shape == (1, 1 + 21, 64)
    # recompute: patch (r, c) of any grid has the code of position (r, c)
    torch.testing.assert_close(big[0, 1 + 1 * 7 + 2], ours[1 + 1 * 5 + 2])
    rescaled = resize_sincos_pos_embed(table, source_grid=(5, 5), new_grid=(10, 10), mode="rescale")
    assert rescaled.shape == (1, 101, 64)
    # rescale: cell centres of the 10-grid mapped into the 5-grid's range, (i + 0.5) / 2 - 0.5
    row, col = 3, 8  # positions 1.25 and 3.75
    expected = torch.cat([sincos_1d(32, torch.tensor([3.75])), sincos_1d(32, torch.tensor([1.25]))], dim=1)
    torch.testing.assert_close(rescaled[0, 1 + row * 10 + col], expected[0].float())


# ---- masking and patches ------------------------------------------------------------------------
def test_random_masking_counts_and_restore():
    B, L, C = 3, 16, 5
    x = torch.arange(B * L, dtype=torch.float32).reshape(B, L, 1).expand(B, L, C).contiguous()
    gen = torch.Generator().manual_seed(1)
    out = random_masking(x, 0.6, generator=gen)
    keep = int(L * (1 - 0.6))  # 6
    assert out.kept.shape == (B, keep, C) and out.ids_keep.shape == (B, keep)
    assert torch.all(out.mask.sum(1) == L - keep)
    # kept tokens are the ones at ids_keep, and the mask marks exactly the others
    torch.testing.assert_close(out.kept[..., 0], torch.gather(x[..., 0], 1, out.ids_keep))
    assert torch.all(torch.gather(out.mask, 1, out.ids_keep) == 0)
    # ids_restore inverts the shuffle
    shuffle = torch.argsort(out.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, out.ids_restore), torch.arange(L).expand(B, L))
    assert torch.equal(shuffle[:, :keep], out.ids_keep)
    # per-sample: the three permutations differ; a reseeded generator repeats them
    assert len({tuple(r.tolist()) for r in out.ids_keep}) == B
    again = random_masking(x, 0.6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.ids_keep, out.ids_keep)
    # ratio 0 keeps everything in patch order
    full = random_masking(x, 0.0)
    assert torch.equal(full.kept, x) and full.mask.sum() == 0


def test_patchify_roundtrip_non_square():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)  # [2, 6, 192]
    assert patches.shape == (2, 6, 192)
    torch.testing.assert_close(patches[0, 1].reshape(8, 8, 3).permute(2, 0, 1), imgs[0, :, 0:8, 8:16])
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), imgs)


# ---- model shapes and grouping -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["zeroseg_micro", "zeroseg_tiny"])
def test_forward_shapes(name):
    model = build(name)
    arch = model.arch
    B = 2
    imgs = torch.randn(B, 3, arch.img_size, arch.img_size)
    L = (arch.img_size // arch.patch_size) ** 2
    keep = int(L * (1 - 0.6))

    latent, mask, ids_restore = model.forward_encoder(imgs, 0.6)
    assert latent.shape == (B, 1 + keep, arch.embed_dim)
    assert mask.shape == ids_restore.shape == (B, L)

    out = model(imgs, 0.6)
    S = arch.num_segments
    assert out.z.shape == (B, D) and out.segments.shape == (B, S, D)
    assert out.pred.shape == (B, L, arch.patch_size**2 * 3)
    assert out.ids_keep.shape == (B, keep)
    counts = [n for _, n in arch.group_stages]
    expected = [(B, counts[0], keep)] + [(B, n, prev) for prev, n in zip(counts, counts[1:])]
    assert [tuple(a.shape) for a in out.soft_assignments] == expected
    assert [tuple(a.shape) for a in out.hard_assignments] == expected
    for soft, hard in zip(out.soft_assignments, out.hard_assignments):
        torch.testing.assert_close(soft.sum(1), torch.ones_like(soft.sum(1)))  # over groups
        one_hot = torch.zeros_like(hard).scatter_(1, hard.argmax(1, keepdim=True), 1.0)
        torch.testing.assert_close(hard, one_hot, atol=1e-6, rtol=0)  # one-hot in forward
    assert model(imgs, 0.6, decode=False).pred is None


def test_hard_assignment_has_gradient():
    model = build("zeroseg_micro").train()
    out = model(torch.randn(2, 3, 32, 32), 0.5)
    weights = torch.randn_like(out.hard_assignments[0])
    (out.hard_assignments[0] * weights).sum().backward()
    grad = model.seg_head.grouping[0].assign.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_grouping_block_eval_is_deterministic_and_soft_normalized():
    torch.manual_seed(0)
    block = GroupingBlock(dim=16, num_heads=2, num_group_tokens=6, num_output_groups=3).eval()
    x, groups = torch.randn(2, 10, 16), torch.randn(2, 6, 16)
    a, b = block(x, groups), block(x, groups)
    assert a.tokens.shape == (2, 3, 16) and a.soft.shape == a.hard.shape == (2, 3, 10)
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.soft.sum(1), torch.ones(2, 10))
    assert torch.equal(a.hard.argmax(1), a.soft.argmax(1))  # eval: argmax of the noise-free soft


def test_compose_assignments_sums_to_one():
    a1 = torch.rand(2, 5, 12).softmax(1)
    a2 = torch.rand(2, 3, 5).softmax(1)
    out = compose_assignments([a1, a2])
    assert out.shape == (2, 3, 12)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 12))
    torch.testing.assert_close(out[1, :, 4], a2[1] @ a1[1, :, 4])


@pytest.mark.parametrize("mode", ["recompute", "rescale"])
@pytest.mark.parametrize("size", [(24, 40), (48, 32)])
def test_segment_masks_at_other_sizes(mode, size):
    model = build("zeroseg_micro", pos_embed_resize=mode).eval()
    H, W = size
    masks = model.segment_masks(torch.randn(2, 3, H, W))
    assert masks.shape == (2, model.arch.num_segments, H // 8, W // 8)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, H // 8, W // 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks_bf16 = model.segment_masks(torch.randn(1, 3, H, W))
    assert masks_bf16.dtype == torch.float32
    torch.testing.assert_close(masks_bf16.sum(1), torch.ones(1, H // 8, W // 8))
    pred = model.infer(torch.randn(1, 3, H, W))
    assert pred.segments.shape == (1, model.arch.num_segments, D) and pred.z.shape == (1, D)


def test_segment_masks_refuses_training_mode_and_bad_sizes():
    model = build("zeroseg_micro")
    with pytest.raises(RuntimeError, match="eval"):
        model.segment_masks(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple"):
        model.eval().segment_masks(torch.randn(1, 3, 30, 32))


# ---- checkpoints and optimizer groups ----------------------------------------------------------
def test_encoder_loads_timm_vit_small_by_name():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    model = build("zeroseg_vit_s16")
    report = model.load_encoder_state_dict(vit.state_dict())
    encoder_keys = [k for k in model.state_dict() if k.startswith(("patch_embed.", "blocks.", "norm.", "cls_token"))]
    assert sorted(report.loaded) == sorted(encoder_keys)
    assert report.missing == []
    assert set(report.skipped) == {"pos_embed"}
    assert {"head.weight", "head.bias"} <= set(report.unexpected)
    torch.testing.assert_close(model.blocks[11].attn.qkv.weight, vit.blocks[11].attn.qkv.weight)


def test_loaded_encoder_reproduces_timm_features():
    """Same weights, same positions, no masking: our encoder computes timm's forward_features."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
        embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
    ).eval()
    model = build("zeroseg_micro").eval()
    report = model.load_encoder_state_dict(vit.state_dict(), load_pos_embed=True)
    assert "pos_embed" in report.loaded and report.missing == []
    imgs = torch.randn(2, 3, 32, 32)
    latent, _, _ = model.forward_encoder(imgs, 0.0)
    torch.testing.assert_close(latent, vit.forward_features(imgs), atol=1e-5, rtol=1e-5)


def test_weight_decay_groups():
    model = build("zeroseg_micro")
    decay, no_decay = param_groups_for_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "seg_head.group_tokens.0", "seg_head.group_tokens.1",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "seg_head.grouping.0.assign.q_proj.bias"} <= kept
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


# ---- a short overfit -----------------------------------------------------------------------------
def test_tiny_student_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = ZeroSegStudent(arch=student_arch("zeroseg_tiny"), out_dim=32).train()
    imgs = torch.randn(4, 3, 64, 64)
    grids = [1, 2]
    targets = torch.randn(4, 5, 32)  # [B, V, D], V = 1 + 4
    local = local_view_mask(grids)
    distill, match = DistillationLoss(), SegmentMatchingLoss(bidirectional=True)
    recon, infomax = ReconstructionLoss(), AssignmentInfoMaxLoss()
    opt = torch.optim.AdamW(param_groups_for_weight_decay(model, 0.05), lr=2e-3)
    history = []
    for _ in range(50):
        out = model(imgs, 0.6, generator=torch.Generator().manual_seed(0))  # same mask each step
        terms = {
            **distill(out.z, targets),
            **match(out.segments, targets, local),
            **recon(out.pred, model.patchify(imgs), out.mask),
            **infomax(out.soft_assignments),
        }
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    for h in history:  # the info-max objective is the sum of its two terms
        h["infomax"] = h["usage_neg_entropy"] + h["token_entropy"]
    assert all(math.isfinite(v) for h in history for v in h.values())

    def mean(name, rows):
        return np.mean([h[name] for h in rows])

    # usage_neg_entropy starts at its minimum (near-uniform soft assignments use every group
    # evenly) and can only rise as tokens grow confident; it is checked for spread instead.
    for name in ("distill", "segment_match", "view_match", "reconstruction", "token_entropy", "infomax"):
        first, last = mean(name, history[:5]), mean(name, history[-5:])
        assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
    assert mean("usage_neg_entropy", history[-5:]) < -0.3  # still no collapse to one group


def test_every_norm_is_its_reference_implementations():
    """GroupViT's grouping head uses nn.LayerNorm (eps 1e-5); MAE's encoder and decoder eps 1e-6.
    At initialisation the group tokens (std 0.02) have a variance near eps, so the choice is not
    cosmetic; it is pinned here, not left to a library's default."""
    from pipeline.student import ZeroSegStudent, student_arch

    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=16)
    norms = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    head = {n: e for n, e in norms.items() if n.startswith("seg_head.")}
    rest = {n: e for n, e in norms.items() if not n.startswith("seg_head.")}
    assert head and set(head.values()) == {1e-5}, head
    assert rest and set(rest.values()) == {1e-6}, rest
    assert {"norm", "decoder_norm", "global_norm", "blocks.0.norm1", "decoder_blocks.0.norm2"} <= set(rest)
    assert {"seg_head.norm", "seg_head.blocks.0.norm1", "seg_head.grouping.0.norm_tokens", "seg_head.grouping.0.pre_assign_attn.norm_post"} <= set(head)


def test_token_naming_averages_each_segments_unit_tokens_under_its_weights():
    torch.manual_seed(0)
    model = build("zeroseg_micro").eval()
    imgs = torch.randn(2, 3, 32, 32)
    named = model.infer(imgs, naming="tokens")
    own = model.infer(imgs)
    torch.testing.assert_close(named.masks, own.masks)  # the same segmentation, other names
    torch.testing.assert_close(named.z, own.z)
    latent = model.forward_encoder(imgs, 0.0)[0][:, 1:]
    tokens = torch.nn.functional.normalize(model.segment_proj(latent), dim=-1)  # [B, L, D]
    weights = own.masks.flatten(2)  # [B, S, L]
    for b in range(2):
        for s in range(model.arch.num_segments):
            want = (weights[b, s, :, None] * tokens[b]).sum(0) / weights[b, s].sum()
            torch.testing.assert_close(named.segments[b, s], want)
    assert not torch.allclose(named.segments, own.segments)
    with pytest.raises(ValueError, match="naming"):
        model.infer(imgs, naming="pixels")
    dense, z = model.token_embeddings(imgs, with_image=True)  # one forward gives the tokens and the image embedding
    torch.testing.assert_close(z, own.z)
    torch.testing.assert_close(dense.flatten(1, 2), tokens)
    torch.testing.assert_close(model.token_embeddings(imgs), dense)
