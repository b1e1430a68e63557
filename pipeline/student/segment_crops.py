"""Segment-following targets: the teacher's embedding of each student segment's masked crop.

The cached views are fixed grid cells; a segment that follows an object is pulled to an average
of the cells it covers, which mixes the object with whatever else the cells hold. Here the
teacher embeds what the segment itself covers: the image with everything outside the segment
set to the teacher's mean colour (0 after its normalization), cropped to the segment's
bounding square and resized to the teacher's input. This runs the teacher inside stage two
(`loss.segment_crop`), once per segment per step, so it costs S teacher forwards per image per
epoch on top of the cached targets (docs/training.md says what that means at scale).

In training the encoder sees only the kept patches; a removed patch takes the segment of its
nearest kept patch, so a crop has no holes where the mask removed patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def full_grid_assignment(assignment: Tensor, ids_keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each patch of the whole grid to the segment of its nearest kept patch (itself when kept).

    Args:
        assignment: [B, S, N] token-to-segment weights of the kept tokens.
        ids_keep: [B, N] patch index (row-major on `grid`) of each kept token.
        grid: (h, w) patch grid.

    Returns:
        [B, S, h*w] one-hot over S: the segment owning each patch.
    """
    h, w = grid
    B, S, N = assignment.shape
    every = torch.arange(h * w, device=ids_keep.device)
    coords = torch.stack([every // w, every % w], dim=1).float()  # [L, 2]
    kept = coords[ids_keep]  # [B, N, 2]
    nearest = torch.cdist(coords.expand(B, -1, -1), kept).argmin(dim=2)  # [B, L] index into N
    owner = assignment.argmax(dim=1).gather(1, nearest)  # [B, L] segment of each patch
    return F.one_hot(owner, S).permute(0, 2, 1).float()  # [B, S, L]


def segment_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Each mask's bounding square (x0, y0, x1, y1 in pixels, clamped to the image) and whether it is non-empty.

    Args:
        masks: [M, H, W] bool.
    """
    M, H, W = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [M, H], [M, W]
    valid = rows.any(dim=1)
    ar_h, ar_w = torch.arange(H, device=masks.device).float(), torch.arange(W, device=masks.device).float()
    y0 = torch.where(rows, ar_h, float(H)).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1.0).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, float(W)).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1.0).amax(dim=1) + 1
    side = torch.maximum(x1 - x0, y1 - y0).clamp(min=1)  # square, like the teacher's cells
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0 = torch.minimum((cx - side / 2).clamp(min=0), (W - side).clamp(min=0))  # shifted inside the image, not cut
    y0 = torch.minimum((cy - side / 2).clamp(min=0), (H - side).clamp(min=0))
    x1 = (x0 + side).clamp(max=W)
    y1 = (y0 + side).clamp(max=H)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(valid[:, None], boxes, torch.tensor([0.0, 0.0, W, H], device=masks.device)), valid


class SegmentCropTargets:
    """The teacher's unit embeddings of the student's segments, cropped and masked (no gradient).

    Args:
        teacher: a loaded `pipeline.teacher.Teacher` (the cache's teacher).
    """

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.size = teacher.spec.size
        self.mean = torch.tensor(teacher.spec.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(teacher.spec.std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: Tensor, assignment: Tensor, ids_keep: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Args:
            images: [B, 3, H, W] uint8, the student's input images.
            assignment, ids_keep, grid: as `full_grid_assignment`.

        Returns:
            (targets [B, S, D] unit vectors, valid [B, S] bool: the segment owns a patch).
        """
        B, S, _ = assignment.shape
        H, W = images.shape[-2:]
        owner = full_grid_assignment(assignment.float(), ids_keep, grid).view(B, S, *grid)  # [B, S, h, w]
        masks = F.interpolate(owner, size=(H, W), mode="nearest").flatten(0, 1) > 0.5  # [B*S, H, W]
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        x = images.float().div(255.0).repeat_interleave(S, dim=0)  # [B*S, 3, H, W]
        x = torch.where(masks[:, None], x, mean)  # outside the segment: the teacher's mean colour
        boxes, valid = segment_boxes(masks)
        index = torch.arange(B * S, device=images.device, dtype=boxes.dtype)[:, None]
        crops = roi_align(x, torch.cat([index, boxes], dim=1), output_size=self.size, spatial_scale=1.0, sampling_ratio=0, aligned=True)  # adaptive: 1 sample a pixel when upsampling
        emb = self.teacher.encode((crops - mean) / std)  # [B*S, D]
        return F.normalize(emb.to(images.device), dim=-1).view(B, S, -1), valid.view(B, S)
