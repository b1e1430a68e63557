"""The scoreboard: per-image confusion matrices, mIoU over the objects alone, and paired bootstrap
intervals of the student's differences to each baseline.

mIoU is a corpus statistic (one confusion matrix summed over the split), so its uncertainty is
taken by resampling images, not pixels: each bootstrap resample draws the split's images with
replacement, sums their matrices for every method, and recomputes each method's mIoU. The
resamples are paired (one draw of images for every method), so the interval of a difference
holds the images' shared difficulty out of it. The resampling seed is fixed, so the intervals
are the same on every run.
"""

from __future__ import annotations

import warnings

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def miou_of(matrices: np.ndarray, classes: slice | None = None) -> np.ndarray:
    """mIoU of confusion matrices [..., C, C] (rows truth), over `classes` (None: all); a class
    absent from both truth and prediction is left out of the mean, as `SegmentationScores` does.

    Returns:
        [...] float (NaN where no class is defined).
    """
    m = matrices.astype(np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)  # [..., C]
    union = m.sum(axis=-1) + m.sum(axis=-2) - tp  # [..., C]
    if classes is not None:
        tp, union = tp[..., classes], union[..., classes]
    iou = np.divide(tp, union, out=np.full(tp.shape, np.nan), where=union > 0)
    with warnings.catch_warnings():  # a resample with no defined class is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(iou, axis=-1)


OBJECTS = slice(1, None)  # mIoU over the object classes: background (class 0) left out


class Scoreboard:
    """Per-image confusion matrices of every method on one split.

    Args:
        num_classes: C, background (index 0) included.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrices: dict[str, list[np.ndarray]] = {}

    def add(self, method: str, matrix: np.ndarray) -> None:
        """One image's [C, C] matrix for `method` (images in the same order for every method)."""
        self.matrices.setdefault(method, []).append(np.asarray(matrix, dtype=np.int64))

    def stacked(self, method: str) -> np.ndarray:
        return np.stack(self.matrices[method])  # [n, C, C]

    def miou(self, method: str) -> float:
        return float(miou_of(self.stacked(method).sum(axis=0)))

    def miou_fg(self, method: str) -> float:
        """mIoU over the object classes alone (background excluded)."""
        return float(miou_of(self.stacked(method).sum(axis=0), OBJECTS))

    def intervals(self, method: str, others: list[str], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                  level: float = 0.95) -> dict[str, dict[str, dict[str, float]]]:
        """Paired bootstrap over images of `method`'s mIoU and mIoU over the objects minus each of `others`'.

        Returns:
            {other: {"miou": {"diff", "lo", "hi"}, "miou_fg": {...}}}: the difference on the whole
            split and its `level` percentile interval.
        """
        n = len(self.matrices[method])
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(n, size=n), minlength=n) for _ in range(resamples)]).astype(np.float64)  # [R, n]
        C = self.num_classes

        def resampled(name: str) -> np.ndarray:
            flat = self.stacked(name).reshape(n, C * C).astype(np.float64)  # [n, C*C]
            return (counts @ flat).reshape(resamples, C, C)  # [R, C, C]

        mine = resampled(method)
        tail = (1 - level) / 2
        out = {}
        for other in others:
            theirs = resampled(other)
            out[other] = {}
            for key, classes in (("miou", None), ("miou_fg", OBJECTS)):
                diff = miou_of(mine, classes) - miou_of(theirs, classes)  # [R]
                whole = float(miou_of(self.stacked(method).sum(axis=0), classes) - miou_of(self.stacked(other).sum(axis=0), classes))
                lo, hi = np.nanquantile(diff, [tail, 1 - tail])
                out[other][key] = {"diff": whole, "lo": float(lo), "hi": float(hi)}
        return out
