"""The student's zero-shot segmentation under GroupViT's evaluation protocol.

NVlabs/GroupViT `segmentation/evaluation/group_vit_seg.py` run through mmseg's `slide_inference`,
reproduced step by step (tests/evaluation/test_protocol.py pins it by hand-computed cases):
windows as mmseg lays them out (`slide_boxes`); in each, the student sees the part a stride-p
patch embedding covers, with its position table interpolated bicubically; the composed soft
assignment is resized bilinearly to the whole window and each pixel takes its argmax group,
whose class logits are `group_logits`; the windows' logits are averaged per pixel and the label
is their argmax, background channel first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.evaluation.vocabulary import Namer, Prediction, finish
from pipeline.evaluation.windows import WindowAverage, resize_short_side, slide_boxes
from pipeline.student import ZeroSegStudent
from pipeline.student.normalize import normalize_images

GROUPVIT_TOPK = 5  # GroupViT's evaluation keeps each window's top-5 classes
GROUPVIT_MAX_SCALE = 100.0  # and clamps the logit scale at CLIP's cap


def require_softmax_rule(namer: Namer) -> None:
    """GroupViT's scoring reads softmax probabilities: the `cosine` rule has none."""
    if namer.rule == "cosine":
        raise ConfigError("GroupViT's protocol scores groups by softmax probabilities: use eval.bg_rule probability or class")


def group_logits(segments: torch.Tensor, image: torch.Tensor, namer: Namer, *, topk: int = GROUPVIT_TOPK) -> torch.Tensor:
    """GroupViT's class logits of each group of one window, background channel first.

    For groups `segments` [S, D] of a window whose global embedding is `image` [D]: affinities
    A = cosine x scale (scale clamped at 100) [S, K']; P = softmax(A); the window's classes are
    its top-k by softmax(cosine(image) x scale); the group scores are softmax(A restricted to
    those) x P. Under `probability` the background channel is 1 for a group whose best score is
    under min(threshold, the window's best score over all groups and classes), so a threshold
    above every score cannot make the whole window background. Under `class` the background
    words (the first rows of the vocabulary, always kept) give the background channel their
    best score.

    Returns:
        [S, 1 + K] (K: the vocabulary without background words).
    """
    require_softmax_rule(namer)
    scale = min(float(namer.logit_scale), GROUPVIT_MAX_SCALE)
    text = namer.text.to(segments.device)
    affinity = F.normalize(segments.float(), dim=-1) @ text.T * scale  # [S, K']
    prior = affinity.softmax(dim=-1)
    window = (F.normalize(image.float(), dim=-1) @ text.T * scale).softmax(dim=-1)  # [K']
    bg = namer.background_rows
    keep = torch.zeros(text.shape[0], dtype=torch.bool, device=affinity.device)
    keep[:bg] = True
    keep[window[bg:].topk(min(topk, text.shape[0] - bg)).indices + bg] = True
    scores = affinity.masked_fill(~keep, -math.inf).softmax(dim=-1) * prior  # [S, K']
    if namer.rule == "class":
        return torch.cat([scores[:, :bg].amax(dim=1, keepdim=True), scores[:, bg:]], dim=1)
    cut = min(namer.threshold, float(scores.max()))
    return torch.cat([(scores.amax(dim=1, keepdim=True) < cut).to(scores.dtype), scores], dim=1)


def segments_owning(seg: torch.Tensor, num_segments: int, share: float = 0.01) -> torch.Tensor:
    """[n] segments owning at least `share` of each window's pixels, from seg [n, H, W] ids."""
    n, h, w = seg.shape
    offsets = num_segments * torch.arange(n, device=seg.device).view(n, 1, 1)
    counts = torch.bincount((seg + offsets).flatten(), minlength=n * num_segments).view(n, num_segments)  # pixels per segment
    return (counts >= share * h * w).sum(dim=1)


@dataclass
class Windows:
    """The student's forward over one image's windows, whatever the vocabulary.

    Attributes:
        size: (h, w) of the image resized to the short side.
        boxes: (top, left, rows, cols) per window.
        seg: per window [rows, cols] the argmax segment of each pixel.
        segments: [n, S, D] the segments' embeddings (the teacher's space).
        z: [n, D] each window's global embedding.
        per_window: segments owning at least 1% of a window, averaged over the windows.
    """

    size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    seg: list[torch.Tensor]
    segments: torch.Tensor
    z: torch.Tensor
    per_window: float


