"""How right are the pseudo-labels the anchor terms teach? The ceiling of `loss.token_anchors`.

`loss.token_anchors` asks each visible token for its cells' softmax over the teacher's text
embeddings of a vocabulary; at a small `loss.anchor_tau` that is the argmax, a hard
pseudo-label (MaskCLIP+'s, from dense features). This takes the cache's views of one grid (the
8x8 dense grid of `cache.dense_grids`, or any cached grid), names each with its
argmax over the demo's class words ("background" among them), and compares with the majority
class of the cell's pixels in the training scene, regenerated from `data.demo_seed` (the
masks diagnose, they never train). It prints, per grid, the share of shape-majority cells named
right, of background cells called background, the cell mIoU over the seven classes, and how
often each word is predicted against how often it is the truth.

`--prior balance` first takes `loss.anchor_prior: balance`'s prior (`anchors.anchor_prior`, from
every row of the grid, "background" the background word) out of the cosines, as the anchor
terms' targets then are.

    python -m bench.science.anchor_labels --grids 8,4,2 --scenes 600 [--prior balance]
"""

from __future__ import annotations

import numpy as np
import zarr

from bench.harness import emit, parser
from bench.science.label_targets import (
    cell_shares,
    class_text,
    training_masks,
    word_cosines,
)
from pipeline.cache.identity import find_store
from pipeline.config import load_params
from pipeline.demo.data import CLASSES


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="", help="the cache (default: the one teacher-cache built for the params)")
    ap.add_argument("--grids", default="8,4,2", help="comma-separated grids of the cache to score")
    ap.add_argument("--scenes", type=int, default=600, help="the first N training scenes")
    ap.add_argument("--prior", choices=("none", "balance"), default="none", help="loss.anchor_prior's prior out of the cosines first")
    args = ap.parse_args()
    params = load_params(args.params)
    store = args.cache or find_store(params, progress=False)
    group = zarr.open_group(str(store), mode="r")
    text = class_text(params)  # [K, D]
    masks, rows = training_masks(params, group, store, args.scenes)
    k = len(CLASSES)
    report: dict = {"cache": str(store), "scenes": len(masks), "classes": list(CLASSES), "prior": args.prior}
    for g in (int(x) for x in args.grids.split(",")):
        cosines, prior = word_cosines(group, g, text, args.prior)  # [N, g*g, K], [K]
        confusion = np.zeros((k, k), dtype=np.int64)  # [true, predicted]
        for scene, mask in enumerate(masks):
            predicted = cosines[rows[scene]].argmax(axis=1)  # [g*g]
            truth = cell_shares(mask, g, k).argmax(axis=1)
            np.add.at(confusion, (truth, predicted), 1)
        hits = np.diag(confusion)
        iou = hits / np.maximum(confusion.sum(0) + confusion.sum(1) - hits, 1)
        report[f"grid_{g}"] = {
            "shape_cells_right": float(hits[1:].sum() / max(confusion[1:].sum(), 1)),
            "background_cells_right": float(hits[0] / max(confusion[0].sum(), 1)),
            "cell_miou": float(iou.mean()),
            "prior": dict(zip(CLASSES, np.round(prior, 4).tolist())),
            "predicted": dict(zip(CLASSES, confusion.sum(0).tolist())),
            "true": dict(zip(CLASSES, confusion.sum(1).tolist())),
        }
    emit(report, args.json)


if __name__ == "__main__":
    main()
