"""The embedded default: deterministic scenes and the shipped demo teacher."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig
from pipeline.config import load_params
from pipeline.demo.data import CLASSES, SPLITS, split_scenes, write_demo_dataset, write_demo_split
from pipeline.demo.teacher import (
    class_positive_loss,
    dominant_label,
    sample_crops,
    verify,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "assets" / "demo-teacher"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_scenes_are_deterministic_from_the_seed(tmp_path):
    write_demo_dataset(tmp_path / "a", n_train=5, n_eval=2, size=64, seed=3)
    write_demo_dataset(tmp_path / "b", n_train=5, n_eval=2, size=64, seed=3)
    write_demo_dataset(tmp_path / "c", n_train=5, n_eval=2, size=64, seed=4)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")


def test_no_held_out_scene_is_a_training_or_validation_scene():
    """The demo's own sizes and seeds (params.yaml): every held-out scene differs, pixel for pixel,
    from every training and validation scene, and its stream is no other split's nor the demo
    teacher's (seed 0, `zeroseg demo-teacher`'s default)."""
    d = load_params(REPO / "params.yaml").data
    assert d.demo_test >= 256 and d.demo_val >= 128
    seeds = {split: d.demo_seed + offset for split, offset in SPLITS.items()}
    assert len(set(seeds.values())) == 3 and seeds["test"] != 0 and seeds["val"] != 0

    def digests(split: str, n: int) -> set[str]:
        return {hashlib.sha256(np.asarray(img).tobytes()).hexdigest() for img, _, _ in split_scenes(split, n, size=d.demo_size, seed=d.demo_seed)}

    test = digests("test", d.demo_test)
    assert len(test) == d.demo_test  # no scene twice within the split either
    assert not test & digests("train", d.demo_train)
    assert not test & digests("val", d.demo_val)


def test_each_split_is_written_from_its_own_stream(tmp_path):
    write_demo_split(tmp_path / "val", "val", 3, size=48, seed=0)
    write_demo_split(tmp_path / "test", "test", 3, size=48, seed=0)
    for split in ("val", "test"):
        ev = tmp_path / split / "eval"
        assert (ev / "ImageSets/Segmentation/val.txt").read_text().split() == ["eval_000000", "eval_000001", "eval_000002"]
        assert (tmp_path / split / "classes.txt").read_text().split() == list(CLASSES)
    assert (tmp_path / "val/eval/JPEGImages/eval_000000.jpg").read_bytes() != (tmp_path / "test/eval/JPEGImages/eval_000000.jpg").read_bytes()
    write_demo_split(tmp_path / "val", "val", 2, size=48, seed=0)  # a smaller split leaves no scene of the larger one behind
    assert sorted(p.name for p in (tmp_path / "val/eval/JPEGImages").iterdir()) == ["eval_000000.jpg", "eval_000001.jpg"]
    with pytest.raises(ValueError, match="unknown demo split"):
        write_demo_split(tmp_path / "x", "holdout", 1)


def test_crops_are_labelled_by_the_shape_that_dominates():
    mask = np.zeros((10, 10), np.uint8)
    assert dominant_label(mask) == 0
    mask[:5] = 4  # half star
    assert dominant_label(mask) == 4
    mask[5:9] = 2  # 40% square: ambiguous against 50% star (less than 1.5x)
    assert dominant_label(mask) is None
    crops = sample_crops(np.random.default_rng(0), 200)
    labels = np.array([c.label for c in crops])
    assert len(crops) == 200 and (labels == 0).sum() == 30 and set(labels) == set(range(len(CLASSES)))


def test_same_class_pairs_are_positives():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([1, 1, 2, 3])
    perfect = class_positive_loss(e, e, labels, torch.tensor(100.0))
    shuffled = class_positive_loss(e, e[[2, 3, 0, 1]], labels, torch.tensor(100.0))
    assert perfect < shuffled
    # two identical captions: the best possible loss splits each row between both positives
    same = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [-1.0, 0]]), dim=-1)
    assert class_positive_loss(same, same, labels, torch.tensor(100.0)) == pytest.approx(float(np.log(2) / 2), abs=1e-3)


def test_shipped_teacher_loads_offline_and_matches_its_sha256():
    sha = verify(SHIPPED)
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert metrics["weights_sha256"] == sha and (SHIPPED / "open_clip_model.safetensors").stat().st_size < 20 * 2**20
    teacher = Teacher.load(TeacherConfig(model="zeroseg-demo-rn", pretrained=str(SHIPPED), precision="fp32", device="cpu"))
    assert teacher.identity.embed_dim == 128 and teacher.spec.size == 64
    feats = teacher.encode(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()


def test_writing_fewer_scenes_removes_the_earlier_extra_ones(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.jpg").write_bytes(b"kept: not a scene of ours")
    write_demo_dataset(tmp_path, n_train=5, n_eval=3, size=32, seed=0)
    write_demo_dataset(tmp_path, n_train=2, n_eval=1, size=32, seed=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["mine.jpg", "scene_000000.jpg", "scene_000001.jpg"]
    assert sorted(p.name for p in (tmp_path / "eval" / "JPEGImages").iterdir()) == ["eval_000000.jpg"]
    assert sorted(p.name for p in (tmp_path / "eval" / "SegmentationClass").iterdir()) == ["eval_000000.png"]
