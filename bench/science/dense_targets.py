"""The teacher's dense features as the student's targets: a copy of the cache with them as a grid.

MaskCLIP on the demo's ResNet teacher (`eval.baselines: maskclip`) names the validation scenes
far better than the teacher's grid cells do, so its per-location embeddings are a candidate
target that follows every patch. This writes a copy of a cache whose extra `views/GxG` array
holds, for each image, the teacher's MaskCLIP embeddings of the whole image at `--side` px
(`resnet_value_features`: a G x G map for a side of 32 G) instead of G x G crops. The existing
terms then read them as one more grid: `loss.region_grids: [G]` makes every segment's region
target the mean of the dense embeddings under it, and `loss.token_distill` asks every visible
token for its own location's.

    python -m bench.science.dense_targets --out caches/dense.zarr --side 256
    zeroseg train --cache caches/dense.zarr --out /tmp/dense --set "loss.grids=[1,2,3,4,8]" --set "loss.region_grids=[8]"
    zeroseg evaluate --checkpoint /tmp/dense/checkpoint.pt --set "eval.datasets={demo: data/demo_val}"

The copy is for this measurement only: its extra grid is not crops, so stage one's own checks do
not describe it (the identity and fingerprint are the source cache's).
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
from pipeline.config import load_params
from pipeline.core.decode import load_rgb
from pipeline.evaluation.baselines import _normalize, resnet_value_features
from pipeline.evaluation.inference import resize_short_side
from pipeline.training.run import data_root


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="", help="the source cache (default: the one teacher-cache built for the params)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--side", type=int, default=256, help="the teacher's input side for a whole image (a multiple of 32)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    params = load_params(args.params)
    source = args.cache or find_store(params, progress=False)
    grid = args.side // 32
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(source, args.out)
    teacher = Teacher.load(params.teacher)
    visual = teacher.model.visual.eval()
    group = zarr.open_group(str(args.out), mode="r+")
    paths, status = group[cs.PATHS][:], group[cs.STATUS][:]
    root = Path(data_root(params.data.images))
    dense = np.full((len(paths), grid * grid, teacher.identity.embed_dim), np.nan, np.float16)
    with torch.inference_mode():
        for a in range(0, len(paths), args.batch):
            rows = [i for i in range(a, min(a + args.batch, len(paths))) if status[i] == cs.STATUS_OK]
            if not rows:
                continue
            images = [resize_short_side(load_rgb(root / paths[i], exif=False), args.side) for i in rows]
            square = torch.stack([x[:, : args.side, : args.side] for x in images]).round_()  # the demo's scenes are square
            feats = resnet_value_features(visual, _normalize(teacher, square.to(teacher.device)).to(teacher.view_dtype))
            dense[rows] = feats.flatten(1, 2).cpu().numpy().astype(np.float16)
    array = group.create_array(cs.views_array(grid), shape=dense.shape, chunks=(group[cs.views_array(1)].chunks[0], grid * grid, dense.shape[-1]), dtype="float16", overwrite=True)
    array[:] = dense
    array.attrs.update({"grid": grid, "complete": True, "source": f"MaskCLIP dense features of the whole image at {args.side} px (bench.science.dense_targets)",
                        "boxes": [[r / grid, c / grid, (r + 1) / grid, (c + 1) / grid] for r in range(grid) for c in range(grid)],
                        "box_format": "top,left,bottom,right as fractions of the center square"})
    group.attrs["grids"] = sorted({*cs.store_grids(group), grid})
    emit({"cache": str(args.out), "grid": grid, "rows": int((status == cs.STATUS_OK).sum())}, args.json)


if __name__ == "__main__":
    main()
