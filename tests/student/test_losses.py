"""Loss modules on hand-computed tiny examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.student import (
    AssignmentInfoMaxLoss,
    DistillationLoss,
    ReconstructionLoss,
    SegmentMatchingLoss,
    local_view_mask,
)


def test_local_view_mask_excludes_whole_image_views():
    assert local_view_mask([1, 2]).tolist() == [False, True, True, True, True]
    assert local_view_mask([1, 2, 3, 4]).sum() == 29


def test_distillation_hand_example_and_scale_invariance():
    z = torch.tensor([[2.0, 0.0]])  # normalizes to [1, 0]
    targets = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # [1, 0] and [0, 1]
    # L1 mean over D: view 0 -> 0, view 1 -> (1 + 1) / 2 = 1; mean over V -> 0.5
    out = DistillationLoss()(z, targets)
    assert set(out) == {"distill"}
    assert out["distill"].item() == pytest.approx(0.5)
    assert DistillationLoss()(5 * z, 7 * targets)["distill"].item() == pytest.approx(0.5)


def matching_example():
    """Two segments, one global view equal to segment 0, three local views (D = 2)."""
    segments = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # g0, g1
    views = torch.tensor([[
        [1.0, 0.0],  # v0: the 1x1 view, identical to g0: must not be chosen
        [0.8, 0.6],  # v1: L1 to g0 = (0.2 + 0.6) / 2 = 0.4, to g1 = (0.8 + 0.4) / 2 = 0.6
        [0.0, 1.0],  # v2: to g0 = 1.0, to g1 = 0.0
        [0.6, 0.8],  # v3: to g0 = 0.6, to g1 = 0.4
    ]])
    local = torch.tensor([False, True, True, True])
    return segments, views, local


def test_segment_matching_picks_nearest_local_view():
    segments, views, local = matching_example()
    out = SegmentMatchingLoss()(segments, views, local)
    assert set(out) == {"segment_match"}
    # g0 -> v1 (0.4; v0 at 0 is excluded), g1 -> v2 (0.0)
    assert out["segment_match"].item() == pytest.approx(0.2)
    # with the 1x1 view allowed g0 would sit on it at distance 0
    everything = SegmentMatchingLoss()(segments, views, torch.ones(4, dtype=torch.bool))
    assert everything["segment_match"].item() == pytest.approx(0.0)


def test_segment_matching_gradient_only_through_the_chosen_distance():
    segments, views, local = matching_example()
    SegmentMatchingLoss()(segments, views, local)["segment_match"].backward()
    reference = segments.detach().clone().requires_grad_(True)
    g = reference / reference.norm(dim=-1, keepdim=True)
    chosen = torch.stack([views[0, 1], views[0, 2]])[None]  # the fixed neighbours
    ((g - chosen / chosen.norm(dim=-1, keepdim=True)).abs().mean(-1)).mean().backward()
    torch.testing.assert_close(segments.grad, reference.grad)


def test_segment_matching_bidirectional_term():
    segments, views, local = matching_example()
    out = SegmentMatchingLoss(bidirectional=True)(segments, views, local)
    assert set(out) == {"segment_match", "view_match"}
    assert out["segment_match"].item() == pytest.approx(0.2)
    # v1 -> g0 (0.4), v2 -> g1 (0.0), v3 -> g1 (0.4): mean 0.8 / 3
    assert out["view_match"].item() == pytest.approx(0.8 / 3)


def test_reconstruction_scores_masked_patches_only():
    target = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0]]])  # [1, 3, 4]
    pred = torch.zeros(1, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patches 0 and 2 removed
    # plain MSE: patch 0 -> 1, patch 2 -> 9, patch 1 ignored: (1 + 9) / 2
    out = ReconstructionLoss(norm_pix=False)(pred, target, mask)
    assert out["reconstruction"].item() == pytest.approx(5.0)
    assert ReconstructionLoss(norm_pix=False)(pred, target, torch.zeros(1, 3))["reconstruction"].item() == 0.0


def test_reconstruction_norm_pix_targets():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [9.0, 0.0, 9.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1..4 is 5/3
    exact = torch.tensor([[[-1.5, -0.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]]]) / std
    loss = ReconstructionLoss(norm_pix=True)(exact, target, mask)["reconstruction"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # patch 1 is visible: its error is ignored
    zero = ReconstructionLoss(norm_pix=True)(torch.zeros(1, 2, 4), target, mask)["reconstruction"]
    # mean of squared normalized targets: (2.25 + 0.25 + 0.25 + 2.25) / 4 / (5/3) = 0.75
    assert zero.item() == pytest.approx(0.75, rel=1e-5)


def test_infomax_extremes():
    S, N = 4, 8
    loss = AssignmentInfoMaxLoss()
    uniform = torch.full((2, S, N), 1.0 / S)
    out = loss([uniform])
    assert out["usage_neg_entropy"].item() == pytest.approx(-1.0)
    assert out["token_entropy"].item() == pytest.approx(1.0)

    collapsed = torch.zeros(2, S, N)
    collapsed[:, 0] = 1.0  # every token to group 0
    out = loss([collapsed])
    assert out["usage_neg_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["token_entropy"].item() == pytest.approx(0.0, abs=1e-6)

    spread = torch.zeros(2, S, N)
    spread[:, torch.arange(N) % S, torch.arange(N)] = 1.0  # confident and evenly spread
    out = loss([spread, uniform[:, :, :S]])  # averaged over two stages
    assert out["usage_neg_entropy"].item() == pytest.approx(-1.0)
    assert out["token_entropy"].item() == pytest.approx(0.5)


def test_infomax_gradient_flows():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    out = AssignmentInfoMaxLoss()([logits.softmax(1)])
    (out["usage_neg_entropy"] + out["token_entropy"]).backward()
    assert logits.grad.abs().sum() > 0


def test_token_cells_put_each_patch_in_one_cell_per_local_grid():
    from pipeline.student.cells import cell_layout, token_cells

    ids = torch.arange(64)[None]  # every patch of an 8x8 grid, row-major
    cells = token_cells(ids, (8, 8), cell_layout((1, 2, 3, 4)))  # [1, 64, 30]
    assert cells[0, :, 0].sum() == 0  # the whole image is not a region
    for start, g in ((1, 2), (5, 3), (14, 4)):
        assert torch.equal(cells[0, :, start : start + g * g].sum(dim=1), torch.ones(64))  # exactly one cell
    assert cells[0, 0, 1] == 1 and cells[0, 63, 4] == 1  # corners of the 2x2 grid
    # patch centers 0.5..7.5 at thirds: rows 0-2 | 3-4 | 5-7
    assert cells[0, :, 5 : 14].sum(dim=0).view(3, 3).tolist() == [[9, 6, 9], [6, 4, 6], [9, 6, 9]]
    # a masked subset keeps the patch identity, not the token position
    assert torch.equal(token_cells(torch.tensor([[63, 0]]), (8, 8), cell_layout((2,)))[0], torch.tensor([[0.0, 0, 0, 1], [1, 0, 0, 0]]))


def test_region_matching_rewards_a_segment_lying_where_the_teacher_sees_its_content():
    from pipeline.student.cells import cell_layout, token_cells
    from pipeline.student.losses import RegionMatchingLoss

    ids = torch.arange(16)[None]  # a 4x4 patch grid, grids 1 and 2
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [1, 16, 5]
    targets = torch.cat([torch.ones(1, 1, 4), torch.eye(4)[None]], dim=1)  # 1x1, then quadrant q -> axis q
    quadrant = cells[0, :, 1:].argmax(dim=1)  # [16]
    right = torch.zeros(1, 4, 16)
    right[0, quadrant, torch.arange(16)] = 1.0  # segment q covers quadrant q
    segments = torch.eye(4)[None]  # segment q says "axis q"
    loss = RegionMatchingLoss()
    assert loss(segments, targets, right, cells)["region_match"].item() == pytest.approx(0.0, abs=1e-6)
    wrong = right[:, [1, 0, 3, 2]]  # same segments, lying in the neighbouring quadrant
    assert loss(segments, targets, wrong, cells)["region_match"].item() == pytest.approx(0.5)  # |e_a - e_b| mean over 4 dims
    logits = torch.zeros(1, 4, 16, requires_grad=True)  # the gradient reaches the assignment
    loss(segments, targets, logits.softmax(dim=1), cells)["region_match"].backward()
    assert logits.grad.abs().sum() > 0


def test_token_targets_sum_the_unit_views_of_the_tokens_cells_as_weighted():
    from pipeline.student.cells import cell_layout, token_cells
    from pipeline.student.tokens import token_targets

    ids = torch.tensor([[0, 3, 12, 15, 5]])  # four corner patches of a 4x4 grid, and one inside the top-left quadrant
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [1, 5, 5]: 1x1 gets no tokens
    targets = torch.cat([torch.ones(1, 1, 4), 3 * torch.eye(4)[None]], dim=1)  # 1x1, then quadrant q -> axis q (any length)
    target, has = token_targets(targets, cells)
    torch.testing.assert_close(target, torch.eye(4)[[0, 1, 2, 3, 0]][None])  # each token's quadrant axis, a unit vector
    assert has.tolist() == [[True] * 5]
    # several weighted views: the unit vectors' weighted sum, normalized (the product of their softmaxes)
    two = token_cells(ids, (4, 4), cell_layout((2, 4)))  # each token in one 2x2 and one 4x4 cell
    views = torch.randn(1, 20, 4)
    weights = two * torch.cat([torch.ones(4), torch.full((16,), 0.25)])
    expected = F.normalize(torch.bmm(weights, F.normalize(views, dim=-1)), dim=-1)
    torch.testing.assert_close(token_targets(views, weights)[0], expected)
    assert not token_targets(views, torch.zeros(1, 5, 20))[1].any()  # no view: no target


def test_the_crop_views_join_the_token_targets_by_their_weight():
    from pipeline.config import load_params
    from pipeline.student.objective import StudentObjective

    plain = StudentObjective(load_params(None, ["loss.grids=[1,2,4]", "loss.region_grids=[4]"]).loss, (1, 2, 4))
    crops = StudentObjective(load_params(None, ["loss.grids=[1,2,4]", "loss.region_grids=[4]", "loss.token_crop_weight=0.5"]).loss, (1, 2, 4))
    assert plain.token_views.tolist() == [0.0] * 5 + [1.0] * 16  # the region grid's cells alone
    assert crops.token_views.tolist() == [0.0] + [0.5] * 4 + [1.0] * 16  # and the crop grid's, at the weight over one crop grid


def test_the_token_terms_are_in_the_objective_only_when_weighted_and_reach_the_encoder():
    from pipeline.config import load_params
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.student.objective import StudentObjective

    torch.manual_seed(0)
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=8)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, 30, 8)
    off = StudentObjective(load_params(None, []).loss, (1, 2, 3, 4))
    assert not off.needs_tokens and off.needs_decoder
    assert model(images, 0.5, tokens=off.needs_tokens).tokens is None
    out = model(images, 0.5, tokens=True, generator=torch.Generator().manual_seed(0))
    plain, terms = off(out, targets, model.patchify(images))
    assert "token_anchors" not in terms
    on = StudentObjective(load_params(None, ["loss.token_anchors=3"]).loss, (1, 2, 3, 4))
    assert on.needs_tokens and on.needs_anchors
    assert out.tokens.shape == (2, out.ids_keep.shape[1], 8)
    with pytest.raises(RuntimeError, match="needs the teacher's text anchors"):
        on(out, targets, model.patchify(images))
    on.set_anchors(F.normalize(torch.randn(5, 8), dim=-1))
    total, terms = on(out, targets, model.patchify(images))
    assert terms["token_anchors"].item() > 0
    assert total.item() == pytest.approx((plain + 3 * terms["token_anchors"]).item(), rel=1e-5)
    assert "token_views" not in terms
    views = StudentObjective(load_params(None, ["loss.token_anchors=3", "loss.view_anchors=2", "loss.view_anchor_count=4"]).loss, (1, 2, 3, 4))
    views.set_anchors(on.anchors, sample=torch.randn(6, 30, 8))
    with_views, terms_v = views(out, targets, model.patchify(images))
    assert terms_v["token_views"].item() > 0
    assert with_views.item() == pytest.approx((total + 2 * terms_v["token_views"]).item(), rel=1e-5)
    total.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it reaches the encoder


def test_token_background_asks_for_flat_object_words_where_the_target_is_background():
    from pipeline.student.tokens import TokenAnchorLoss

    loss = TokenAnchorLoss(tau=0.05)
    anchors = torch.eye(4)  # background, then three object words
    words = (torch.tensor([0]), torch.tensor([1, 2, 3]))  # the background word's index, the object words'
    has = torch.ones(1, 2, dtype=torch.bool)
    target = F.normalize(torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.2, 1.0, 0.0, 0.0]]]), dim=-1)  # background; object word 1
    prior = torch.zeros(4)
    # a token equal to its target ranks every word as the target does: the plain KL is zero, and on
    # the background token its object words are already level, so the object-word KL is zero there too
    terms = loss(target[:, :1], target[:, :1], has[:, :1], anchors, prior, words)
    assert terms["token_anchors"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["token_background"].item() == pytest.approx(0.0, abs=1e-6)
    # one preferring an object word over the others on the background patch pays the new term alone
    tilted = F.normalize(torch.tensor([[[1.0, 0.3, 0.0, 0.0]]]), dim=-1)
    terms = loss(tilted, target[:, :1], has[:, :1], anchors, prior, words)
    assert terms["token_background"].item() > 0.1
    # the target's background mass is spread evenly: q_objects = q[objects] + q[background] / 3
    q = F.softmax(target[0, 1] @ anchors.T / 0.05, dim=-1)
    q_objects = q[1:] + q[0] / 3
    log_p = F.log_softmax(tilted[0, 0, 1:] / 0.05, dim=-1)
    expected = (q_objects * (q_objects.log() - log_p)).sum()
    terms = loss(tilted, target[:, 1:], has[:, :1], anchors, prior, words)
    assert terms["token_background"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "token_background" not in loss(tilted, target[:, 1:], has[:, :1], anchors, prior)


def test_token_background_needs_background_and_object_words():
    from pipeline.config import load_params
    from pipeline.core.errors import ConfigError
    from pipeline.student.objective import StudentObjective

    objective = StudentObjective(load_params(None, ["loss.token_anchors=1", "loss.token_background=1"]).loss, (1, 2))
    anchors = F.normalize(torch.randn(3, 8), dim=-1)
    with pytest.raises(ConfigError, match="token_background needs background words"):
        objective.set_anchors(anchors, background=torch.tensor([False, False, False]))
    objective.set_anchors(anchors, background=torch.tensor([True, False, False]))
    assert objective.background_words.tolist() == [0] and objective.object_words.tolist() == [1, 2]
