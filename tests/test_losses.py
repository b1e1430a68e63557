"""Loss modules on hand-computed tiny examples."""

from __future__ import annotations

import math

import pytest
import torch

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
