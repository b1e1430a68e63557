"""The anchor term: each visible token ranks the teacher's text anchors as its target does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import InputError
from pipeline.student.anchors import anchor_names
from pipeline.student.cells import cell_layout, token_cells
from pipeline.student.tokens import TokenAnchorLoss, token_targets


def test_anchor_vocabulary_is_imagenet_a_file_or_a_list_and_bad_input_is_one_line(tmp_path):
    names = anchor_names("imagenet")
    assert len(names) == 1000 and names[0] == "tench"
    words = tmp_path / "words.txt"
    words.write_text("circle\n\nstar\n  ring  \n")
    assert anchor_names(f"@{words}") == ["circle", "star", "ring"]
    assert anchor_names("cat, dog,grass") == ["cat", "dog", "grass"]
    for spec, problem in ((f"@{tmp_path / 'none.txt'}", "none.txt"), ("cat", "at least two"), ("cat, Cat", "the same to the text encoder")):
        with pytest.raises(InputError, match=problem) as err:
            anchor_names(spec)
        assert str(err.value).startswith("loss.anchor_vocabulary") and "\n" not in str(err.value)


def _kl(q: np.ndarray, logits: np.ndarray) -> np.ndarray:
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return (q * (np.log(np.clip(q, 1e-12, None)) - log_p)).sum(-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _setup():
    torch.manual_seed(0)
    ids = torch.arange(16)[None].repeat(2, 1)  # two images, every patch of a 4x4 grid, grids 1 and 2
    cells = token_cells(ids, (4, 4), cell_layout((1, 2)))  # [2, 16, 5]
    shared = 3 * F.normalize(torch.randn(8), dim=0)
    targets = shared + F.normalize(torch.randn(2, 5, 8), dim=-1)  # views with a large shared component, as the teacher's
    anchors = F.normalize(torch.randn(6, 8), dim=-1)
    return cells, targets, anchors


def test_token_anchors_ask_each_token_for_its_cells_ranking_of_the_words():
    cells, targets, anchors = _setup()
    tau = 0.05
    loss = TokenAnchorLoss(tau=tau)
    target, has = token_targets(targets, cells)  # each token's quadrant view, unit
    prior = torch.tensor([0.0, 0.1, -0.1, 0.0, 0.05, -0.05])
    tokens = torch.randn(2, 16, 8)
    value = loss(tokens, target, has, anchors, prior)["token_anchors"]
    unit = F.normalize(targets, dim=-1).numpy()
    views = _softmax((unit @ anchors.numpy().T - prior.numpy()) / tau)  # [2, 5, 6]
    q = np.einsum("bnv,bvk->bnk", cells.numpy(), views)  # one quadrant view per token
    logits = F.normalize(tokens, dim=-1).numpy() @ anchors.numpy().T / tau
    assert value.item() == pytest.approx(float(_kl(q, logits).mean()), rel=1e-5)
    # met by a token on the target, at any length; not by the views' shared direction
    own = 2.5 * target
    assert loss(own, target, has, anchors, torch.zeros(6))["token_anchors"].item() == pytest.approx(0.0, abs=1e-5)
    mean = F.normalize(targets, dim=-1).mean(dim=(0, 1)).expand(2, 16, 8)
    assert loss(mean, target, has, anchors, torch.zeros(6))["token_anchors"].item() > 0.01
    assert math.isfinite(value.item())


def test_the_balanced_prior_stops_a_favoured_word_from_winning_by_default_and_leaves_background_alone():
    from pipeline.student.anchors import anchor_prior

    torch.manual_seed(0)
    anchors = torch.eye(4, 8)  # background, circle, square, star
    background = torch.tensor([True, False, False, False])
    truth = torch.arange(1, 4).repeat(20)  # 60 object views, 20 of each shape
    circle = F.one_hot(torch.tensor(1), 8).float()
    views = 0.5 * F.one_hot(truth, 8).float() + 0.6 * circle + 0.02 * torch.randn(60, 8)  # the teacher leans to "circle" on every view
    views = torch.cat([views, torch.eye(1, 8).expand(30, 8) + 0.02 * torch.randn(30, 8)])  # 30 background views
    unit = F.normalize(views, dim=-1)
    assert ((unit[:60] @ anchors.T).argmax(1) == 1).all()  # as cached: every shape called circle

    prior = anchor_prior(views, anchors, background)
    cosines = unit @ anchors.T  # [90, 4]
    objects = cosines.argmax(1) > 0
    expected = cosines[objects][:, 1:].mean(0)
    assert prior[0] == 0 and torch.allclose(prior[1:], expected - expected.mean(), atol=1e-6)
    balanced = (cosines - prior).argmax(1)
    assert torch.equal(balanced[:60], truth)  # each shape is its own word again
    assert (balanced[60:] == 0).all()  # and background is still background
    assert torch.equal(anchor_prior(views[60:], anchors, background), torch.zeros(4))  # no object view: no prior


def test_view_anchors_are_the_views_clusters_and_bad_input_is_one_line():
    from pipeline.student.anchors import view_anchors

    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=-1)
    views = 3 * centres.repeat_interleave(50, dim=0) + 0.1 * torch.randn(200, 16)  # four clusters, any length
    found = view_anchors(views, 4, seed=1)
    assert found.shape == (4, 16) and torch.allclose(found.norm(dim=-1), torch.ones(4), atol=1e-5)
    match = found @ centres.T  # each centroid on its own cluster's centre
    assert sorted(match.argmax(dim=1).tolist()) == [0, 1, 2, 3] and (match.max(dim=1).values > 0.98).all()
    assert torch.equal(found, view_anchors(views, 4, seed=1))  # seeded: the same directions every run
    with pytest.raises(InputError, match="fewer than that"):
        view_anchors(views[:3], 4)


def test_view_anchors_rank_beside_the_words_and_need_a_cache_sample():
    from pipeline.config import load_params
    from pipeline.student.anchors import view_anchors
    from pipeline.student.objective import StudentObjective

    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs loss.token_anchors"):
        StudentObjective(load_params(None, ["loss.view_anchors=2"]).loss, (1, 2))
    sets = ["loss.token_anchors=1", "loss.view_anchors=2", "loss.view_anchor_count=3", "loss.view_anchor_tau=0.2", "loss.region_grids=[2]"]
    cfg = load_params(None, sets).loss
    objective = StudentObjective(cfg, (1, 2))
    assert objective.needs_sample
    anchors = F.normalize(torch.randn(3, 8), dim=-1)
    with pytest.raises(RuntimeError, match="need a cache sample"):
        objective.set_anchors(anchors)
    torch.manual_seed(0)
    sample = torch.randn(6, 5, 8)  # [n, V, D]: the global view, then the 2x2 grid's four cells
    objective.set_anchors(anchors, sample=sample, seed=0)
    # the directions are those of the views the term reads (the 2x2 cells), not of the global view
    assert torch.equal(objective.view_anchors, view_anchors(sample[:, 1:].flatten(0, 1), 3, seed=0))
    assert not torch.equal(objective.view_anchors, view_anchors(sample.flatten(0, 1), 3, seed=0))
    # the term is the words' KL over the wordless directions, at their own temperature
    target = F.normalize(torch.randn(2, 4, 8), dim=-1)
    has = torch.ones(2, 4, dtype=torch.bool)
    tokens = torch.randn(2, 4, 8)
    expected = TokenAnchorLoss(tau=0.2)(tokens, target, has, objective.view_anchors)["token_anchors"]  # at its own temperature
    assert objective.view_ranking(tokens, target, has, objective.view_anchors)["token_views"].item() == pytest.approx(expected.item())
    assert expected.item() != pytest.approx(TokenAnchorLoss(tau=cfg.anchor_tau)(tokens, target, has, objective.view_anchors)["token_anchors"].item())
    assert not StudentObjective(load_params(None, ["loss.token_anchors=1"]).loss, (1, 2)).needs_sample
