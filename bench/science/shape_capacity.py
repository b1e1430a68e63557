"""Can the demo student's encoder tell the shapes apart when it is told to? A capacity check.

Issue 14's diagnosis: the trained student's segment embeddings do not separate the demo's six
shapes (a linear probe reaches 24%, chance 17%). Either the encoder cannot see shape at the
student's input size and budget, or distillation never asks it to. This trains the same
encoder (`student.variant`, no decoder, no grouping head) with labels for the same budget
(552 steps of 64 scenes) to classify every patch by the majority class of its pixels, and
reports patch accuracy on held-out scenes, on patches owned by a shape (chance 1/6) and overall.
A high figure means the encoder can see shape at this size and budget, and the gap is in what
training asks of it.

    python -m bench.science.shape_capacity --variant zeroseg_tiny --steps 552
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.demo.data import CLASSES, make_scene
from pipeline.student import ZeroSegStudent, student_arch
from pipeline.student.normalize import normalize_images
from bench.harness import emit, parser


def scenes(n: int, seed: int, side: int, patch: int, full_res: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n demo scenes at the student's side: uint8 images [n, 3, S, S] and patch labels [n, S/p, S/p]
    (the majority class of each patch's pixels, from the full-resolution mask). `full_res`: instead
    of the whole 128-px scene resized to S (as training sees it), one S-px quadrant of it at full
    resolution (the scale of the evaluation's windows), the quadrants taken in turn."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    g = side // patch
    for i in range(n):
        img, mask, _ = make_scene(rng, 128)
        if full_res:
            x, y = i % 2 * side, i // 2 % 2 * side
            img, mask = img.crop((x, y, x + side, y + side)), mask[y : y + side, x : x + side]
        images.append(np.asarray(img if full_res else img.resize((side, side), Image.BICUBIC)))
        cell = mask.shape[0] // g
        blocks = mask.reshape(g, cell, g, cell).transpose(0, 2, 1, 3).reshape(g, g, -1)
        labels.append(np.apply_along_axis(lambda b: np.bincount(b, minlength=len(CLASSES)).argmax(), 2, blocks))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(labels)).long()


def patch_miou(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Mean IoU over the classes present in `truth` of patch predictions (any equal shapes)."""
    ious = []
    for k in range(classes):
        union = ((pred == k) | (truth == k)).sum()
        if (truth == k).any():
            ious.append(float(((pred == k) & (truth == k)).sum() / union))
    return sum(ious) / len(ious)


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
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    arch = student_arch(args.variant)
    t0 = time.perf_counter()
    x_train, y_train = scenes(args.train, args.seed, arch.img_size, arch.patch_size, args.full_res)
    x_test, y_test = scenes(args.test, args.seed + 1000, arch.img_size, arch.patch_size, args.full_res)
    model = ZeroSegStudent(arch=arch, out_dim=8)
    head = torch.nn.Linear(arch.embed_dim, len(CLASSES))
    params = [p for n, p in model.named_parameters() if n.startswith(("patch_embed", "blocks", "norm", "cls_token"))] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        latent = model.forward_encoder(normalize_images(x), 0.0).latent[:, 1:]  # [B, L, C] patch order
        return head(latent)  # [B, L, K]

    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 46) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        loss = F.cross_entropy(logits(x_train[idx]).flatten(0, 1), y_train[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([logits(x_test[a : a + 128]).argmax(-1) for a in range(0, len(x_test), 128)])  # [n, L]
    truth = y_test.flatten(1)
    shape = truth > 0
    out = {
        "variant": args.variant, "steps": args.steps, "batch": args.batch, "seed": args.seed, "full_res": args.full_res,
        "patch_accuracy": float((pred == truth).float().mean()),
        "shape_patch_accuracy": float((pred[shape] == truth[shape]).float().mean()),
        "shape_patches_called_background": float((pred[shape] == 0).float().mean()),
        "background_share": float((truth == 0).float().mean()),
        # the same predictions as a segmentation at patch resolution: IoU per class, averaged over the
        # classes present (the demo's 7 with background), all test patches pooled as the benchmarks pool pixels
        "patch_miou": patch_miou(pred, truth, len(CLASSES)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
