"""Zero-shot segmentation of an image with any vocabulary: the student, and the teacher alone.

Both segmenters share the protocol: resize to a short side, classify regions by cosine
similarity to the class embeddings (times the teacher's logit scale, softmax over the
vocabulary), mark background where the best score is under the threshold, and return labels at
the input's resolution (0 = background, k = vocabulary entry k-1).

The student slides a square window over the resized image (GroupViT: 448 window, 224 stride),
runs the windows in batches with position embeddings recomputed for the window's grid, gives
each pixel the segment with the largest (bilinearly upsampled) soft assignment, and each
segment its class. Where windows overlap, the more confident window wins. The training-free
baselines that use the teacher alone are in pipeline/evaluation/baselines.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.text import name_key
from pipeline.core.errors import ConfigError
from pipeline.student import ZeroSegStudent
from pipeline.student.normalize import normalize_images


@dataclass(frozen=True)
class BackgroundRule:
    """Which pixels are background.

    `probability` thresholds the best softmax probability over the vocabulary (cosine x logit
    scale; GroupViT's rule); `cosine` thresholds the best raw cosine similarity. `class` puts
    `background_rows` background words first in the vocabulary (see `vocabulary`): a pixel is
    background where one of them scores best (SCLIP and NACLIP evaluate VOC and Context so);
    `vocabulary` sets its threshold to -inf, so no pixel is thresholded away.
    """

    mode: str = "probability"
    threshold: float = 0.5
    background_rows: int = 0

    def __post_init__(self):
        if self.mode not in ("probability", "cosine", "class"):
            raise ValueError(f"unknown background rule {self.mode!r} (probability, cosine, class)")
        if (self.mode == "class") != (self.background_rows > 0):
            raise ValueError("background_rows > 0 goes with mode 'class', and only with it")

    def decide(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., K'] scores over the vocabulary -> best score [...] and label [...] (0 = background).

        The threshold is applied later, by `finish`, on the best score.
        """
        best, idx = scores.max(dim=-1)
        return best, (idx + 1 - self.background_rows).clamp_min(0)


def vocabulary(embed, classes: list[str], templates, *, mode: str, threshold: float, bg_words=("background",)) -> tuple[torch.Tensor, BackgroundRule]:
    """Class embeddings and the background rule that reads them.

    Args:
        embed: `ClassEmbedder`-like: (names, templates) -> [n, D] unit embeddings.
        classes: the K class names (background excluded).
        mode, threshold: the rule; under `class` the background words' rows come first and
            `threshold` is not used (-inf).

    Returns:
        text [K', D] (K' = K, or K + len(bg_words) under `class`) and the rule.
    """
    if mode != "class":
        return embed(list(classes), templates), BackgroundRule(mode, threshold)
    if not bg_words:
        raise ConfigError("eval.bg_words: bg_rule 'class' needs at least one background word")
    words = {name_key(w) for w in bg_words}
    clash = [c for c in classes if name_key(c) in words]
    if clash:  # it would tie with the background word, which is listed first and wins the tie
        raise ConfigError(f"class {clash[0]!r} is also a background word (eval.bg_words) under bg_rule class: it could never be shown; "
                          "drop it from the classes or from eval.bg_words")
    return embed([*bg_words, *classes], templates), BackgroundRule(mode, -math.inf, background_rows=len(bg_words))


@dataclass
class Prediction:
    """labels: [H, W] int64, 0 = background, k = class k-1 of the vocabulary; score: [H, W] float32.

    segments: [H, W] int64 region ids (window x S + segment for the student), for grouping
    oracles; None where the method has no regions of its own.
    segments_per_window: the student's segments that own at least 1% of a window's pixels,
    averaged over its windows (1.0 means the grouping collapsed); None for other methods.
    """

    labels: np.ndarray
    score: np.ndarray
    segments: np.ndarray | None = None
    segments_per_window: float | None = None


def class_scores(emb: torch.Tensor, text: torch.Tensor, logit_scale: float, mode: str, center: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] region embeddings x [K, D] unit class embeddings -> [N, K] scores under `mode`.

    Args:
        center: [D] the teacher's dataset mean of unit image embeddings (`eval.calibration:
            center`): subtracted from the unit region embeddings before the cosine, so the
            component every image shares stops favouring the class words nearest it.
    """
    emb = F.normalize(emb.float(), dim=-1)  # [N, D]
    if center is not None:
        emb = F.normalize(emb - center.to(emb.device), dim=-1)
    cos = emb @ text.T  # [N, K]
    return cos if mode == "cosine" else (cos * logit_scale).softmax(dim=-1)  # probability and class


def keep_topk(scores: torch.Tensor, image_scores: torch.Tensor, k: int, background_rows: int = 0) -> torch.Tensor:
    """`scores` [..., K'] with every class outside the image's k best set to -inf.

    Args:
        image_scores: [K'] the image's scores from its global embedding; they pick the k classes.
        k: classes kept (0, or k >= the vocabulary: all).
        background_rows: background words (the `class` rule's first rows): always kept.
    """
    n = scores.shape[-1] - background_rows
    if not k or k >= n:
        return scores
    allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    allowed[:background_rows] = True
    allowed[image_scores[background_rows:].topk(k).indices + background_rows] = True
    return scores.masked_fill(~allowed, -math.inf)


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


GROUPVIT_TOPK = 5  # GroupViT's evaluation keeps each window's top-5 classes


GROUPVIT_MAX_SCALE = 100.0  # and clamps the logit scale at CLIP's cap


def require_softmax_rule(rule: BackgroundRule) -> None:
    """GroupViT's scoring reads softmax probabilities: the `cosine` rule has none."""
    if rule.mode == "cosine":
        raise ConfigError("eval.protocol groupvit scores groups by softmax probabilities: use eval.bg_rule probability or class")


def groupvit_group_logits(segments: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, topk: int = GROUPVIT_TOPK, center: torch.Tensor | None = None) -> torch.Tensor:
    """GroupViT's class logits of each group of one window, background channel first.

    For groups `segments` [S, D] of a window whose global embedding is `image` [D]: affinities
    A = cosine x scale (scale clamped at 100) [S, K']; P = softmax(A); the window's classes are
    its top-k by softmax(cosine(image) x scale); the group scores are softmax(A restricted to
    those) x P. Under `probability` the background channel is 1 for a group whose best score is
    under min(threshold, the window's best score over all groups and classes), else 0, so a
    threshold above every score cannot make the whole window background. Under `class` the
    background words (the first rows of `text`, always kept) give the background channel their
    best score.

    Returns:
        [S, 1 + K] (K: the vocabulary without background words).
    """
    require_softmax_rule(rule)
    scale = min(float(logit_scale), GROUPVIT_MAX_SCALE)
    affinity = class_scores(segments, text, 1.0, "cosine", center) * scale  # [S, K']
    prior = affinity.softmax(dim=-1)
    window = (class_scores(image[None], text, 1.0, "cosine", center)[0] * scale).softmax(dim=-1)  # [K']
    bg = rule.background_rows
    keep = torch.zeros(text.shape[0], dtype=torch.bool, device=affinity.device)
    keep[:bg] = True
    keep[window[bg:].topk(min(topk, text.shape[0] - bg)).indices + bg] = True
    scores = affinity.masked_fill(~keep, -math.inf).softmax(dim=-1) * prior  # [S, K']
    if rule.mode == "class":
        return torch.cat([scores[:, :bg].amax(dim=1, keepdim=True), scores[:, bg:]], dim=1)
    cut = min(rule.threshold, float(scores.max()))
    return torch.cat([(scores.amax(dim=1, keepdim=True) < cut).to(scores.dtype), scores], dim=1)


def segments_owning(seg: torch.Tensor, num_segments: int, share: float = 0.01) -> torch.Tensor:
    """[n] segments owning at least `share` of each window's pixels, from seg [n, H, W] ids."""
    n, h, w = seg.shape
    offsets = num_segments * torch.arange(n, device=seg.device).view(n, 1, 1)
    counts = torch.bincount((seg + offsets).flatten(), minlength=n * num_segments).view(n, num_segments)  # pixels per segment
    return (counts >= share * h * w).sum(dim=1)


def finish(labels: torch.Tensor, score: torch.Tensor, rule: BackgroundRule, out_hw: tuple[int, int], segments: torch.Tensor | None = None) -> Prediction:
    """Apply the background rule and bring [h, w] maps to the input's resolution (nearest)."""
    labels = torch.where(score < rule.threshold, torch.zeros_like(labels), labels)

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None, None].double(), size=out_hw, mode="nearest")[0, 0]

    segments = resize(segments).long().cpu().numpy() if segments is not None else None
    return Prediction(resize(labels).long().cpu().numpy(), resize(score).float().cpu().numpy(), segments)


class StudentSegmenter:
    """The ZeroSeg student's zero-shot segmentation.

    Args:
        student: a trained student in eval mode.
        text: [K', D] unit class embeddings (background words first under the `class` rule).
        logit_scale: the teacher's.
        rule: background rule.
        short_side, window, stride: resolution protocol, in pixels of the resized image.
        topk_classes: keep only the image's k best classes by its global embedding, the mean
            of its windows' (0: all).
        windows_per_forward: windows run through the model at once (memory: a tall or wide
            image has many).
        center: [D] eval.calibration's mean (`class_scores`); None: no calibration.
        protocol: `zeroseg` (below) or `groupvit` (`predict_groupvit`).
        naming: what names a segment, `ZeroSegStudent.infer`'s `naming` (eval.student_naming).
    """

    def __init__(self, student: ZeroSegStudent, text: torch.Tensor, logit_scale: float, rule: BackgroundRule, *, short_side: int = 448, window: int = 448, stride: int = 224, topk_classes: int = 0, device: torch.device | str = "cpu", windows_per_forward: int = 32, center: torch.Tensor | None = None,
                 protocol: str = "zeroseg", naming: str = "segment"):
        p = student.arch.patch_size
        for key, value in (("eval.short_side", short_side), ("eval.window", window)):
            if value < p:
                raise ConfigError(f"{key}: {value} px is smaller than the student's patch size ({p} px)")
        if protocol not in ("zeroseg", "groupvit"):
            raise ConfigError(f"eval.protocol: expected zeroseg or groupvit, got {protocol!r}")
        if protocol == "groupvit":
            require_softmax_rule(rule)
        self.student = student.eval().to(device)
        self.text, self.scale, self.rule = text.to(device), logit_scale, rule
        self.short_side, self.window, self.stride = short_side, window - window % p, stride
        self.window_px = window  # groupvit: the window as given (a patch conv covers its multiple of p)
        self.topk, self.device = topk_classes, torch.device(device)
        self.windows_per_forward = max(1, windows_per_forward)
        self.center = center
        self.protocol = protocol
        self.naming = naming

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> Prediction:
        """image: [H, W, 3] uint8 RGB."""
        if self.protocol == "groupvit":
            return self.predict_groupvit(image)
        x = resize_short_side(image, self.short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        win = min(self.window, h - h % self.student.arch.patch_size, w - w % self.student.arch.patch_size)
        stride = min(self.stride, win)  # the window shrinks to a small image's side: no strip left between windows
        origins = [(t, l) for t in window_origins(h, win, stride) for l in window_origins(w, win, stride)]
        crops = torch.stack([x[:, t : t + win, l : l + win] for t, l in origins])  # [n, 3, win, win]
        outs = []
        for a in range(0, len(crops), self.windows_per_forward):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = self.student.infer(normalize_images(crops[a : a + self.windows_per_forward]), naming=self.naming)
            outs.append((out.masks.float(), out.segments.float(), out.z.float()))
        masks, segments_emb, z = (torch.cat(parts) for parts in zip(*outs))  # [n, S, gh, gw], [n, S, D], [n, D]
        probs = class_scores(segments_emb.flatten(0, 1), self.text, self.scale, self.rule.mode, self.center).view(len(origins), -1, self.text.shape[0])  # [n, S, K]
        if self.topk:
            image_emb = F.normalize(z, dim=-1).mean(dim=0, keepdim=True)  # [1, D] the image's, from all its windows
            probs = keep_topk(probs, class_scores(image_emb, self.text, self.scale, self.rule.mode, self.center)[0], self.topk, self.rule.background_rows)
        best, cls = self.rule.decide(probs)  # [n, S] score and label of each segment
        masks = F.interpolate(masks, size=(win, win), mode="bilinear", align_corners=False)  # [n, S, win, win]
        seg = masks.argmax(dim=1)  # [n, win, win] segment of each pixel
        per_window = float(segments_owning(seg, masks.shape[1]).float().mean())
        labels = torch.zeros(h, w, dtype=torch.long, device=self.device)
        segments = torch.zeros(h, w, dtype=torch.long, device=self.device)
        score = torch.full((h, w), -math.inf, device=self.device)
        for i, (t, l) in enumerate(origins):
            s_win, c_win = best[i][seg[i]], cls[i][seg[i]]  # [win, win]
            region = score[t : t + win, l : l + win]
            better = s_win > region
            region[better] = s_win[better]
            labels[t : t + win, l : l + win][better] = c_win[better]
            segments[t : t + win, l : l + win][better] = (i * best.shape[1] + seg[i])[better]
        pred = finish(labels, score, self.rule, image.shape[:2], segments)
        pred.segments_per_window = per_window
        return pred

    @torch.inference_mode()
    def predict_groupvit(self, image: np.ndarray) -> Prediction:
        """GroupViT's evaluation (segmentation/evaluation/group_vit_seg.py + mmseg slide_inference).

        Windows as mmseg lays them out (`slide_boxes`); in each, the student sees the part a
        stride-p patch embedding covers (the window's sides floored to multiples of p), with its
        position table interpolated bicubically; the composed soft assignment is resized
        bilinearly to the whole window and each pixel takes its argmax group, whose class logits
        are `groupvit_group_logits` (top-k classes of the window: eval.topk_classes, else 5).
        The windows' logits are summed per pixel and divided by the number of windows covering
        it; the label is the argmax, background channel first. For the grouping oracle, a pixel
        keeps the segment of the window where its logit was highest.
        """
        p = self.student.arch.patch_size
        x = resize_short_side(image, self.short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        if min(h, w) < p:
            raise ConfigError(f"eval.short_side: the image is {h}x{w} px after resizing, smaller than the student's patch ({p} px)")
        boxes = slide_boxes(h, w, self.window_px, self.stride)
        merged = WindowAverage(1 + self.text.shape[0] - self.rule.background_rows, h, w, self.device)
        segments = torch.zeros(h, w, dtype=torch.long, device=self.device)
        seg_best = torch.full((h, w), -math.inf, device=self.device)
        topk = self.topk or GROUPVIT_TOPK
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
                seg = masks.argmax(dim=1)  # [n, rows, cols]
                S = masks.shape[1]
                for j, i in enumerate(part):
                    t, l = boxes[i][:2]
                    group = groupvit_group_logits(out.segments[j].float(), out.z[j].float(), self.text, self.scale, self.rule, topk=topk, center=self.center)  # [S, channels]
                    pix = group[seg[j]].permute(2, 0, 1)  # [channels, rows, cols]
                    merged.add(t, l, pix)
                    best = pix.amax(dim=0)
                    region = seg_best[t : t + rows, l : l + cols]
                    better = best > region
                    region[better] = best[better]
                    segments[t : t + rows, l : l + cols][better] = (i * S + seg[j])[better]
                owned += segments_owning(seg, S).tolist()
        score, labels = merged.result().max(dim=0)
        pred = finish(labels, score, BackgroundRule("probability", -math.inf), image.shape[:2], segments)
        pred.segments_per_window = sum(owned) / len(owned)
        return pred
