"""The target space, the contrastive term, the health figures and evaluation-time calibration:
hand-built cases with values from first principles, and the tiny student trained on the 8-row cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import params_for

from pipeline.cache.reader import load_targets
from pipeline.core.checkpoint import load_checkpoint
from pipeline.evaluation.inference import class_scores
from pipeline.student import TargetSpace, ZeroSegStudent, student_arch, unit_statistics
from pipeline.student.health import effective_rank, health_metrics, resultant
from pipeline.student.losses import (
    ContrastiveRegionLoss,
    DistillationLoss,
    RegionMatchingLoss,
    region_targets,
)
from pipeline.training.data import teacher_sample, teacher_statistics
from pipeline.training.run import run_training


def test_the_space_maps_there_and_back_exactly_and_none_is_unit_vectors():
    torch.manual_seed(0)
    t = torch.randn(5, 8) + 3.0  # a common component, as CLIP's views have
    mean, std = unit_statistics(t)
    for mode in ("center", "standardize"):
        space = TargetSpace(8)
        space.set_statistics(mode, mean, std)
        assert space.affine
        u = space.targets(t)  # [5, 8]
        torch.testing.assert_close(space.to_teacher(u), F.normalize(t, dim=-1))
        assert torch.equal(space.predictions(u), u)  # compared as they are
    standard = TargetSpace(8)
    standard.set_statistics("standardize", mean, std)
    u = standard.targets(t)
    torch.testing.assert_close(u.std(dim=0, unbiased=False), torch.full((8,), 8**-0.5))  # the same variance in every dimension
    assert u.pow(2).sum(dim=1).mean().item() == pytest.approx(1.0)  # unit mean squared norm, as unit vectors: weights keep their meaning
    center = TargetSpace(8)
    center.set_statistics("center", mean, std)
    assert center.scale.unique().numel() == 1 and center.scale[0].item() == pytest.approx(float(std.pow(2).mean().sqrt()) * 8**0.5)
    assert center.targets(t).pow(2).sum(dim=1).mean().item() == pytest.approx(1.0)
    none = TargetSpace(8)
    none.set_statistics("none", mean, std)
    assert not none.affine and torch.equal(none.to_teacher(t), t)
    torch.testing.assert_close(none.predictions(2 * t), F.normalize(t, dim=-1))


def test_unit_statistics_skip_failed_rows():
    views = torch.tensor([[3.0, 4.0], [float("nan"), 1.0], [0.0, 2.0]])
    mean, std = unit_statistics(views)  # unit rows [0.6, 0.8] and [0, 1]
    torch.testing.assert_close(mean, torch.tensor([0.3, 0.9]))
    torch.testing.assert_close(std, torch.tensor([0.3, 0.1]))


def test_teacher_statistics_come_from_the_cache(built_cache):
    store, _ = built_cache
    sample = teacher_sample(str(store), (1, 2, 3, 4), max_rows=4096)
    views = torch.from_numpy(load_targets(str(store), (1, 2, 3, 4)).astype(np.float32))  # [8, 30, 32]
    assert torch.equal(sample, views)
    mean, _ = teacher_statistics(sample)
    torch.testing.assert_close(mean, F.normalize(views.flatten(0, 1), dim=-1).mean(dim=0))
    assert len(teacher_sample(str(store), (1, 2, 3, 4), max_rows=3)) == 4  # whole chunks of 2 rows: 2 chunks


def test_affine_losses_compare_the_given_vectors_and_region_targets_are_weighted_means():
    z = torch.tensor([[1.0, -2.0]])
    t = torch.tensor([[[1.0, 0.0], [3.0, -2.0]]])
    # L1 mean over D: view 0 -> (0 + 2) / 2 = 1, view 1 -> (2 + 0) / 2 = 1
    assert DistillationLoss(normalize=False)(z, t)["distill"].item() == pytest.approx(1.0)
    # One segment holding both tokens; token 0 in view 0's box, token 1 in view 1's.
    assignment = torch.tensor([[[1.0, 1.0]]])  # [B=1, S=1, N=2]
    cells = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B, N, V]
    target, share = region_targets(t, assignment, cells, normalize=False)
    torch.testing.assert_close(target, torch.tensor([[[2.0, -1.0]]]))  # the plain mean of the two views
    assert share.item() == 1.0
    loss = RegionMatchingLoss(normalize=False)(torch.tensor([[[2.0, 0.0]]]), t, assignment, cells)["region_match"]
    assert loss.item() == pytest.approx(0.5)  # (0 + 1) / 2


def test_contrastive_is_the_cross_entropy_of_the_own_target_among_other_images():
    tau = 0.5
    # Two images, two segments each; image 0's segment 1 is empty. Targets: views one-hot per cell.
    views = torch.eye(3)[None].expand(2, 3, 3).clone()  # [B=2, V=3, D=3]
    cells = torch.zeros(2, 2, 3)
    cells[:, 0, 1], cells[:, 1, 2] = 1.0, 1.0  # token 0 in view 1's box, token 1 in view 2's
    assignment = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # [B, S, N]
    segments = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    got = ContrastiveRegionLoss(tau=tau)(segments, views, assignment, cells)["contrastive"].item()
    # Unit targets: image 0 seg 0 -> (0, .71, .71), seg 1 -> 0 (empty); image 1 seg 0 -> e1, seg 1 -> e2.
    r = 1 / math.sqrt(2)

    def nll(own: float, others: list[float]) -> float:
        return -own / tau + math.log(sum(math.exp(c / tau) for c in [own, *others]))

    # Rows see their own target and the other image's targets only.
    img0 = nll(1.0, [r, r])  # seg (0,.71,.71) vs e1, e2: cosine r each
    img1_seg0 = nll(1.0, [r, 0.0])  # e1 vs image 0's targets: r and the empty 0
    img1_seg1 = nll(1.0, [r, 0.0])
    expected = (1.0 * img0 + 0.5 * img1_seg0 + 0.5 * img1_seg1) / 2  # weighted by share, mean over images
    assert got == pytest.approx(expected, rel=1e-5)


class _Out:
    def __init__(self, segments, assignment):
        self.segments = segments
        self.hard_assignments = self.soft_assignments = [assignment]


def test_health_tells_a_collapsed_naming_from_a_healthy_one():
    torch.manual_seed(0)
    B, S, N, D = 8, 2, 4, 16
    views = F.normalize(torch.randn(B, 5, D) + 2.0, dim=-1)  # [B, V, D]; view 0 is the 1x1
    local = torch.arange(1, 5)
    assignment = torch.zeros(B, S, N)
    assignment[:, 0, :2], assignment[:, 1, 2:] = 1.0, 1.0  # two segments of two tokens each
    space = TargetSpace(D)
    healthy = health_metrics(_Out(views[:, 1:3].clone(), assignment), views, space, local)  # segments say their own views
    collapsed = health_metrics(_Out(views.mean(dim=(0, 1)).expand(B, S, D).clone(), assignment), views, space, local)
    assert healthy["segments_per_image"] == collapsed["segments_per_image"] == 2.0
    assert healthy["segment_retrieval"] == 1.0 and collapsed["segment_retrieval"] <= 2 / B
    assert collapsed["segment_resultant"] == pytest.approx(1.0) and healthy["segment_resultant"] < collapsed["segment_resultant"]
    assert collapsed["segment_rank"] < 1.5 < healthy["segment_rank"]
    assert collapsed["segment_image_gap"] == pytest.approx(0.0, abs=1e-6) and healthy["teacher_resultant"] == pytest.approx(resultant(views[:, 1:].flatten(0, 1)))
    assert healthy["assignment_entropy"] == pytest.approx(0.0)
    assert effective_rank(torch.eye(4)) == pytest.approx(3.0, rel=1e-4)  # centered: 3 equal singular values


def test_calibration_subtracts_the_shared_component_before_the_cosine():
    text = torch.eye(2)  # classes "a" = e0, "b" = e1
    center = torch.tensor([0.6, 0.0])  # every image leans towards "a"
    emb = torch.tensor([[0.8, 0.5]])
    assert class_scores(emb, text, 100.0, "cosine").argmax().item() == 0
    got = class_scores(emb, text, 100.0, "cosine", center)
    u = F.normalize(F.normalize(emb, dim=-1) - center, dim=-1)
    torch.testing.assert_close(got, u @ text.T)
    assert got.argmax().item() == 1


def test_a_standardised_student_trains_logs_its_health_and_segments_in_the_teachers_space(built_cache, tmp_path):
    store, _ = built_cache
    params = params_for(built_cache, "train.epochs=20", "train.log_every=5", "loss.target_norm=standardize", "loss.region_match=1.0",
                        "loss.contrastive=0.5", "loss.bidirectional_matching=true")
    summary = run_training(params, str(store), tmp_path / "run", live_dir=tmp_path / "live", progress=False)
    assert summary.losses["region_match"] < summary.first_losses["region_match"] and "contrastive" in summary.losses
    assert 1.0 <= summary.health["segments_per_image"] <= 8 and 0.0 <= summary.health["segment_retrieval"] <= 1.0
    rows = (tmp_path / "live" / "plots" / "metrics" / "health" / "segment_retrieval.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == [5, 10, 15, 20]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    mean, std = teacher_statistics(teacher_sample(str(store), (1, 2, 3, 4), 4096))
    assert ckpt["teacher_stats"]["mean"] == mean.tolist() and ckpt["teacher_stats"]["rows"] == 8
    torch.testing.assert_close(ckpt["model"]["target_space.mean"], mean)
    # Inference maps the raw outputs back into the teacher's space.
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=32)
    model.load_state_dict(ckpt["model"])
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    latent = model.forward_encoder(images, 0.0).latent
    _, raw, _, _ = model.forward_segments(latent[:, 1:])
    torch.testing.assert_close(model.infer(images).segments, raw * ckpt["model"]["target_space.scale"] + mean)


def test_a_checkpoint_from_before_the_target_space_loads_as_the_identity():
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=32)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("target_space.")}
    fresh = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=32)
    fresh.target_space.mean.fill_(1.0)
    fresh.load_state_dict(old)
    assert not fresh.target_space.affine


def test_health_of_a_whole_image_only_student_uses_every_view():
    # loss.grids [1] (the Base ablation) has no local view: the figures use the 1x1 views.
    B, S, N, D = 4, 2, 4, 8
    views = F.normalize(torch.randn(B, 1, D), dim=-1)
    assignment = torch.zeros(B, S, N)
    assignment[:, 0] = 1.0
    figures = health_metrics(_Out(views.expand(B, S, D).clone(), assignment), views, TargetSpace(D), torch.zeros(0, dtype=torch.long))
    assert figures["segments_per_image"] == 1.0 and figures["segment_retrieval"] == 1.0
