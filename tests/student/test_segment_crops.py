"""Segment-following targets: the teacher's embedding of each segment's masked crop."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import TINY_TEACHER

from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig
from pipeline.student.segment_crops import (
    SegmentCropTargets,
    full_grid_assignment,
    segment_boxes,
)


def test_a_removed_patch_takes_the_segment_of_its_nearest_kept_patch():
    # 4x4 grid; kept patches 0 (segment 0) and 15 (segment 1), the opposite corners.
    assignment = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, S=2, N=2]
    owner = full_grid_assignment(assignment, torch.tensor([[0, 15]]), (4, 4))  # [1, 2, 16]
    grid = owner[0].argmax(dim=0).view(4, 4)
    # Nearer (0, 0) than (3, 3): the top-left triangle; ties (the anti-diagonal) go to the first kept patch.
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(grid, expected) and torch.equal(owner.sum(dim=1), torch.ones(1, 16))


def test_boxes_are_the_bounding_squares_of_the_masks_and_empty_masks_are_flagged():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 1:7] = True  # 2 rows x 6 cols: a square of side 6 centred on rows 2-3, shifted down to the top edge
    masks[1, 5:8, 5:8] = True  # a 3x3 corner square
    masks[3, 6:8, 1:7] = True  # the same strip at the bottom: shifted up, not cut to a rectangle
    boxes, valid = segment_boxes(masks)
    assert valid.tolist() == [True, True, False, True]
    assert boxes[0].tolist() == [1.0, 0.0, 7.0, 6.0]
    assert boxes[1].tolist() == [5.0, 5.0, 8.0, 8.0]
    assert boxes[2].tolist() == [0.0, 0.0, 8.0, 8.0]
    assert boxes[3].tolist() == [1.0, 2.0, 7.0, 8.0]


def test_crop_targets_are_the_teachers_embeddings_of_the_masked_crops():
    teacher = Teacher.load(TeacherConfig(**TINY_TEACHER))
    size = teacher.spec.size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8))
    # 2x2 patch grid, every patch kept: segment 0 owns the left column, segment 1 the right one.
    assignment = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]])
    targets, valid = SegmentCropTargets(teacher)(images, assignment, torch.tensor([[0, 1, 2, 3]]), (2, 2))
    assert targets.shape == (1, 2, teacher.identity.embed_dim) and valid.tolist() == [[True, True]]
    # Written out: the left half, the rest at the teacher's mean, its bounding square is the whole image.
    mean = torch.tensor(teacher.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.spec.std).view(1, 3, 1, 1)
    x = images.float() / 255.0
    left = torch.where(torch.arange(size).view(1, 1, 1, size) < size // 2, x, mean)
    expected = F.normalize(teacher.encode((left - mean) / std), dim=-1)
    torch.testing.assert_close(targets[0, 0], expected[0], atol=2e-3, rtol=0)
    assert float(targets[0, 0] @ targets[0, 1]) < 0.999  # the two halves are told apart
