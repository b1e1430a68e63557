"""Decoding large JPEGs for stage one with and without PIL's draft mode, in one run.

Writes camera-sized JPEGs (4032x3024 by default: a phone photo), then times, per image, the
work a decode thread does: `decode_center_square` and cutting the 30 views (grids 1-4 at the
teacher's input size). Draft mode (`teacher.jpeg_draft_side`) lets libjpeg decode at 1/2, 1/4
or 1/8 scale while the center square keeps at least largest grid x input size, so no cell is
upsampled. Prints images/s of both, the ratio, and how far the views moved (8-bit levels).

    python -m bench.decode_bench [--images 12] [--width 4032 --height 3024] [--size 224]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.decode import decode_center_square
from pipeline.core.views import ViewSpec, make_views
from bench.harness import emit, parser

GRIDS = (1, 2, 3, 4)


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields with fine noise: compresses like a photo, not like flat colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    a, b, c = rng.uniform(2, 9, 3)
    img = np.stack([np.sin(a * x + c) * np.cos(b * y), np.cos(b * x * y * 3), np.sin((a + b) * (x - y))], -1)
    img = 128 + 90 * img + rng.normal(0, 6, (height, width, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def run(paths: list[Path], spec: ViewSpec, draft_side: int) -> tuple[float, list[torch.Tensor], int]:
    """Seconds for decode + views over `paths`, the views, and the decoded square's side."""
    t0 = time.perf_counter()
    views, side = [], 0
    for p in paths:
        d = decode_center_square(p, draft_side=draft_side)
        side = d.square.shape[0]
        views.append(make_views([torch.from_numpy(d.square)], GRIDS, spec)[0])
    return time.perf_counter() - t0, views, side


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--width", type=int, default=4032)
    ap.add_argument("--height", type=int, default=3024)
    ap.add_argument("--size", type=int, default=224, help="teacher input size (ViT-L-14: 224)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a decode worker uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ViewSpec(size=args.size, interpolation="bicubic", mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # views in levels
    draft_side = max(GRIDS) * args.size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            paths.append(Path(tmp) / f"photo_{i:03d}.jpg")
            Image.fromarray(photo(rng, args.width, args.height)).save(paths[-1], quality=90)
        run(paths[:1], spec, 0)  # warm-up
        full_s, full_views, full_side = run(paths, spec, 0)
        draft_s, draft_views, draft_side_got = run(paths, spec, draft_side)
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(full_views, draft_views)])
    result = {
        "images": args.images, "source": f"{args.width}x{args.height}", "views_per_image": sum(g * g for g in GRIDS),
        "teacher_size": args.size, "draft_side": draft_side, "square_full": full_side, "square_draft": draft_side_got,
        "full_img_per_s": args.images / full_s, "draft_img_per_s": args.images / draft_s, "speedup": full_s / draft_s,
        "view_diff_mean_levels": float(diff.mean()), "view_diff_p99_levels": float(np.percentile(diff.numpy(), 99)),
    }
    print(f"decode + 30 views at {args.size} px, {args.images} JPEGs {args.width}x{args.height}, {args.threads} thread(s):")
    print(f"  full decode   {result['full_img_per_s']:7.2f} img/s  (square {full_side} px)")
    print(f"  draft mode    {result['draft_img_per_s']:7.2f} img/s  (square {draft_side_got} px, at least {draft_side})")
    print(f"  speedup       {result['speedup']:7.2f}x; views differ by {result['view_diff_mean_levels']:.2f} levels on average (p99 {result['view_diff_p99_levels']:.1f})")
    emit(result, args.json)


if __name__ == "__main__":
    main()
