"""Window geometry of the evaluation: resizing to a short side, and the windows that slide over it.

`slide_boxes` and `WindowAverage` are mmseg's `slide_inference` (GroupViT's evaluation and the
dense-CLIP methods'); `window_origins` lays a ViT teacher's square windows over an image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError


def resize_short_side(image: np.ndarray, short: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in 0..255 with min(h, w) == short (antialiased bicubic)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    h, w = x.shape[-2:]
    scale = short / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 255)[0]


def window_origins(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); the last one is flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def slide_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, left, rows, cols) of mmseg's `slide_inference` windows over a [height, width] image.

    A window is `window` square where it fits; at the image's far edges it is moved back to
    end flush with the image, and where the image is shorter than the window it is clipped to
    the image and keeps its other side (96x160 at window 128, stride 64: two 96x128 windows, at
    x=0 and x=32). Windows are not deduplicated, as in mmseg (a window that lands twice counts
    twice in the average).
    """
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            boxes.append((y1, x1, y2 - y1, x2 - x1))
    return boxes


class WindowAverage:
    """mmseg's slide-inference merge: per pixel, the sum of the windows' logits over their count."""

    def __init__(self, channels: int, height: int, width: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(channels, height, width, device=device)
        self.count = torch.zeros(height, width, device=device)

    def add(self, top: int, left: int, logits: torch.Tensor) -> None:
        """logits: [channels, rows, cols] of the window at (top, left)."""
        rows, cols = logits.shape[-2:]
        self.sum[:, top : top + rows, left : left + cols] += logits
        self.count[top : top + rows, left : left + cols] += 1

    def result(self) -> torch.Tensor:
        """[channels, height, width]; every pixel must be covered by a window."""
        if bool((self.count == 0).any()):
            raise ValueError("a pixel is covered by no window")
        return self.sum / self.count


def average_at(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Multi-scale inference (mmseg's `img_ratios`): [h_i, w_i, K] score maps, each resized
    bilinearly to `size` and averaged -> [H, W, K]; one map is returned as it is."""
    if len(maps) == 1:
        return maps[0]
    total = sum(F.interpolate(m.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[0] for m in maps)
    return (total / len(maps)).permute(1, 2, 0)


def scaled_sides(short_side: int, ratios, minimum: int, key: str) -> list[int]:
    """round(short_side x ratio) for each ratio; each at least `minimum` px (a one-line error naming `key` otherwise)."""
    sides = [round(short_side * r) for r in ratios]
    if min(sides) < minimum:
        raise ConfigError(f"{key}: {min(sides)} px (x its ratios) is smaller than {minimum} px, the smallest input the method takes")
    return sides
