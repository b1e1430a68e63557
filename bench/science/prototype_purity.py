"""How much of the demo's shapes do the teacher's prototypes carry? The ceiling of `loss.*_prototypes`.

The prototype terms train on pseudo-labels: each view's nearest of K prototypes, taken by
spherical k-means of the cache's view residuals exactly as training takes them. This runs the
teacher on the 2x2, 3x3 and 4x4 cells of the labelled validation scenes, keeps the cells that one
class covers to at least `--dominance`, and asks, on the cells of shape-dominated scenes' second
half, how often:
- the cell's prototype, labelled with the majority class of its cells in the first half, is right
  (what the pseudo-labels can teach at best);
- the teacher's own text zero-shot (the class words, "background" among them) is right;
- a linear probe on the raw views is right (what the views carry).

    python -m bench.science.prototype_purity --prototypes 16,64,256
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import emit, parser
from bench.science.probe import probe
from pipeline.cache.identity import find_store
from pipeline.config import load_params
from pipeline.core.decode import load_rgb
from pipeline.core.views import make_views, view_layout
from pipeline.demo.data import CLASSES
from pipeline.evaluation.datasets import open_dataset
from pipeline.evaluation.models import load_model
from pipeline.student.losses import local_view_mask
from pipeline.student.prototypes import residuals, view_prototypes
from pipeline.training.data import teacher_sample, teacher_statistics

GRIDS = (2, 3, 4)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", default="models/student/checkpoint.pt", help="any trained student: only its teacher is used")
    ap.add_argument("--data", default="data/demo_val", help="a demo split with masks (eval/)")
    ap.add_argument("--prototypes", default="16,64,256")
    ap.add_argument("--dominance", type=float, default=0.6)
    args = ap.parse_args()
    params = load_params(args.params)
    loaded = load_model(params, args.checkpoint)
    teacher, k = loaded.teacher, len(CLASSES)
    samples = list(open_dataset("demo", args.data))
    views, labels, shares, first = [], [], [], []
    for i, sample in enumerate(samples):
        rgb = torch.from_numpy(np.asarray(load_rgb(sample.image_path)).copy())  # [S, S, 3]
        views.append(teacher.encode(make_views([rgb], GRIDS, teacher.spec)[0]))  # [V, D]
        side = rgb.shape[0]
        for g, r, c in view_layout(GRIDS):
            e = [round(j * side / g) for j in range(g + 1)]
            cell = sample.mask[e[r] : e[r + 1], e[c] : e[c + 1]].ravel()
            counts = np.bincount(cell[cell < k], minlength=k)
            labels.append(int(counts.argmax()))
            shares.append(counts.max() / max(1, counts.sum()))
            first.append(i < len(samples) // 2)
    x = torch.cat(views)  # [n_cells, D]
    y, first = torch.tensor(labels), torch.tensor(first)
    dominated = torch.tensor(shares) >= args.dominance
    test = ~first & dominated & (y > 0)  # shape-dominated cells of the second half
    text = loaded.embedder(list(CLASSES), ["a photo of a {}."])  # [K, D]
    report = {
        "scenes": len(samples), "shape_cells_tested": int(test.sum()), "dominance": args.dominance,
        "text_zero_shot": float(((F.normalize(x, dim=-1) @ text.T).argmax(1)[test] == y[test]).float().mean()),
        "linear_probe_views": probe(x[first & dominated], y[first & dominated], x[test], y[test], k),
    }
    grids = tuple(sorted(set(params.loss.grids)))
    sample = teacher_sample(find_store(params), grids, params.loss.target_stats_rows)  # as training takes it
    mean, _ = teacher_statistics(sample)
    local = sample[:, local_view_mask(grids)].flatten(0, 1)
    for count in (int(n) for n in args.prototypes.split(",")):
        member = (residuals(x, mean) @ view_prototypes(local, mean, count, seed=params.train.seed).T).argmax(1)  # [n_cells]
        named = torch.zeros(count, dtype=torch.long)
        for j in range(count):
            mine = y[first & dominated & (member == j)]
            named[j] = torch.bincount(mine, minlength=k).argmax() if len(mine) else 0
        report[f"prototypes_{count}"] = float((named[member][test] == y[test]).float().mean())
    emit(report, args.json)


if __name__ == "__main__":
    main()
