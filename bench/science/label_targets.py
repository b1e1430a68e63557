"""Diagnostic: the student trained on targets that name every cell right (labels, not the method).

The student names the demo's shapes badly. Either its targets are the limit (the teacher's
views name a shape cell about two times in three and share a large common component) or the
student is (its size, its budget, its loss). This separates the two: it copies the cache and
replaces every grid view with the text embedding of what the cell holds, from the teacher's class
embeddings ("a photo of a {}.", background included). `--rule mixture`: the classes' embeddings
averaged with the weights of their pixel shares in the cell, renormalised (a cell a star covers
to 40% is mostly background). `--rule object`: the embedding of the cell's largest shape when it
covers at least `--min-share` of the cell, else background's: what a CLIP teacher says of a
crop, where an object in view names it whatever its area. The demo's training scenes are regenerated from
`data.demo_seed` to get their masks. A student trained on the copy with the default recipe
then meets targets that are right by construction and live in the same text space; if it still
names the shapes no better than the teacher alone, the targets are not what holds it back.
It uses ground truth: a diagnostic only, never a recipe.

    python -m bench.science.label_targets --out caches/labels.zarr
    zeroseg train --cache caches/labels.zarr --out /tmp/labels
    zeroseg evaluate --checkpoint /tmp/labels/checkpoint.pt --set "eval.datasets={demo: data/demo_val}"
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import zarr

import cache_schema as cs
from bench.harness import emit, parser
from pipeline.cache.identity import find_store
from pipeline.clip.model import Teacher
from pipeline.clip.text import ClassEmbedder, template_set
from pipeline.config import load_params
from pipeline.core.views import cell_edges
from pipeline.demo.data import CLASSES, make_scene
from pipeline.student.anchors import anchor_prior


def cell_shares(mask: np.ndarray, g: int, num_classes: int) -> np.ndarray:
    """[g*g, K] each class's share of the pixels of every cell of a g x g grid over a square mask, row-major."""
    side = mask.shape[0]
    edges = cell_edges(side, g)
    out = np.zeros((g * g, num_classes))
    for r in range(g):
        for c in range(g):
            cell = mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
            out[r * g + c] = np.bincount(cell.ravel(), minlength=num_classes)[:num_classes] / cell.size
    return out


def class_text(params) -> np.ndarray:
    """[K, D] the teacher's unit text embeddings of the demo's classes, background first, prompt "a photo of a {}."."""
    with torch.inference_mode():
        return ClassEmbedder(Teacher.load(params.teacher))(list(CLASSES), template_set("single")).float().numpy()


def word_cosines(group: zarr.Group, g: int, text: np.ndarray, prior: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Every cache row's gxg views' cosines to the class words `text` [K, D]: [N, g*g, K], less
    `loss.anchor_prior`'s [K] prior (`anchors.anchor_prior` over all rows, "background" the
    background word) with prior "balance"; and that prior (zeros with "none")."""
    views = torch.nn.functional.normalize(torch.from_numpy(group[cs.views_array(g)][:].astype(np.float32)), dim=-1)  # [N, g*g, D]
    words = torch.from_numpy(text)
    bias = torch.zeros(len(words))
    if prior == "balance":
        bias = anchor_prior(views.flatten(0, 1), words, torch.tensor([name == "background" for name in CLASSES]))
    return (views @ words.T - bias).numpy(), bias.numpy()


def training_masks(params, group: zarr.Group, store: str, scenes: int | None = None) -> tuple[list[np.ndarray], dict[int, int]]:
    """The demo's training masks, regenerated from `data.demo_seed` (the first `scenes`, default all),
    and each scene's row in the cache `group`.

    Raises:
        SystemExit: the cache's images are not the demo's scenes.
    """
    d = params.data
    paths, status = group[cs.PATHS][:], group[cs.STATUS][:]
    rng = np.random.default_rng(d.demo_seed)  # the scenes in the order demo-data drew them
    masks = [make_scene(rng, d.demo_size)[1] for _ in range(min(scenes or d.demo_train, d.demo_train))]
    rows = {int(Path(str(p)).stem.rsplit("_", 1)[1]): i for i, p in enumerate(paths) if status[i] == cs.STATUS_OK}
    if sorted(rows) != list(range(len(rows))) or len(rows) > d.demo_train:
        raise SystemExit(f"{store}: its images are not the demo's scene_000000.jpg... (data.demo_train {d.demo_train})")
    return masks, rows


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="", help="the source cache (default: the one teacher-cache built for the params)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rule", choices=["mixture", "object"], default="object")
    ap.add_argument("--min-share", type=float, default=0.1, help="--rule object: the least share of a cell a shape must cover to name it")
    args = ap.parse_args()
    params = load_params(args.params)
    source = args.cache or find_store(params, progress=False)
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(source, args.out)
    group = zarr.open_group(str(args.out), mode="r+")
    text = class_text(params)  # [K, D], background first
    masks, rows = training_masks(params, group, source)
    for g in cs.store_grids(group):
        array = group[cs.views_array(g)]
        views = array[:]
        for scene, row in rows.items():
            shares = cell_shares(masks[scene], g, len(CLASSES))  # [g*g, K]
            if args.rule == "object":
                shape = 1 + shares[:, 1:].argmax(axis=1)  # the largest shape of each cell
                label = np.where(shares[np.arange(len(shares)), shape] >= args.min_share, shape, 0)
                shares = np.eye(len(CLASSES))[label]
            mixed = shares @ text  # [g*g, D]
            views[row] = (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(views.dtype)
        array[:] = views
    group.attrs["label_targets"] = "bench.science.label_targets: views replaced by the class text embeddings of each cell's ground truth"
    emit({"cache": str(args.out), "rule": args.rule, "min_share": args.min_share, "rows": len(rows), "grids": list(cs.store_grids(group)),
          "mean_pairwise_text_cosine": round(float((text @ text.T)[np.triu_indices(len(text), 1)].mean()), 3)}, args.json)


if __name__ == "__main__":
    main()
