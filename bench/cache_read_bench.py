"""Reading training targets from a teacher cache: whole chunks (stage two's way) vs row by row.

Stage two's dataset reads `chunk_rows` rows of every grid at once and shuffles across chunks
in a buffer (pipeline/training/data.py). The naive alternative, a map-style dataset, reads one
random row per sample. Both read the same number of rows of all grids from the same store in
one run; prints rows/s of each and the ratio.

    python -m bench.cache_read_bench [STORE] [--rows 2048] [--grids 1,2,3,4]
"""

from __future__ import annotations

import time

import numpy as np

import cache_schema as cs
from pipeline.cache.reader import load_targets
from bench.harness import emit, parser


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("store", nargs="?", default="caches/teacher.zarr")
    ap.add_argument("--rows", type=int, default=2048, help="rows read by each method")
    ap.add_argument("--grids", default="1,2,3,4")
    args = ap.parse_args()
    group = cs.open_store(args.store)
    grids = tuple(int(g) for g in args.grids.split(","))
    n = group[cs.STATUS].shape[0]
    chunk = int(group.attrs["layout"]["chunk_rows"])
    rows = min(args.rows, n)
    rng = np.random.default_rng(0)

    starts = rng.permutation(np.arange(0, n, chunk))[: -(-rows // chunk)]  # shuffled chunk order
    t0 = time.perf_counter()
    got = 0
    for a in starts:
        got += len(load_targets(group, grids, slice(int(a), min(n, int(a) + chunk))))
    chunked_s = time.perf_counter() - t0

    picks = rng.choice(n, size=rows, replace=False)  # a map-style dataset: one random row per sample
    t0 = time.perf_counter()
    for i in picks:
        load_targets(group, grids, slice(int(i), int(i) + 1))
    per_row_s = time.perf_counter() - t0

    v = sum(g * g for g in grids)
    result = {"store": args.store, "rows_in_store": n, "chunk_rows": chunk, "views": v,
              "chunked_rows_per_s": got / chunked_s, "per_row_rows_per_s": rows / per_row_s,
              "speedup": (got / chunked_s) / (rows / per_row_s)}
    print(f"{args.store}: {n} rows, chunks of {chunk}, {v} views per row")
    print(f"  whole chunks   {result['chunked_rows_per_s']:10.0f} rows/s ({got} rows)")
    print(f"  row by row     {result['per_row_rows_per_s']:10.0f} rows/s ({rows} rows)")
    print(f"  speedup        {result['speedup']:10.1f}x")
    emit(result, args.json)


if __name__ == "__main__":
    main()