class StudentSegmenter:
    """The student's segmentation of an image under GroupViT's protocol, for any vocabulary.

    Args:
        student: a trained student (put in eval mode here).
        short_side, window, stride: the resolution protocol, in pixels of the resized image.
        device: where the student runs.
        windows_per_forward: windows run through the model at once (memory: a tall or wide
            image has many).
        naming: what names a segment, `ZeroSegStudent.infer`'s `naming` (eval.student_naming).
    """

    def __init__(self, student: ZeroSegStudent, *, short_side: int = 448, window: int = 448, stride: int = 224, device: torch.device | str = "cpu",
                 windows_per_forward: int = 32, naming: str = "segment"):
        p = student.arch.patch_size
        for key, value in (("eval.short_side", short_side), ("eval.window", window)):
            if value < p:
                raise ConfigError(f"{key}: {value} px is smaller than the student's patch size ({p} px)")
        self.student = student.eval().to(device)
        self.short_side, self.window, self.stride = short_side, window, stride
        self.device = torch.device(device)
        self.windows_per_forward = max(1, windows_per_forward)
        self.naming = naming
        self._last: tuple[np.ndarray, Windows] | None = None

    @torch.inference_mode()
    def windows(self, image: np.ndarray) -> Windows:
        """The student over the image's windows (computed once per image)."""
        if self._last is not None and self._last[0] is image:
            return self._last[1]
        p = self.student.arch.patch_size
        x = resize_short_side(image, self.short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        if min(h, w) < p:
            raise ConfigError(f"eval.short_side: the image is {h}x{w} px after resizing, smaller than the student's patch ({p} px)")
        boxes = slide_boxes(h, w, self.window, self.stride)
        seg: list[torch.Tensor | None] = [None] * len(boxes)
        segments: list[torch.Tensor | None] = [None] * len(boxes)
        z: list[torch.Tensor | None] = [None] * len(boxes)
        owned = []
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, rows, cols) in enumerate(boxes):
            by_shape.setdefault((rows, cols), []).append(i)
        for (rows, cols), members in by_shape.items():
            seen_h, seen_w = rows - rows % p, cols - cols % p  # what the patch embedding covers
            for a in range(0, len(members), self.windows_per_forward):
                part = members[a : a + self.windows_per_forward]
                crops = torch.stack([x[:, t : t + seen_h, l : l + seen_w] for t, l, _, _ in (boxes[i] for i in part)])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    out = self.student.infer(normalize_images(crops), pos_mode="interpolate", naming=self.naming)
                masks = F.interpolate(out.masks.float(), size=(rows, cols), mode="bilinear", align_corners=False)  # [n, S, rows, cols]
                argmax = masks.argmax(dim=1)  # [n, rows, cols]
                owned += segments_owning(argmax, masks.shape[1]).tolist()
                for j, i in enumerate(part):
                    seg[i], segments[i], z[i] = argmax[j], out.segments[j].float(), out.z[j].float()
        result = Windows((h, w), boxes, seg, torch.stack(segments), torch.stack(z), sum(owned) / len(owned))
        self._last = (image, result)
        return result

    @torch.inference_mode()
    def predict(self, image: np.ndarray, namer: Namer) -> Prediction:
        """image: [H, W, 3] uint8 RGB. The windows' logits are summed per pixel and divided by the
        number of windows covering it; the label is the argmax, background channel first. For the
        grouping oracle, a pixel keeps the segment of the window where its logit was highest.
        """
        win = self.windows(image)
        h, w = win.size
        S = win.segments.shape[1]
        merged = WindowAverage(namer.channels, h, w, self.device)
        segments = torch.zeros(h, w, dtype=torch.long, device=self.device)
        seg_best = torch.full((h, w), -math.inf, device=self.device)
        topk = namer.topk or GROUPVIT_TOPK
        for i, (t, l, rows, cols) in enumerate(win.boxes):
            group = group_logits(win.segments[i], win.z[i], namer, topk=topk)  # [S, channels]
            pix = group[win.seg[i]].permute(2, 0, 1)  # [channels, rows, cols]
            merged.add(t, l, pix)
            best = pix.amax(dim=0)
            region = seg_best[t : t + rows, l : l + cols]
            better = best > region
            region[better] = best[better]
            segments[t : t + rows, l : l + cols][better] = (i * S + win.seg[i])[better]
        score, labels = merged.result().max(dim=0)
        pred = finish(labels, score, image.shape[:2], segments)
        pred.segments_per_window = win.per_window
        return pred
