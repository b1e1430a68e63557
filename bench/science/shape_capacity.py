"""Can the demo student's encoder tell the shapes apart when it is told to? A capacity check.

Issue 14's diagnosis: the trained student's segment embeddings do not separate the demo's six
shapes (a linear probe reaches 24%, chance 17%). Either the encoder cannot see shape at the
student's input size and budget, or distillation never asks it to. This trains the same
encoder (`student.variant`, no decoder, no grouping head) with labels for the same budget
(552 steps of 64 scenes) to classify every patch by the majority class of its pixels, and
reports patch accuracy on held-out scenes, on patches owned by a shape (chance 1/6) and overall.
A high figure means the encoder can see shape at this size and budget, and the gap is in what
training asks of it.

`--labels` says what the training patches are labelled with (the test is always the true
per-patch class): `patch` (the truth), `cells:G` (each patch takes its GxG cell's largest shape
if it covers 10% of the cell, else background: a teacher's crop-level view, right by
construction), or `teacher:G` (the argmax over the demo's class words of the cache's GxG views,
the pseudo-labels of `loss.token_anchors` at a small `loss.anchor_tau`; the training scenes are
then the cache's rows and their stored student images; `--prior balance` takes
`loss.anchor_prior`'s prior out first). `--mask-ratio` trains on the visible patches of MAE's
random masking only, as the student sees them. An ideal learner of the teacher's pseudo-labels
at this budget is the ceiling of the anchor terms.

`--split data/demo_val` also scores the trained classifier in pixels on a labelled split, as
the evaluation scores a segmentation (the project's confusion matrix, 7 classes): under the
evaluation's windows (`eval.short_side`, `eval.window`, `eval.stride`, overlapping windows'
logits averaged) and on each whole scene at the encoder's input side (the scale training
sees). The two differ by the scale the encoder is asked to work at, which is what the figures
are for: the teacher alone scores 0.247 on that split.

    python -m bench.science.shape_capacity --variant zeroseg_tiny --steps 552
    python -m bench.science.shape_capacity --labels teacher:8 [--prior balance]
    python -m bench.science.shape_capacity --split data/demo_val [--full-res] [--steps 1656]
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

import cache_schema as cs
from bench.harness import emit, parser
from bench.science.label_targets import (
    cell_shares,
    class_text,
    training_masks,
    word_cosines,
)
from pipeline.cache.identity import find_store
from pipeline.config import load_params
from pipeline.core.decode import load_rgb
from pipeline.demo.data import CLASSES, make_scene
from pipeline.evaluation.datasets import open_dataset
from pipeline.evaluation.inference import WindowAverage, resize_short_side, slide_boxes
from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.student import ZeroSegStudent, student_arch
from pipeline.student.normalize import normalize_images


def scenes(n: int, seed: int, side: int, patch: int, full_res: bool = False, cells: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n demo scenes at the student's side: uint8 images [n, 3, S, S] and patch labels [n, S/p, S/p]
    (the majority class of each patch's pixels, from the full-resolution mask; with `cells` G, each
    GxG cell's label, `cell_labels`). `full_res`: instead of the whole 128-px scene resized to S (as
    training sees it), one S-px quadrant of it at full resolution (the scale of the evaluation's
    windows), the quadrants taken in turn."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    g = side // patch
    for i in range(n):
        img, mask, _ = make_scene(rng, 128)
        if full_res:
            x, y = i % 2 * side, i // 2 % 2 * side
            img, mask = img.crop((x, y, x + side, y + side)), mask[y : y + side, x : x + side]
        images.append(np.asarray(img if full_res else img.resize((side, side), Image.BICUBIC)))
        if cells:
            labels.append(cell_labels(mask, cells, g))
            continue
        cell = mask.shape[0] // g
        blocks = mask.reshape(g, cell, g, cell).transpose(0, 2, 1, 3).reshape(g, g, -1)
        labels.append(np.apply_along_axis(lambda b: np.bincount(b, minlength=len(CLASSES)).argmax(), 2, blocks))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(labels)).long()


def cell_labels(mask: np.ndarray, g: int, patches: int, min_share: float = 0.1) -> np.ndarray:
    """[patches, patches] labels: each patch takes its gxg cell's largest shape if that covers
    `min_share` of the cell, else background (0)."""
    shares = cell_shares(mask, g, len(CLASSES))  # [g*g, K]
    largest = shares[:, 1:].argmax(1) + 1
    labels = np.where(shares[np.arange(len(shares)), largest] >= min_share, largest, 0).reshape(g, g)
    return np.kron(labels, np.ones((patches // g, patches // g), dtype=np.int64))


def teacher_scenes(params, store: str, g: int, n: int, side: int, patches: int, prior: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's first n training scenes (their stored `side`-px student images) and patch labels from
    the argmax of its gxg views over the demo's class words (less `anchors.anchor_prior` with
    prior "balance", taken over every row of the grid)."""
    group = zarr.open_group(store, mode="r")
    if cs.images_array(side) not in group:
        raise SystemExit(f"{store}: no stored {side}-px student images ({cs.images_array(side)}); build the cache with cache.student_image_size {side}")
    _, rows = training_masks(params, group, store, 1)  # each scene's cache row (its mask is not needed)
    idx = np.array([rows[i] for i in range(n)])
    cosines, _ = word_cosines(group, g, class_text(params), prior)  # [N, g*g, K]
    labels = np.kron(cosines[idx].argmax(-1).reshape(-1, g, g), np.ones((1, patches // g, patches // g), dtype=np.int64))
    return torch.from_numpy(group[cs.images_array(side)][:][idx]), torch.from_numpy(labels)


def patch_miou(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Mean IoU over the classes present in `truth` of patch predictions (any equal shapes)."""
    ious = []
    for k in range(classes):
        union = ((pred == k) | (truth == k)).sum()
        if (truth == k).any():
            ious.append(float(((pred == k) & (truth == k)).sum() / union))
    return sum(ious) / len(ious)


@torch.no_grad()
def split_miou(patch_logits, root: str, side: int, eval_cfg) -> dict[str, float]:
    """Pixel mIoU of a per-patch classifier on a labelled demo split, two ways: under the
    evaluation's windows (`eval.short_side`, `eval.window`, `eval.stride`: each window's patch
    logits resized bilinearly to its pixels, overlapping windows averaged as mmseg does) and on
    the whole scene resized to the encoder's `side` (the scale training sees), its logits
    resized to the image. `patch_logits`: uint8 [B, 3, S, S] -> [B, K, S/p, S/p] logits."""
    matrices = {"windows": ConfusionMatrix(len(CLASSES)), "whole": ConfusionMatrix(len(CLASSES))}
    for sample in open_dataset("demo", root):
        image = load_rgb(sample.image_path)
        h, w = sample.mask.shape
        x = resize_short_side(image, eval_cfg.short_side)  # [3, h', w'] float 0..255
        merge = WindowAverage(len(CLASSES), *x.shape[-2:])
        for top, left, rows, cols in slide_boxes(*x.shape[-2:], eval_cfg.window, eval_cfg.stride):
            crop = x[None, :, top : top + rows, left : left + cols].round().to(torch.uint8)
            merge.add(top, left, F.interpolate(patch_logits(crop), size=(rows, cols), mode="bilinear", align_corners=False)[0])
        windows = F.interpolate(merge.result()[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        small = resize_short_side(image, side)[None].round().to(torch.uint8)
        whole = F.interpolate(patch_logits(small), size=(h, w), mode="bilinear", align_corners=False)[0]
        for name, logits in (("windows", windows), ("whole", whole)):
            matrices[name].update(logits.argmax(0).numpy(), sample.mask)
    return {name: m.scores().miou for name, m in matrices.items()}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--variant", default="zeroseg_tiny")
    ap.add_argument("--steps", type=int, default=552)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-res", action="store_true", help="quadrants of the scenes at full resolution, not whole scenes resized")
    ap.add_argument("--labels", default="patch", help="patch | cells:G | teacher:G (the training labels, above)")
    ap.add_argument("--cache", default="", help="with teacher:G, the cache (default: the one teacher-cache built for the params)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prior", choices=("none", "balance"), default="none", help="with teacher:G, loss.anchor_prior's prior out of the cosines")
    ap.add_argument("--mask-ratio", type=float, default=0.0, help="train on the visible patches of MAE's random masking only")
    ap.add_argument("--split", default="", help="also score a labelled demo split (data/demo_val) in pixels, under the evaluation's windows and whole")
    args = ap.parse_args()
    kind, _, grid = args.labels.partition(":")
    if kind not in ("patch", "cells", "teacher") or (kind != "patch" and not grid.isdigit()):
        raise SystemExit(f"--labels {args.labels!r}: give patch, cells:G or teacher:G")
    torch.manual_seed(args.seed)
    arch = student_arch(args.variant)
    t0 = time.perf_counter()
    patches = arch.img_size // arch.patch_size
    if kind == "teacher":
        params = load_params(args.params)
        store = args.cache or str(find_store(params, progress=False))
        x_train, y_train = teacher_scenes(params, store, int(grid), args.train, arch.img_size, patches, args.prior)
    else:
        x_train, y_train = scenes(args.train, args.seed, arch.img_size, arch.patch_size, args.full_res, int(grid) if kind == "cells" else 0)
    x_test, y_test = scenes(args.test, args.seed + 1000, arch.img_size, arch.patch_size, args.full_res)
    model = ZeroSegStudent(arch=arch, out_dim=8)
    head = torch.nn.Linear(arch.embed_dim, len(CLASSES))
    params = [p for n, p in model.named_parameters() if n.startswith(("patch_embed", "blocks", "norm", "cls_token"))] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)

    def logits(x: torch.Tensor, mask_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L_keep, K] the visible patches' logits and [B, L_keep] their places in patch order."""
        enc = model.forward_encoder(normalize_images(x), mask_ratio)
        keep = torch.argsort(enc.ids_restore, dim=1)[:, : enc.latent.shape[1] - 1]  # [B, L_keep]
        return head(enc.latent[:, 1:]), keep

    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 46) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        out, keep = logits(x_train[idx], args.mask_ratio)
        loss = F.cross_entropy(out.flatten(0, 1), y_train[idx].flatten(1).gather(1, keep).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([logits(x_test[a : a + 128])[0].argmax(-1) for a in range(0, len(x_test), 128)])  # [n, L]
    truth = y_test.flatten(1)
    shape = truth > 0
    out = {
        "variant": args.variant, "steps": args.steps, "batch": args.batch, "seed": args.seed, "full_res": args.full_res,
        "labels": args.labels, "prior": args.prior, "mask_ratio": args.mask_ratio, "lr": args.lr,
        "patch_accuracy": float((pred == truth).float().mean()),
        "shape_patch_accuracy": float((pred[shape] == truth[shape]).float().mean()),
        "shape_patches_called_background": float((pred[shape] == 0).float().mean()),
        "background_share": float((truth == 0).float().mean()),
        # the same predictions as a segmentation at patch resolution: IoU per class, averaged over the
        # classes present (the demo's 7 with background), all test patches pooled as the benchmarks pool pixels
        "patch_miou": patch_miou(pred, truth, len(CLASSES)),
        "shape_patches_predicted": dict(zip(CLASSES[1:], torch.bincount(pred[shape], minlength=len(CLASSES))[1:].tolist())),
        "shape_patches_true": dict(zip(CLASSES[1:], torch.bincount(truth[shape], minlength=len(CLASSES))[1:].tolist())),
    }
    if args.split:

        def patch_logits(x: torch.Tensor) -> torch.Tensor:
            g = (x.shape[-2] // arch.patch_size, x.shape[-1] // arch.patch_size)
            out, keep = logits(x)  # [B, L, K] in the order the encoder kept them
            ordered = torch.empty_like(out).scatter_(1, keep[..., None].expand_as(out), out)
            return ordered.transpose(1, 2).reshape(len(x), len(CLASSES), *g)

        out["split_miou"] = split_miou(patch_logits, args.split, arch.img_size, load_params(args.params).eval)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    emit(out, args.json)


if __name__ == "__main__":
    main()
