"""Zero-shot inference throughput: images/s of the student segmenter at a short side (448 default).

Random weights (speed does not depend on them), generated 500x375 images, a vocabulary of
--classes random class embeddings; the full protocol runs: resize, sliding windows (448 window,
224 stride: 2 windows on a 448x597 image), grouping, classification, background rule, resize
back to the input's size.

    python -m bench.inference_bench --variant zeroseg_tiny --images 8            # CPU
    python -m bench.inference_bench --variant zeroseg_vit_b16 --device cuda --images 64
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.evaluation.protocol import StudentSegmenter
from pipeline.evaluation.vocabulary import Namer
from pipeline.student import ZeroSegStudent, student_arch
from bench.harness import emit, parser


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--variant", default="zeroseg_tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--window", type=int, default=448)
    ap.add_argument("--stride", type=int, default=224)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--dim", type=int, default=768)
    args = ap.parse_args()
    torch.manual_seed(0)
    student = ZeroSegStudent(arch=student_arch(args.variant), out_dim=args.dim).eval()
    text = F.normalize(torch.randn(args.classes, args.dim), dim=-1)
    seg = StudentSegmenter(student, short_side=args.short_side, window=args.window, stride=args.stride, device=args.device)
    namer = Namer("probability", text, 100.0, 0.5)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.images)]
    seg.predict(images[0], namer)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for image in images:
        seg.predict(image, namer)  # returns numpy: synchronizes
    dt = time.perf_counter() - t0
    emit({"variant": args.variant, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                      "short_side": args.short_side, "window": args.window, "stride": args.stride, "classes": args.classes,
                      "images": args.images, "images_per_s": args.images / dt, "ms_per_image": 1000 * dt / args.images}, args.json)


if __name__ == "__main__":
    main()
