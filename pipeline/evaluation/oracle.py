"""Grouping oracles: how good the regions are, whatever their classes.

Each region takes the ground-truth class that covers most of its scored pixels; the mIoU of
the result measures the grouping alone (a perfect grouping scores 1 whatever the vocabulary).
More regions score higher by themselves, so the student's segments are compared with partitions
of as many regions in the same image: a content-blind grid, and SLIC superpixels (Achanta et al.
2012, scikit-image's), which follow colour edges with no learning. A boundary measure
(`BoundaryScore`: precision and recall of the regions' edges against the truth's, within a
tolerance) says whether the regions' edges sit on the objects' edges.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt


def majority_labels(regions: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Label every region with its majority ground-truth class.

    Args:
        regions: [H, W] non-negative region ids.
        target: [H, W] ground-truth labels in [0, num_classes) or ignore_index.
    Returns:
        [H, W] int64 labels; regions without scored pixels become 0 (background).
    """
    ids, inverse = np.unique(regions.ravel(), return_inverse=True)  # compact region ids
    scored = target.ravel() != ignore_index
    votes = np.bincount(inverse[scored] * num_classes + target.ravel()[scored].astype(np.int64), minlength=len(ids) * num_classes)
    winner = votes.reshape(len(ids), num_classes).argmax(axis=1)  # [regions]
    return winner[inverse].reshape(regions.shape)


def grid_regions(height: int, width: int, g: int = 3, cols: int | None = None) -> np.ndarray:
    """[H, W] ids of the cells of a g x g grid (g x `cols` when given) over the image (row-major)."""
    cols = g if cols is None else cols
    r = np.minimum(np.arange(height) * g // height, g - 1)
    c = np.minimum(np.arange(width) * cols // width, cols - 1)
    return r[:, None] * cols + c[None, :]


def matched_grid(height: int, width: int, regions: int) -> np.ndarray:
    """A content-blind grid of about `regions` cells, shaped like the image."""
    rows = max(1, round(math.sqrt(regions * height / width)))
    return grid_regions(height, width, rows, max(1, round(regions / rows)))


def slic_regions(image: np.ndarray, regions: int) -> np.ndarray:
    """[H, W] SLIC superpixels of an RGB image [H, W, 3], about `regions` of them (scikit-image's
    defaults: compactness 10, Lab colour)."""
    from skimage.segmentation import slic

    return slic(image, n_segments=max(1, regions), start_label=0, channel_axis=-1)


def edges(labels: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose right or lower neighbour carries another id."""
    out = np.zeros(labels.shape, dtype=bool)
    out[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return out


class BoundaryScore:
    """Boundary precision, recall and F-measure of regions against the truth's class edges,
    summed over a split (as the BSDS benchmark scores contours): an edge pixel counts as matched
    when the other map has an edge within `tolerance` x the image diagonal (BSDS's 0.0075)."""

    def __init__(self, tolerance: float = 0.0075):
        self.tolerance = tolerance
        self.counts = np.zeros(4, dtype=np.int64)  # predicted matched, predicted, true matched, true

    def update(self, regions: np.ndarray, target: np.ndarray) -> None:
        ours, truth = edges(regions), edges(target)
        reach = max(1.0, self.tolerance * math.hypot(*target.shape))
        near_truth = distance_transform_edt(~truth) <= reach if truth.any() else np.zeros_like(truth)
        near_ours = distance_transform_edt(~ours) <= reach if ours.any() else np.zeros_like(ours)
        self.counts += [int((ours & near_truth).sum()), int(ours.sum()), int((truth & near_ours).sum()), int(truth.sum())]

    def scores(self) -> dict[str, float]:
        pm, p, tm, t = self.counts
        precision = pm / p if p else math.nan
        recall = tm / t if t else math.nan
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
        return {"precision": float(precision), "recall": float(recall), "f": float(f)}
