"""Grouping oracles: how good the regions are, whatever their classes.

Each region takes the ground-truth class that covers most of its scored pixels; the mIoU of
the result measures the grouping alone (a perfect grouping scores 1 whatever the vocabulary).
The student's segments are compared with a content-blind fixed grid, which any grouping worth
learning must beat.
"""

from __future__ import annotations

import numpy as np


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


def grid_regions(height: int, width: int, g: int = 3) -> np.ndarray:
    """[H, W] ids of the cells of a g x g grid over the image (row-major)."""
    rows = np.minimum(np.arange(height) * g // height, g - 1)
    cols = np.minimum(np.arange(width) * g // width, g - 1)
    return rows[:, None] * g + cols[None, :]
