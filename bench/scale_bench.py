"""How the costs that touch every row grow with the dataset: 1k to 1.28M rows (ImageNet-1k).

No model runs. For each N the benchmark makes N tiny image files (hard links of one 64-byte
file per folder of 1,000, so 1.28M of them cost directory entries, not 5 GB of blocks) and a
list file naming them, then measures, each step in a fresh child process (its peak resident
memory is the step's):

- `manifest_stat`, `manifest_content`, `manifest_memoized`: listing and hashing the list file
  (`data.manifest_hash: stat`; `content` with an empty hash memo, so every file is opened and
  read; `content` again, answered by the memo);
- `create_store`: a new store with the per-row arrays, grids 1 and 2 and 8-px student images;
- `write`: every shard written through the real writer (`CacheStore.write_shard`, markers
  after data) with synthetic embeddings (D = `--dim`, random float16) and images;
- `open_store`: opening the finished store for these params (fingerprint, layout, arrays);
- `resume_scan`: the progress-marker scan a rerun does (`CacheStore.missing`);
- `cache_info`, `validate`, `validate_deep`: `zeroseg cache info`, `cache validate`,
  `cache validate --deep` (every shard read, checksums checked);
- `reader_start`: stage two's reader up to its first row (status and paths read, chunks dealt,
  the first chunks decoded into the shuffle buffer), and `reader`: its rows/s over up to 50k rows.

Prints one JSON report (seconds, microseconds per row, peak MB per step and N) and, with
`--plot`, draws microseconds per row against N on log axes: a flat line is linear growth.

    python -m bench.scale_bench --sizes 1000,10000,100000,1280000 --work /tmp/scale --plot docs/img/scale.png
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench.harness import emit, in_fresh_process, parser, reset_peak_kib, status_kib

STEPS = ("manifest_stat", "manifest_content", "manifest_memoized", "create_store", "write", "open_store", "resume_scan",
         "cache_info", "validate", "validate_deep", "reader_start", "reader")
GRIDS = (1, 2)
IMAGE_SIDE = 8


def make_files(work: Path, n: int) -> Path:
    """N hard links of one tiny file, 1,000 per folder, and a list file of their paths."""
    files = work / "files"
    listing = work / "list.txt"
    if listing.is_file() and sum(1 for _ in listing.open()) == n:
        return listing
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    lines = []
    for i in range(n):
        folder = files / f"{i // 1000:05d}"
        if i % 1000 == 0:  # one seed file per folder: a file takes at most 65,000 links on ext4
            folder.mkdir()
            seed = folder / "seed.bin"
            seed.write_bytes(bytes(range(64)))
        path = folder / f"img_{i:07d}.jpg"
        os.link(seed, path)
        lines.append(f"{path}\n")
    listing.write_text("".join(lines))
    return listing


def _cache_config():
    from pipeline.config import CacheConfig

    return CacheConfig(root="", grids=GRIDS, chunk_rows=64, shard_rows=256, student_image_size=IMAGE_SIDE)


def _identity(manifest, dim: int) -> dict:
    return {
        "teacher": {"library": "synthetic", "model": "none", "pretrained": "", "embed_dim": dim},
        "preprocessing": {"version": 1, "size": IMAGE_SIDE},
        "manifest": {"hash": manifest.hash, "hash_mode": manifest.hash_mode, "n": len(manifest)},
    }


def step(name: str, work: str, n: int, dim: int) -> dict:
    """Run one step in this (child) process; returns its seconds, peak RSS and figures."""
    os.environ["ZEROSEG_STATE_DIR"] = str(Path(work) / "state")  # the content-hash memo of this N
    import numpy as np

    import cache_schema as cs
    from pipeline.cache.info import describe
    from pipeline.cache.manifest import build_manifest
    from pipeline.cache.policy import open_or_create
    from pipeline.cache.store import ShardResult
    from pipeline.training.data import CachePairs

    work = Path(work)
    listing, url = work / "list.txt", str(work / "store.zarr")
    extra: dict = {}
    base_rss = reset_peak_kib()
    t0 = time.perf_counter()
    if name == "manifest_stat":
        build_manifest(listing, "stat", progress=False)
    elif name == "manifest_content":
        shutil.rmtree(work / "state", ignore_errors=True)
        t0 = time.perf_counter()
        build_manifest(listing, "content", progress=False)
    elif name == "manifest_memoized":
        build_manifest(listing, "content", progress=False)
    else:
        manifest = build_manifest(listing, "stat", progress=False)
        identity, cfg = _identity(manifest, dim), _cache_config()
        del manifest  # the step's memory is its own, not the manifest's
        paths = list(_paths(listing))
        base_rss = reset_peak_kib()
        t0 = time.perf_counter()
        if name == "create_store":
            shutil.rmtree(url, ignore_errors=True)
            t0 = time.perf_counter()
            open_or_create(url, identity, paths, GRIDS, cfg)
        elif name == "write":
            store = open_or_create(url, identity, paths, GRIDS, cfg)
            rng = np.random.default_rng(0)
            for shard in range(store.n_shards):
                rows = len(store.shard_rows_range(shard))
                store.write_shard(ShardResult(
                    shard=shard,
                    views={g: rng.standard_normal((rows, g * g, dim)).astype(np.float16) for g in GRIDS},
                    status=np.full(rows, cs.STATUS_OK, np.uint8),
                    failures=[""] * rows,
                    images=np.full((rows, 3, IMAGE_SIDE, IMAGE_SIDE), 128, np.uint8),
                ))
            store.finalize()
        elif name == "open_store":
            open_or_create(url, identity, paths, GRIDS, cfg)
        elif name == "resume_scan":
            store = open_or_create(url, identity, paths, GRIDS, cfg)
            t0 = time.perf_counter()
            extra["shards_left"] = len(store.missing(GRIDS, IMAGE_SIDE))
        elif name == "cache_info":
            describe(url)
        elif name == "validate":
            cs.validate(url, identity, GRIDS)
        elif name == "validate_deep":
            extra["damaged"] = len(cs.find_damage(url))
        elif name in ("reader_start", "reader"):
            pairs = CachePairs(url, listing.parent, GRIDS, IMAGE_SIDE, shuffle_buffer=2048, images="cache")
            rows = iter(pairs)
            next(rows)
            if name == "reader":
                t0 = time.perf_counter()
                limit = min(n, 50_000) - 1
                for i, _ in enumerate(rows, start=1):
                    if i >= limit:
                        break
                extra["rows_per_s"] = limit / (time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"s": seconds, "us_per_row": seconds / n * 1e6, "peak_mb": peak / 1024, "step_mb": max(0, peak - base_rss) / 1024, **extra}


def _paths(listing: Path):
    for line in listing.read_text().splitlines():
        yield line


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="1000,10000,100000,1280000", help="row counts, comma-separated")
    ap.add_argument("--dim", type=int, default=16, help="embedding width of the synthetic views (the costs measured are per row)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zeroseg-scale"), help="scratch folder (files, stores, hash memo)")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--keep", action="store_true", help="keep each N's files and store")
    ap.add_argument("--plot", type=Path, help="write microseconds per row against N here (PNG)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = args.steps.split(",")
    report: dict = {"dim": args.dim, "grids": list(GRIDS), "image_side": IMAGE_SIDE, "chunk_rows": 64, "shard_rows": 256,
                    "cpus": os.cpu_count(), "sizes": {}}
    for n in sizes:
        work = args.work / str(n)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_files(work, n)
        figures = {"make_files_s": time.perf_counter() - t0}
        for name in steps:
            figures[name] = in_fresh_process(step, name, str(work), n, args.dim)  # a fresh process: its own peak memory
            print(f"N={n} {name}: {figures[name]}", flush=True)
        report["sizes"][str(n)] = figures
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit(report, args.json)
    if args.plot:
        plot(report, args.plot)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in report["sizes"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in STEPS:
        if name == "reader":
            ys = [1e6 / report["sizes"][str(n)][name]["rows_per_s"] for n in sizes if name in report["sizes"][str(n)]]
        else:
            ys = [report["sizes"][str(n)][name]["us_per_row"] for n in sizes if name in report["sizes"][str(n)]]
        if ys:
            ax.plot(sizes[: len(ys)], ys, marker="o", label=name if name != "reader" else "reader (per row read)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows (images)")
    ax.set_ylabel("microseconds per row")
    ax.set_title("Cost per row against dataset size (flat = linear)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
