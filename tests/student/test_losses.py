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


def test_infomax_batch_usage_lets_one_image_keep_one_large_group():
    S, N = 4, 8
    per_image = torch.zeros(S, S, N)
    for b in range(S):
        per_image[b, b] = 1.0  # image b puts every token in group b: collapsed per image
    image, batch = AssignmentInfoMaxLoss("image")([per_image]), AssignmentInfoMaxLoss("batch")([per_image])
    assert image["usage_neg_entropy"].item() == pytest.approx(0.0, abs=1e-6)  # each image uses one group
    assert batch["usage_neg_entropy"].item() == pytest.approx(-1.0)  # the batch uses all four evenly
    assert image["token_entropy"].item() == batch["token_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="image or batch"):
        AssignmentInfoMaxLoss("pixel")


def test_infomax_gradient_flows():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    out = AssignmentInfoMaxLoss()([logits.softmax(1)])
    (out["usage_neg_entropy"] + out["token_entropy"]).backward()
    assert logits.grad.abs().sum() > 0


def test_token_cells_put_each_patch_in_one_cell_per_local_grid():
    from pipeline.student.losses import cell_layout, token_cells

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
    from pipeline.student.losses import RegionMatchingLoss, cell_layout, token_cells

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


def test_token_distillation_asks_each_token_for_the_views_of_its_cells():
    from pipeline.student.losses import TokenDistillationLoss, cell_layout, token_cells

    ids = torch.tensor([[0, 3, 12, 15, 5]])  # four corner patches of a 4x4 grid, and one inside the top-left quadrant
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [1, 5, 5]: 1x1 gets no tokens
    targets = torch.cat([torch.ones(1, 1, 4), torch.eye(4)[None]], dim=1)  # 1x1, then quadrant q -> axis q
    loss = TokenDistillationLoss()
    right = torch.eye(4)[[0, 1, 2, 3, 0]][None]  # each token says its quadrant's axis
    assert loss(right, targets, cells)["token_distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss(2.5 * right, targets, cells)["token_distill"].item() == pytest.approx(0.0, abs=1e-6)  # unit vectors: scale is free
    wrong = torch.eye(4)[[1, 0, 3, 2, 1]][None]
    assert loss(wrong, targets, cells)["token_distill"].item() == pytest.approx(0.5)  # |e_a - e_b| mean over 4 dims
    # Under a target space both sides are compared as given: the mean of a token's cells, unnormalised.
    two = token_cells(ids, (4, 4), cell_layout((2, 4)))  # each token in one 2x2 and one 4x4 cell
    views = torch.randn(1, 20, 4)
    expected = torch.bmm(two, views) / 2  # [1, 5, 4]
    assert TokenDistillationLoss(normalize=False)(expected, views, two)["token_distill"].item() == pytest.approx(0.0, abs=1e-6)


def test_token_distillation_is_a_term_of_the_objective_only_when_weighted():
    from pipeline.config import load_params
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.student.objective import StudentObjective

    torch.manual_seed(0)
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=8)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, 30, 8)
    off, on = (load_params(None, [f"loss.token_distill={w}"]) for w in (0, 2))
    out = model(images, 0.5, tokens=False)
    assert out.tokens is None
    _, terms = StudentObjective(off, (1, 2, 3, 4))(out, targets, model.patchify(images), model.target_space)
    assert "token_distill" not in terms
    out = model(images, 0.5, tokens=True)
    assert out.tokens.shape == (2, out.ids_keep.shape[1], 8)
    total, terms = StudentObjective(on, (1, 2, 3, 4))(out, targets, model.patchify(images), model.target_space)
    total.backward()
    assert terms["token_distill"].item() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it reaches the encoder


def test_token_relation_is_met_by_the_cells_target_and_not_by_the_views_mean():
    from pipeline.student.losses import TokenRelationLoss, cell_layout, token_cells

    torch.manual_seed(0)
    ids = torch.arange(16)[None].repeat(2, 1)  # two images, every patch of a 4x4 grid, grids 1 and 2
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [2, 16, 5]
    shared = torch.randn(8)
    targets = shared + 0.3 * torch.randn(2, 5, 8)  # views with a large shared component, as the teacher's
    local = torch.arange(1, 5)
    loss = TokenRelationLoss(tau=0.1)
    own = torch.bmm(cells, F.normalize(targets, dim=-1))  # [2, 16, 8] each token's quadrant view
    assert loss(own, targets, cells, local)["token_relation"].item() == pytest.approx(0.0, abs=1e-5)
    mean = F.normalize(targets, dim=-1).mean(dim=(0, 1)).expand(2, 16, 8)  # the regression-to-the-mean answer
    assert loss(mean, targets, cells, local)["token_relation"].item() > 0.1
    tokens = own.clone().requires_grad_(True)
    loss(tokens + 0.1 * torch.randn_like(own), targets, cells, local)["token_relation"].backward()
    assert tokens.grad.abs().sum() > 0
