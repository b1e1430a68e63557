"""Stage one on dask: 1 vs 2 workers, and the dask path's overhead vs the local executor, in one run.

Three runs of `run_teacher_cache` on the same generated JPEGs, each in a process of its own and
writing a fresh store: the local executor, `teacher.executor=dask` with 1 worker, and with 2
workers (each a LocalCluster started by the run). Reported per run: the whole run's wall time
(what a user waits: cluster start and teacher loading included) and the compute phase (the
executor computing and writing the shards, from the first shard submitted to the last written),
with images/s for both. The three stores are checked to be byte-identical.

    python -m bench.dask_bench --model ViT-S-32 --images 96
    python -m bench.dask_bench --model zeroseg-test-vit --images 64      # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import child_result, emit, parser, run_child
from bench.teacher_cache_bench import make_images

RUNS = {"local": [], "dask_1": ["teacher.executor=dask", "teacher.dask_workers=1"], "dask_2": ["teacher.executor=dask", "teacher.dask_workers=2"]}


def child(args) -> None:
    """One run in this process; prints its figures as JSON on the last line."""
    from pipeline.teacher import dask_executor
    from pipeline.teacher import run as teacher_cache
    from pipeline.config import load_params

    phase: dict[str, float] = {}
    for cls in (teacher_cache.LocalExecutor, dask_executor.DaskExecutor):  # time the compute phase
        original = cls.run

        def timed(self, *a, _original=original, **kw):
            t0 = time.perf_counter()
            _original(self, *a, **kw)
            phase["compute_s"] = time.perf_counter() - t0

        cls.run = timed
    overrides = [
        f"data.images={args.images_dir}", "data.manifest_hash=stat",
        f"teacher.model={args.model}", "teacher.pretrained=", "teacher.precision=fp32", "teacher.device=cpu",
        f"teacher.batch_size={args.batch_size}", f"cache.shard_rows={args.shard_rows}", f"cache.chunk_rows={min(64, args.shard_rows)}",
        *RUNS[args.mode],
    ]
    stats = teacher_cache.run_teacher_cache(load_params(None, overrides), str(Path(args.workdir) / f"{args.mode}.zarr"), progress=False)
    assert stats.complete and stats.rows_computed == args.images, stats
    child_result({"wall_s": stats.wall_s, "compute_s": phase["compute_s"], "images": stats.rows_computed, "views": stats.views_computed,
                  "model_s": stats.model_s, "decode_s": stats.decode_s})


def same_bytes(a: Path, b: Path) -> bool:
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = ["status", "failures"] + [f"views/{g}x{g}" for g in (1, 2, 3, 4)]
    return all(np.array_equal(ga[n][:].view(np.uint16) if ga[n].dtype == np.float16 else ga[n][:],
                              gb[n][:].view(np.uint16) if gb[n].dtype == np.float16 else gb[n][:]) for n in names)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="ViT-S-32")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=16, help="images per shard: one dask task each")
    ap.add_argument("--mode", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        w, h = map(int, args.size.split("x"))
        make_images(Path(tmp) / "images", args.images, w, h)
        results = {}
        for mode in RUNS:
            r = run_child("bench.dask_bench", sys.argv[1:], mode, images_dir=Path(tmp) / "images", workdir=tmp)
            r.update(images_per_s=r["images"] / r["wall_s"], compute_images_per_s=r["images"] / r["compute_s"])
            results[mode] = r
        identical = all(same_bytes(Path(tmp) / "local.zarr", Path(tmp) / f"{m}.zarr") for m in ("dask_1", "dask_2"))
    local, one, two = results["local"], results["dask_1"], results["dask_2"]
    report = {
        "model": args.model, "images": args.images, "image_size": args.size, "shard_rows": args.shard_rows,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), **results,
        "speedup_2_vs_1_workers": one["wall_s"] / two["wall_s"],
        "speedup_2_vs_1_workers_compute": one["compute_s"] / two["compute_s"],
        "dask_1_overhead_vs_local": one["wall_s"] / local["wall_s"] - 1,
        "dask_1_overhead_vs_local_compute": one["compute_s"] / local["compute_s"] - 1,
        "stores_identical": identical,
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
