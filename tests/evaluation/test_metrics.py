"""Confusion matrix and segmentation scores on hand-built labels with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import (
    ConfusionMatrix,
    SegmentationScores,
    format_table,
)

# 3 classes; the pixel at (1, 1) is ignored (its prediction, 2, must not count).
TARGET = np.array([[0, 0, 1, 1], [2, 255, 1, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 2, 1, 0]], dtype=np.int64)
# Scored (true, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0) (1,1) (0,0).
EXPECTED = np.array([[2, 1, 0], [0, 3, 0], [1, 0, 0]])


def test_matrix_counts_and_skips_ignored_pixels():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, EXPECTED)
    assert cm.matrix.sum() == 7


def test_scores_by_hand():
    s = SegmentationScores.from_matrix(EXPECTED)
    # IoU = TP / (GT + PRED - TP): class 0: 2 / (3 + 3 - 2); class 1: 3 / (3 + 4 - 3); class 2: 0 / 1.
    np.testing.assert_allclose(s.iou, [0.5, 0.75, 0.0])
    assert s.miou == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert s.pixel_accuracy == pytest.approx(5 / 7)
    np.testing.assert_allclose(s.accuracy, [2 / 3, 1.0, 0.0])
    assert s.mean_accuracy == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s.gt_pixels == (3, 3, 1)


def test_absent_class_is_nan_and_left_out_predicted_only_class_scores_zero():
    # 4 classes: class 2 is only predicted, class 3 appears nowhere.
    target = np.array([0, 0, 1, 1, 1, 255])
    pred = np.array([0, 2, 1, 1, 1, 3])  # the 3 sits on an ignored pixel: it does not count
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    s = cm.scores()
    assert s.iou[0] == pytest.approx(0.5)  # TP 1, GT 2, predicted 1
    assert s.iou[1] == pytest.approx(1.0)
    assert s.iou[2] == 0.0  # a false positive only: counts as 0
    assert math.isnan(s.iou[3])
    assert s.miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert math.isnan(s.accuracy[2]) and math.isnan(s.accuracy[3])  # no ground truth
    assert s.mean_accuracy == pytest.approx((0.5 + 1.0) / 2)
    assert s.pixel_accuracy == pytest.approx(4 / 5)


def test_torch_tensors_batches_and_merge_agree_with_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(2, 30, 40)).astype(np.uint8)
    target[:, :3] = 255
    pred = rng.integers(0, 5, size=(2, 30, 40))

    whole = ConfusionMatrix(5)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    parts = ConfusionMatrix(5)
    parts.update(pred[0], target[0])
    other = ConfusionMatrix(5)
    other.update(pred[1], target[1])
    assert parts.merge(other) is parts
    np.testing.assert_array_equal(whole.matrix, parts.matrix)
    assert whole.matrix.sum() == 2 * 27 * 40

    # Reference: count every pair with a plain loop over the scored pixels.
    ref = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            ref[t, p] += 1
    np.testing.assert_array_equal(whole.matrix, ref)


def test_large_masks_accumulate_exactly():
    rng = np.random.default_rng(1)
    cm = ConfusionMatrix(21)
    target = rng.integers(0, 21, size=(500, 500)).astype(np.uint8)
    for _ in range(4):
        cm.update(target, target)
    assert cm.matrix.trace() == 4 * 500 * 500
    assert cm.scores().miou == 1.0 and cm.scores().pixel_accuracy == 1.0


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (np.array([0, 3]), np.array([0, 1]), "prediction holds label 3, outside \\[0, 3\\)"),
        (np.array([0, -1]), np.array([0, 255]), "prediction holds label -1"),
        (np.array([0, 1]), np.array([0, 7]), "target holds label 7"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer labels"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer labels"),
        (np.array([0, 1, 2]), np.array([0, 1]), "shape"),
    ],
)
def test_bad_labels_are_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(pred, target)


def test_merge_refuses_mismatched_matrices():
    with pytest.raises(ValueError, match="cannot merge a 4-class"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_as_dict_is_json_with_nulls():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 2, 1, 1, 1]), np.array([0, 0, 1, 1, 1]))
    d = cm.scores().as_dict(["background", "cat", "dog", "bird"])
    assert set(d) == {"miou", "pixel_accuracy", "mean_accuracy", "per_class_iou"}
    assert list(d["per_class_iou"]) == ["background", "cat", "dog", "bird"]
    assert d["per_class_iou"]["bird"] is None and d["per_class_iou"]["dog"] == 0.0
    assert d["miou"] == pytest.approx(0.5)
    json.dumps(d, allow_nan=False)  # no NaN leaks into the JSON
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        cm.scores().as_dict(["a", "b", "c"])


def test_empty_matrix_is_undefined_not_an_error():
    s = ConfusionMatrix(2).scores()
    assert math.isnan(s.miou) and math.isnan(s.pixel_accuracy)
    assert s.as_dict(["background", "x"])["miou"] is None


def test_format_table():
    s = SegmentationScores.from_matrix(np.pad(EXPECTED, ((0, 1), (0, 1))))  # 4th class absent
    table = format_table(s, ["background", "aeroplane", "dining table", "sofa"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "%", "acc", "%", "GT", "pixels"]
    body = [line for line in lines if not line.startswith("-")][1:]
    assert [line.split()[0] for line in body[:4]] == ["background", "aeroplane", "dining", "sofa"]
    assert body[0].split()[1:] == ["50.00", "66.67", "3"]
    assert body[1].split()[1:] == ["75.00", "100.00", "3"]
    assert body[2].split()[2:] == ["0.00", "0.00", "1"]
    assert body[3].split()[1:] == ["-", "-", "0"]
    assert body[4].split() == ["mean", f"{100 * 1.25 / 3:.2f}", f"{100 * 5 / 9:.2f}", "7"]
    assert body[5].split() == ["pixel", "accuracy", f"{100 * 5 / 7:.2f}"]
