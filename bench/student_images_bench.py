"""Stored student images (`cache.student_image_size`): their size, and stage two's read speed.

One run measures, on the same images:
- size: bytes stored per image in `images/S` (lossless: byte deltas + zstd) against the raw
  3*S*S bytes and against the source files;
- stage one's extra work: adding `images/S` to a finished store (decode, resize, compress, write;
  the teacher does not run again);
- stage two's reads, one process, no DataLoader workers: `CachePairs` images/s with
  `train.images=cache` against `train.images=decode` (decode + resize of every source file),
  the targets read in both. The ratio is what a DataLoader worker gains per core.

    python -m bench.student_images_bench --images 512                        # generated 500x375 JPEGs
    python -m bench.student_images_bench --images 96 --width 4032 --height 3024
    python -m bench.student_images_bench --folder data/demo/images --size 64   # any image folder

The generated images are smooth colour fields plus per-pixel noise (bench/teacher_cache_bench.py):
the noise makes them harder to compress than most photos, so their size is a pessimistic figure.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

import cache_schema as cs
from bench.harness import emit, parser
from bench.teacher_cache_bench import make_images
from pipeline.config import load_params
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.data import CachePairs


def read_rate(store: str, folder: Path, size: int, source: str, repeats: int) -> tuple[float, int]:
    """(images/s, rows) of one pass over `CachePairs` with the given image source (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        pairs = CachePairs(store, folder, (1,), size, shuffle_buffer=256, images=source)
        t0 = time.perf_counter()
        rows = sum(1 for _ in pairs)
        best = min(best, time.perf_counter() - t0)
    return rows / best, rows


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--folder", type=Path, help="measure on this image folder instead of generated JPEGs")
    ap.add_argument("--images", type=int, default=512, help="generated images (without --folder)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--size", type=int, default=224, help="the student's input side")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "images"
            make_images(folder, args.images, args.width, args.height)
        files = [p for p in folder.rglob("*") if p.is_file()]
        base = [f"data.images={folder}", "data.manifest_hash=stat", "teacher.model=zeroseg-test-vit", "teacher.pretrained=",
                "teacher.device=cpu", "teacher.precision=fp32", "cache.grids=[1]", "cache.shard_rows=256", "cache.chunk_rows=64"]
        store = f"{tmp}/cache.zarr"
        run_teacher_cache(load_params(None, base), store, progress=False)
        t0 = time.perf_counter()
        added = run_teacher_cache(load_params(None, [*base, f"cache.student_image_size={args.size}"]), store, progress=False)
        add_s = time.perf_counter() - t0
        arr = zarr.open_group(store, mode="r")[cs.images_array(args.size)]
        ok = int(np.sum(zarr.open_group(store, mode="r")[cs.STATUS][:] == cs.STATUS_OK))
        stored = arr.nbytes_stored() / max(1, ok)
        cache_rate, rows = read_rate(store, folder, args.size, "cache", args.repeats)
        decode_rate, _ = read_rate(store, folder, args.size, "decode", args.repeats)
        report = {
            "images": ok,
            "source": str(args.folder) if args.folder else f"generated {args.width}x{args.height} JPEG q90",
            "size": args.size,
            "bytes_per_image_stored": stored,
            "bytes_per_image_raw": 3 * args.size * args.size,
            "compression_ratio": 3 * args.size * args.size / stored,
            "source_bytes_per_image": sum(p.stat().st_size for p in files) / max(1, len(files)),
            "stage_one_add_images_per_s": ok / add_s,
            "stage_one_add_views_computed": added.views_computed,
            "read_rows": rows,
            "read_cache_images_per_s": cache_rate,
            "read_decode_images_per_s": decode_rate,
            "read_ratio_cache_over_decode": cache_rate / decode_rate,
        }
    emit(report, args.json)


if __name__ == "__main__":
    main()
