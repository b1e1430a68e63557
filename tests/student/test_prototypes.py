"""The teacher's prototypes (spherical k-means) and the token-prototype term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.student.losses import cell_layout, region_targets, token_cells
from pipeline.student.prototypes import (
    SegmentPrototypeLoss,
    TokenPrototypeLoss,
    residuals,
    spherical_kmeans,
    view_prototypes,
)


def _clusters(k: int, per: int, dim: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=gen), dim=-1)
    points = F.normalize(centers.repeat_interleave(per, 0) + noise * torch.randn(k * per, dim, generator=gen), dim=-1)
    return centers, points


def test_spherical_kmeans_finds_planted_directions_and_is_deterministic():
    centers, points = _clusters(k=5, per=40, dim=16, noise=0.1)
    found = spherical_kmeans(points, 5, seed=3)
    assert found.shape == (5, 16)
    assert torch.allclose(found.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert (found @ centers.T).max(dim=0).values.min() > 0.99  # every planted direction found
    assert torch.equal(found, spherical_kmeans(points, 5, seed=3))
    many = spherical_kmeans(points, 12, seed=0)  # more prototypes than clusters: none left empty
    assert (torch.bincount((points @ many.T).argmax(dim=1), minlength=12) > 0).all()
    with pytest.raises(ValueError, match="3 vectors for 4 prototypes"):
        spherical_kmeans(points[:3], 4)


def test_view_prototypes_tile_the_residual_not_the_shared_mean():
    """Views that share a large component: the prototypes are taken around the dataset mean."""
    centers, _ = _clusters(k=3, per=50, dim=8, noise=0.05)
    shared = torch.zeros(8)
    shared[0] = 4.0
    views = 3.0 * F.normalize(shared + centers.repeat_interleave(50, 0) * 0.5 + 0.05 * torch.randn(150, 8), dim=-1)  # scale is free
    mean = F.normalize(views, dim=-1).mean(dim=0)
    protos = view_prototypes(views, mean, 3, seed=0)
    member = (residuals(views, mean) @ protos.T).argmax(dim=1).reshape(3, 50)
    assert all(len(set(row.tolist())) == 1 for row in member)  # each planted cluster is one prototype
    assert len(set(member[:, 0].tolist())) == 3


def test_token_prototypes_ask_each_token_for_its_cells_pseudo_label():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 3, 12, 15]])  # the four corner patches of a 4x4 grid
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [1, 4, 5]: each token in one quadrant
    protos = torch.eye(4)  # prototype q = axis q
    mean = torch.zeros(4)
    targets = torch.cat([torch.ones(1, 1, 4), 5 * torch.eye(4)[None]], dim=1)  # 1x1, then quadrant q -> axis q
    loss = TokenPrototypeLoss(tau=0.05)
    sharp = 100 * torch.eye(4)[None]  # each token's logits peak at its quadrant's prototype
    assert loss(sharp, targets, cells, protos, mean)["token_prototypes"].item() == pytest.approx(0.0, abs=1e-4)
    wrong = 100 * torch.eye(4)[[1, 0, 3, 2]][None]
    assert loss(wrong, targets, cells, protos, mean)["token_prototypes"].item() > 10
    flat = torch.zeros(1, 4, 4, requires_grad=True)
    value = loss(flat, targets, cells, protos, mean)["token_prototypes"]
    # the pseudo-label is softmax(cos / tau): 1 / (1 + 3 exp(-20)) on its own prototype
    assert value.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-6)
    value.backward()
    assert flat.grad.abs().sum() > 0
    # A token in no used cell costs nothing: only the 1x1 view used
    none = token_cells(ids, (4, 4), cell_layout((1, 2))) * torch.tensor([1.0, 0, 0, 0, 0])
    assert loss(wrong, targets, none, protos, mean)["token_prototypes"].item() == 0.0


def test_prototype_terms_are_in_the_objective_only_when_weighted():
    from pipeline.config import load_params
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.student.objective import StudentObjective

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, 30, 8)
    off = load_params(None, [])
    plain = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=8)
    out = plain(images, 0.5)
    assert plain.prototype_head is None and out.prototype_logits is None
    _, terms = StudentObjective(off, (1, 2, 3, 4))(out, targets, plain.patchify(images), plain.target_space)
    assert "token_prototypes" not in terms

    on = load_params(None, ["loss.token_prototypes=2", "loss.segment_prototypes=1", "loss.prototypes=6"])
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro", prototypes=6), out_dim=8)
    out = model(images, 0.5)
    assert out.prototype_logits.shape == (2, out.ids_keep.shape[1], 6)
    objective = StudentObjective(on, (1, 2, 3, 4))
    with pytest.raises(RuntimeError, match="needs the teacher's prototypes"):
        objective(out, targets, model.patchify(images), model.target_space)
    mean = F.normalize(targets, dim=-1).mean(dim=(0, 1))
    objective.set_prototypes(view_prototypes(targets[:, 1:].flatten(0, 1), mean, 6), mean)
    total, terms = objective(out, targets, model.patchify(images), model.target_space)
    total.backward()
    assert terms["token_prototypes"].item() > 0 and terms["segment_prototypes"].item() > 0
    assert model.prototype_head.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it reaches the encoder


def test_segment_prototypes_are_met_by_the_region_target_and_not_by_the_views_mean():
    torch.manual_seed(0)
    ids = torch.arange(16)[None].repeat(2, 1)  # two images, every patch of a 4x4 grid, grids 1 and 2
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [2, 16, 5]
    shared = 3 * F.normalize(torch.randn(8), dim=0)
    targets = shared + F.normalize(torch.randn(2, 5, 8), dim=-1)  # views with a large shared component, as the teacher's
    mean = F.normalize(targets, dim=-1).mean(dim=(0, 1))
    protos = view_prototypes(targets[:, 1:].flatten(0, 1), mean, 4)
    quadrant = (torch.arange(16) // 2 % 2 + torch.arange(16) // 8 * 2)  # each patch's quadrant, row-major
    assignment = F.one_hot(quadrant, 4).T[None].float().repeat(2, 1, 1)  # [2, 4, 16]: segment q = quadrant q
    loss = SegmentPrototypeLoss(tau=0.05)
    own, share = region_targets(F.normalize(targets, dim=-1), assignment, cells)  # [2, 4, 8]
    assert torch.allclose(share, torch.full((2, 4), 0.25))
    assert loss(3.0 * own, targets, assignment, cells, protos, mean)["segment_prototypes"].item() == pytest.approx(0.0, abs=1e-5)
    average = mean.expand(2, 4, 8) + 1e-3 * torch.randn(2, 4, 8)  # the regression-to-the-mean answer
    assert loss(average, targets, assignment, cells, protos, mean)["segment_prototypes"].item() > 0.5
    segments = own.clone().requires_grad_(True)
    logits = torch.zeros(2, 4, 16, requires_grad=True)
    loss(segments + 0.1 * torch.randn_like(own), targets, logits.softmax(dim=1), cells, protos, mean)["segment_prototypes"].backward()
    assert segments.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0  # both the embedding and the assignment learn
