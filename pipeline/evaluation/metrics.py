"""Semantic segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The protocol is the one mmsegmentation (and so GroupViT and the ZeroSeg paper) reports: one
confusion matrix summed over the whole split, pixels whose ground truth is the ignore label
(255) skipped, IoU = TP / (TP + FP + FN) per class, and mIoU the mean over classes that occur
in the ground truth or in the prediction. A class absent from both has no IoU (NaN) and is left
out of the mean; a class that is only predicted scores 0 and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _as_int_array(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """A flat int64 numpy view of an integer label array or tensor (any shape, any device)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{what} must hold integer labels, got a {x.dtype} tensor")
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise ValueError(f"{what} must hold integer labels, got dtype {x.dtype}")
    return x.reshape(-1).astype(np.int64, copy=False)


class ConfusionMatrix:
    """Pixel counts `matrix[true, predicted]`, accumulated over many images.

    Args:
        num_classes: C, the number of classes (background included when the benchmark has one).
        ignore_index: ground-truth label of pixels that are not scored (VOC's object boundaries).

    Attributes:
        matrix: [C, C] int64; rows are ground-truth classes, columns predicted classes.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one image (or a batch) of pixels.

        Args:
            pred: predicted class per pixel, any shape (e.g. [H, W] or [B, H, W]), values in [0, C).
            target: ground-truth class per pixel, the same shape; values in [0, C) or ignore_index.

        Raises:
            ValueError: shapes differ, labels are not integers, a prediction lies outside [0, C),
                or a ground-truth label is neither a class nor the ignore label.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        p = _as_int_array(pred, "prediction")  # [P]
        t = _as_int_array(target, "target")  # [P]
        c = self.num_classes
        # Every prediction must be a class, even where the truth is ignored: anything else is a bug.
        if p.size and (p.min() < 0 or p.max() >= c):
            bad = p[(p < 0) | (p >= c)][0]
            raise ValueError(f"prediction holds label {bad}, outside [0, {c})")
        scored = t != self.ignore_index
        p, t = p[scored], t[scored]
        if t.size and (t.min() < 0 or t.max() >= c):
            bad = t[(t < 0) | (t >= c)][0]
            raise ValueError(f"target holds label {bad}, neither a class in [0, {c}) nor ignore_index {self.ignore_index}")
        # One bincount over the flattened (true, pred) pair index: a single pass over the pixels.
        self.matrix += np.bincount(t * c + p, minlength=c * c).reshape(c, c)  # [C, C]

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (from another worker or shard) into this one; returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def scores(self) -> SegmentationScores:
        return SegmentationScores.from_matrix(self.matrix)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix; fractions in [0, 1], NaN where undefined.

    Attributes:
        iou: per-class IoU, length C; NaN for a class absent from both prediction and truth.
        accuracy: per-class accuracy (recall, TP / ground-truth pixels); NaN for a class with no
            ground-truth pixels.
        gt_pixels: per-class count of scored ground-truth pixels.
        miou: mean of the defined per-class IoUs.
        pixel_accuracy: correct pixels / scored pixels.
        mean_accuracy: mean of the defined per-class accuracies.
    """

    iou: tuple[float, ...]
    accuracy: tuple[float, ...]
    gt_pixels: tuple[int, ...]
    miou: float
    pixel_accuracy: float
    mean_accuracy: float

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> SegmentationScores:
        """Args: matrix: [C, C] counts, rows ground truth, columns prediction."""
        m = np.asarray(matrix, dtype=np.int64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confusion matrix must be square [C, C], got shape {m.shape}")
        tp = np.diag(m)  # [C]
        gt = m.sum(axis=1)  # [C] ground-truth pixels per class
        predicted = m.sum(axis=0)  # [C] predicted pixels per class
        iou = _ratio(tp, gt + predicted - tp)  # union 0 <=> absent from both
        acc = _ratio(tp, gt)
        total = int(m.sum())
        return cls(
            iou=tuple(float(v) for v in iou),
            accuracy=tuple(float(v) for v in acc),
            gt_pixels=tuple(int(v) for v in gt),
            miou=_nanmean(iou),
            pixel_accuracy=float(tp.sum()) / total if total else math.nan,
            mean_accuracy=_nanmean(acc),
        )

    def as_dict(self, class_names: list[str] | tuple[str, ...]) -> dict:
        """A JSON-able summary: NaN becomes None (null), per-class IoU keyed by class name."""
        _check_names(class_names, len(self.iou))
        return {
            "miou": json_float(self.miou),
            "pixel_accuracy": json_float(self.pixel_accuracy),
            "mean_accuracy": json_float(self.mean_accuracy),
            "per_class_iou": {name: json_float(v) for name, v in zip(class_names, self.iou)},
        }


def json_float(x: float) -> float | None:
    """x for JSON: NaN (a class absent from both truth and prediction) as null."""
    return None if math.isnan(x) else float(x)


def _check_names(class_names: list[str] | tuple[str, ...], num_classes: int) -> None:
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class names are not unique")


def format_table(scores: SegmentationScores, class_names: list[str] | tuple[str, ...]) -> str:
    """A plain-text per-class table in class order, a mean row and the pixel accuracy.

    Undefined values (a class absent from prediction and truth) print as "-".
    """
    _check_names(class_names, len(scores.iou))

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.2f}"

    width = max(len("class"), len("pixel accuracy"), *(len(n) for n in class_names))
    header = f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}  {'GT pixels':>13}"
    rule = "-" * len(header)
    rows = [
        f"{name:<{width}}  {pct(iou):>7}  {pct(acc):>7}  {n:>13,}"
        for name, iou, acc, n in zip(class_names, scores.iou, scores.accuracy, scores.gt_pixels)
    ]
    mean = f"{'mean':<{width}}  {pct(scores.miou):>7}  {pct(scores.mean_accuracy):>7}  {sum(scores.gt_pixels):>13,}"
    overall = f"{'pixel accuracy':<{width}}  {'':>7}  {pct(scores.pixel_accuracy):>7}"
    return "\n".join([header, rule, *rows, rule, mean, overall.rstrip()]) + "\n"
