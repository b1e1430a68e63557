"""GroupViT's evaluation protocol, pinned by hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.evaluation.protocol import StudentSegmenter, group_logits
from pipeline.evaluation.vocabulary import Namer
from pipeline.evaluation.windows import WindowAverage, slide_boxes
from pipeline.student import ZeroSegStudent, student_arch
from pipeline.student.pos_embed import resize_sincos_pos_embed, sincos_2d


def test_windows_are_laid_out_as_mmseg_slides_them():
    # shorter than the window: clipped to the image, the other side kept, moved back flush
    assert slide_boxes(96, 160, 128, 64) == [(0, 0, 96, 128), (0, 32, 96, 128)]
    assert slide_boxes(128, 128, 64, 32) == [(t, l, 64, 64) for t in (0, 32, 64) for l in (0, 32, 64)]
    assert slide_boxes(100, 100, 128, 64) == [(0, 0, 100, 100)]
    # 150 px at window 128 stride 64: two windows, the second flush with the end
    assert [l for _, l, _, _ in slide_boxes(64, 150, 128, 64)] == [0, 22]


def test_overlapping_windows_average_their_logits():
    merged = WindowAverage(2, 1, 3)
    merged.add(0, 0, torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))  # window A over columns 0-1: class 0
    merged.add(0, 1, torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]]))  # window B over columns 1-2: class 1
    out = merged.result()
    assert out[:, 0, 0].tolist() == [1.0, 0.0] and out[:, 0, 2].tolist() == [0.0, 1.0]
    assert out[:, 0, 1].tolist() == [0.5, 0.5]  # both windows count half, neither simply wins
    with pytest.raises(ValueError, match="covered by no window"):
        WindowAverage(1, 1, 2).result()


def _axes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _namer(rule, text, scale, threshold, background_rows=0):
    return Namer(rule, text, scale, threshold, background_rows=background_rows)


def test_group_scores_go_through_the_windows_top_classes_and_the_background_is_capped():
    e1, e2, e3 = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    scale = math.log(3)  # cosine 1 vs 0 -> odds 3:1 in a softmax
    groups, window = _axes(e1, e2), torch.tensor(e1)
    # probability rule, top-1: the window keeps class 0 only.
    # group 0: prior softmax [ln3, 0, 0] = [.6, .2, .2]; restricted softmax [1, 0, 0] -> scores [.6, 0, 0]
    # group 1: prior [.2, .6, .2]; restricted [1, 0, 0] -> scores [.2, 0, 0]
    # threshold 0.95 is capped at the window's best score .6: group 0 stays, group 1 is background
    out = group_logits(groups, window, _namer("probability", _axes(e1, e2, e3), scale, 0.95), topk=1)
    np.testing.assert_allclose(out.numpy(), [[0, 0.6, 0, 0], [1, 0.2, 0, 0]], atol=1e-6)
    # class rule, background word e3 first: group 0's prior [.2, .6, .2] over (bg, e1, e2); the window
    # keeps bg and its top-1 class e1; restricted softmax [1, 3] / 4 -> [.25, .75, 0]; times the prior
    out = group_logits(groups[:1], window, _namer("class", _axes(e3, e1, e2), scale, -math.inf, background_rows=1), topk=1)
    np.testing.assert_allclose(out.numpy(), [[0.05, 0.45, 0.0]], atol=1e-6)
    # the logit scale is clamped at 100, as CLIP's
    a = group_logits(groups, window, _namer("probability", _axes(e1, e2, e3), 100.0, 0.5), topk=2)
    b = group_logits(groups, window, _namer("probability", _axes(e1, e2, e3), 1000.0, 0.5), topk=2)
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="use eval.bg_rule probability or class"):
        group_logits(groups, window, _namer("cosine", _axes(e1, e2, e3), scale, 0.2))


def test_interpolated_position_tables_are_bicubic_resizes_of_the_trained_one():
    table = sincos_2d(8, (4, 4), num_prefix_tokens=1)[None]  # [1, 17, 8]
    assert resize_sincos_pos_embed(table, source_grid=(4, 4), new_grid=(4, 4), mode="interpolate") is table
    big = resize_sincos_pos_embed(table, source_grid=(4, 4), new_grid=(6, 8), mode="interpolate")
    assert big.shape == (1, 1 + 6 * 8, 8) and torch.equal(big[:, :1], table[:, :1])  # the cls row is kept
    const = torch.cat([table[:, :1], torch.full((1, 16, 8), 0.25)], dim=1)
    torch.testing.assert_close(resize_sincos_pos_embed(const, source_grid=(4, 4), new_grid=(6, 8), mode="interpolate")[:, 1:], torch.full((1, 48, 8), 0.25))
    # not the recomputed table: an interpolation stays inside the trained range of positions
    assert not torch.allclose(big, resize_sincos_pos_embed(table, source_grid=(4, 4), new_grid=(6, 8), mode="recompute"))


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=16).eval()


def test_groupvit_protocol_segments_any_window_and_never_thresholds_a_whole_window_away(micro):
    text = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    image = np.random.default_rng(0).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    seg = StudentSegmenter(micro, short_side=40, window=36, stride=16)  # 36 px: not a multiple of the 8-px patch
    pred = seg.predict(image, _namer("probability", text, 50.0, 1.0))  # a threshold above every score
    assert pred.labels.shape == (50, 75)
    assert (pred.labels > 0).any()  # GroupViT's cap keeps each window's best group
    with pytest.raises(ConfigError, match="use eval.bg_rule probability or class"):
        seg.predict(image, _namer("cosine", text, 50.0, 0.1))


def _tiny_vit_teacher():
    from pipeline.clip.model import Teacher
    from pipeline.config import TeacherConfig

    return Teacher.load(TeacherConfig(model="zeroseg-test-vit", pretrained="", device="cpu"))


def _values_only_reference(teacher, views):
    """MaskCLIP written out on its own: the last block's value projection of each token, its
    output projection, the final LayerNorm and the image projection (no attention, residual, FFN)."""
    visual = teacher.model.visual
    x = visual._embeds(views)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    c = x.shape[-1]
    v = torch.nn.functional.linear(last.ln_1(x), last.attn.in_proj_weight[2 * c :], last.attn.in_proj_bias[2 * c :])
    return visual.ln_post(last.attn.out_proj(v)[:, 1:]) @ visual.proj


def test_maskclip_on_a_clip_resnet_keeps_every_location_to_itself_in_the_attention_pool():
    """The ResNet path against the pool's own attention restricted to the diagonal: torch's
    multi-head attention with open_clip's weights, where every location may attend only to itself,
    gives each location value projection then output projection, which is MaskCLIP's embedding."""
    from pipeline.clip.dense import resnet_value_features
    from pipeline.clip.model import Teacher
    from pipeline.config import TeacherConfig
    from pipeline.evaluation.baselines import MaskCLIPSegmenter

    teacher = Teacher.load(TeacherConfig(model="zeroseg-demo-rn", pretrained="", device="cpu", precision="fp32"))
    visual = teacher.model.visual.eval()
    pool = visual.attnpool
    views = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the teacher's size: a 2x2 map, the table as trained
    with torch.no_grad():
        feats = resnet_value_features(visual, views)
        f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(views)))))  # [2, C, 2, 2]
        x = f.flatten(2).permute(2, 0, 1)  # [4, 2, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None]  # [5, 2, C]
        diagonal = torch.full((5, 5), -math.inf).fill_diagonal_(0.0)
        kw = {"embed_dim_to_check": x.shape[-1], "num_heads": pool.num_heads, "in_proj_weight": None,
              "in_proj_bias": torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), "bias_k": None, "bias_v": None, "add_zero_attn": False,
              "dropout_p": 0.0, "out_proj_weight": pool.c_proj.weight, "out_proj_bias": pool.c_proj.bias, "use_separate_proj_weight": True,
              "q_proj_weight": pool.q_proj.weight, "k_proj_weight": pool.k_proj.weight, "v_proj_weight": pool.v_proj.weight, "training": False, "need_weights": False}
        own, _ = torch.nn.functional.multi_head_attention_forward(x, x, x, attn_mask=diagonal, **kw)
        pooled, _ = torch.nn.functional.multi_head_attention_forward(x, x, x, **kw)
    torch.testing.assert_close(pooled[0], teacher.model.encode_image(views))  # the reference is open_clip's own pool
    assert feats.shape == (2, 2, 2, teacher.identity.embed_dim)
    torch.testing.assert_close(feats.reshape(2, 4, -1), own[1:].transpose(0, 1), rtol=1e-4, atol=1e-5)

    # Larger images: a larger map, the position table interpolated to it; whole images, any shape.
    text = torch.nn.functional.normalize(torch.randn(3, teacher.identity.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    seg = MaskCLIPSegmenter(teacher, short_side=128)
    assert seg.dense_features(torch.randn(1, 3, 128, 192)).shape == (1, 4, 6, teacher.identity.embed_dim)
    pred = seg.predict(np.random.default_rng(3).integers(0, 256, (50, 90, 3), dtype=np.uint8), _namer("cosine", text, 50.0, -2.0))
    assert pred.labels.shape == (50, 90) and set(np.unique(pred.labels)) <= {1, 2, 3}
    with pytest.raises(Exception, match="sclip rewrites a ViT's last attention block; zeroseg-demo-rn is a ResNet"):
        MaskCLIPSegmenter(teacher, method="sclip")


def test_dense_clip_baselines_change_only_the_last_block_as_their_papers_do():
    from pipeline.clip.dense import DENSE_CLIP, last_block_attention, neighbourhood_bias
    from pipeline.evaluation.baselines import MaskCLIPSegmenter

    teacher = _tiny_vit_teacher()
    views = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = {m: MaskCLIPSegmenter(teacher, short_side=40, method=m).dense_features(views) for m in DENSE_CLIP}
    for m, f in feats.items():
        assert f.shape == (2, 4, 4, teacher.identity.embed_dim), m  # 32 px / patch 8
    torch.testing.assert_close(feats["maskclip"].reshape(2, 16, -1), _values_only_reference(teacher, views), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats["sclip"], feats["maskclip"]) and not torch.allclose(feats["naclip"], feats["maskclip"])

    # the attentions, from their definitions
    q, k = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(3)), torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(4))  # [n, heads, L, d]
    csa = last_block_attention(q, k, "csa")
    torch.testing.assert_close(csa, (q @ q.transpose(-1, -2) * 8**-0.5).softmax(-1) + (k @ k.transpose(-1, -2) * 8**-0.5).softmax(-1))
    torch.testing.assert_close(csa.sum(dim=-1), torch.full((1, 2, 5), 2.0))  # two softmaxes: rows sum to 2
    ident = last_block_attention(q, k, "identity")
    assert torch.equal(ident[0, 0], torch.eye(5))
    bias = neighbourhood_bias((2, 2), std=5.0)  # cls + 4 patches
    assert bias.shape == (5, 5) and bias[0].abs().sum() == 0 and bias[:, 0].abs().sum() == 0
    assert bias[1, 1] == 1.0 and bias[1, 2] == pytest.approx(math.exp(-1 / 50)) and bias[1, 4] == pytest.approx(math.exp(-2 / 50))
    na = last_block_attention(q, k, "neighbourhood", (2, 2))
    torch.testing.assert_close(na, (k @ k.transpose(-1, -2) * 8**-0.5 + bias).softmax(dim=-1))
    with pytest.raises(Exception, match="unknown dense-CLIP method"):
        MaskCLIPSegmenter(teacher, method="clipsurgery")
