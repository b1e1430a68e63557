"""Compression of the cache's float16 views: ratio and write/read speed per codec, in one run.

Reads the views of an existing store (default: the demo's caches/teacher.zarr) and rewrites
them with each candidate codec into temporary stores, timing whole-array writes and reads; the
last candidate is the default with the crc32c chunk checksum every new store carries.

    python -m bench.codec_bench [STORE] [--grid 4]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from bench.harness import emit, parser

CANDIDATES = {
    "none": [],
    "zstd-1": [zarr.codecs.ZstdCodec(level=1)],
    "zstd-3": [zarr.codecs.ZstdCodec(level=3)],
    "zstd-9": [zarr.codecs.ZstdCodec(level=9)],
    "blosc-zstd-3-shuffle": [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)],
    "blosc-lz4-5-shuffle": [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)],
    # the default with its chunk checksum, as new stores write it (the cost of integrity)
    "blosc-zstd-3-shuffle+crc32c": [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), zarr.codecs.Crc32cCodec()],
}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("store", nargs="?", default="caches/teacher.zarr")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    src = zarr.open_group(args.store, mode="r")[f"views/{args.grid}x{args.grid}"]
    data = src[:]  # [N, g*g, D] float16
    raw = data.nbytes
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, codecs in CANDIDATES.items():
            path = Path(tmp) / f"{name}.zarr"
            arr = zarr.create_array(path, shape=data.shape, dtype="float16", chunks=src.chunks, shards=src.shards, compressors=codecs)
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                arr[:] = data
            write = (time.perf_counter() - t0) / args.repeat
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                back = arr[:]
            read = (time.perf_counter() - t0) / args.repeat
            assert np.array_equal(back, data, equal_nan=True)
            results[name] = {"ratio": raw / du(path), "write_MBps": raw / write / 1e6, "read_MBps": raw / read / 1e6}
    emit({"store": args.store, "array": src.path, "shape": list(data.shape), "raw_MB": raw / 1e6, "codecs": results}, args.json)


if __name__ == "__main__":
    main()
