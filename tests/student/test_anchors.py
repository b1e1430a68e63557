"""The anchor terms: each segment and each visible token ranks the teacher's text anchors as its target does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import InputError
from pipeline.student.anchors import anchor_logits, anchor_names
from pipeline.student.losses import cell_layout, region_targets, token_cells


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
    quadrant = torch.arange(16) // 2 % 2 + torch.arange(16) // 8 * 2  # each patch's quadrant, row-major
    assignment = F.one_hot(quadrant, 4).T[None].float().repeat(2, 1, 1)  # [2, 4, 16]: segment q = quadrant q
    return cells, targets, anchors, assignment


def test_segment_anchors_are_the_kl_of_the_words_softmaxes_written_out():
    from pipeline.config import load_params
    from pipeline.student.objective import StudentObjective

    cells, targets, anchors, assignment = _setup()
    tau = 0.1
    objective = StudentObjective(load_params(None, [f"loss.anchor_tau={tau}"]), (1, 2))
    own, share = region_targets(F.normalize(targets, dim=-1), assignment, cells)  # [2, 4, 8] unit, [2, 4]
    segments = torch.randn(2, 4, 8)
    value = objective.segment_anchors(segments, targets, assignment, cells, anchors, torch.zeros(8))["segment_anchors"]
    q = _softmax(own.numpy() @ anchors.numpy().T / tau)
    logits = F.normalize(segments, dim=-1).numpy() @ anchors.numpy().T / tau
    expected = (share.numpy() * _kl(q, logits)).sum(1).mean()
    assert value.item() == pytest.approx(float(expected), rel=1e-5)
    # Met by the region target, at any length; not by the views' shared direction.
    assert objective.segment_anchors(2.5 * own, targets, assignment, cells, anchors, torch.zeros(8))["segment_anchors"].item() == pytest.approx(0.0, abs=1e-5)
    mean = F.normalize(targets, dim=-1).mean(dim=(0, 1)).expand(2, 4, 8)
    assert objective.segment_anchors(mean, targets, assignment, cells, anchors, torch.zeros(8))["segment_anchors"].item() > 0.01


def test_token_anchors_ask_each_token_for_its_cells_ranking_of_the_words():
    from pipeline.config import load_params
    from pipeline.student.objective import StudentObjective

    cells, targets, anchors, _ = _setup()
    tau = 0.05
    objective = StudentObjective(load_params(None, [f"loss.anchor_tau={tau}"]), (1, 2))
    tokens = torch.randn(2, 16, 8)
    logits = anchor_logits(tokens, anchors, tau)
    assert torch.allclose(logits, F.normalize(tokens, dim=-1) @ anchors.T / tau)
    value = objective.token_anchors(logits, targets, cells, anchors, torch.zeros(8))["token_anchors"]
    unit = F.normalize(targets, dim=-1).numpy()
    views = _softmax(unit @ anchors.numpy().T / tau)  # [2, 5, 6]
    w = cells.numpy()
    q = np.einsum("bnv,bvk->bnk", w, views) / w.sum(2, keepdims=True)  # one quadrant view per token
    assert value.item() == pytest.approx(float(_kl(q, logits.numpy()).mean()), rel=1e-5)
    own = torch.bmm(cells, F.normalize(targets, dim=-1))  # each token's own quadrant view
    met = objective.token_anchors(anchor_logits(own, anchors, tau), targets, cells, anchors, torch.zeros(8))["token_anchors"]
    assert met.item() == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(value.item()) and value.item() > met.item()


def test_anchor_terms_are_in_the_objective_only_when_weighted_and_reach_the_encoder():
    from pipeline.config import load_params
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.student.objective import StudentObjective

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, 30, 8)
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=8)
    out = model(images, 0.5, tokens=True)
    plain, terms = StudentObjective(load_params(None, []), (1, 2, 3, 4))(out, targets, model.patchify(images), model.target_space)
    assert not {"segment_anchors", "token_anchors"} & set(terms)

    objective = StudentObjective(load_params(None, ["loss.segment_anchors=1", "loss.token_anchors=2"]), (1, 2, 3, 4))
    with pytest.raises(RuntimeError, match="needs the teacher's text anchors"):
        objective(out, targets, model.patchify(images), model.target_space)
    objective.set_anchors(F.normalize(torch.randn(5, 8), dim=-1))
    total, terms = objective(out, targets, model.patchify(images), model.target_space)
    assert terms["segment_anchors"].item() > 0 and terms["token_anchors"].item() > 0
    assert total.item() == pytest.approx((plain + terms["segment_anchors"] + 2 * terms["token_anchors"]).item(), rel=1e-5)
    total.backward()
    assert model.segment_proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it reaches the encoder


def test_the_balanced_prior_stops_a_favoured_word_from_winning_by_default_and_leaves_background_alone():
    from pipeline.student.anchors import anchor_prior
    from pipeline.student.prototypes import pseudo_labels

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
    labels = pseudo_labels(views, anchors, torch.zeros(8), 0.05, prior)
    assert torch.allclose(labels, F.softmax((cosines - prior) / 0.05, dim=-1), atol=1e-6)
    assert torch.equal(anchor_prior(views[60:], anchors, background), torch.zeros(4))  # no object view: no prior
