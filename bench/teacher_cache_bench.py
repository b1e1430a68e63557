"""Stage-one throughput: the pipelined batched path vs the naive per-crop loop, in one run.

Each side runs in its own process (whole process against whole process) on the same generated
images; both report images/s and views/s at steady state (model loaded) and for the whole
process, peak RSS, and the pipelined side its time split. On CUDA it also reports the fraction
of the GPU's dense bf16 peak, counting the teacher's FLOPs with torch's FlopCounterMode.

    python -m bench.teacher_cache_bench --model ViT-S-32 --images 48 --naive-images 12
    python -m bench.teacher_cache_bench --model ViT-L-14 --precision bf16 --device cuda --images 2048 --batch-size 64
    python -m bench.teacher_cache_bench --model ViT-L-14 --precision pure_bf16 --compile --device cuda --images 1024 --naive-images 0

With --compile the pipelined side first builds a throw-away store from one shard of the images
in the same process, so torch.compile's compilation is reported as `compile_warmup_s` and left
out of the figures: a later teacher of the same model and shapes in the process reuses the
compiled code (measured on the CPU with the test ViT: 2.4 s for the first teacher's first batch,
0.04 s for a new teacher's).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import child_result, emit, parser, run_child

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def dense_bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by its name, None when unknown."""
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in device_name), None)


def make_images(folder: Path, n: int, width: int, height: int) -> None:
    """ImageNet-like JPEGs: smooth colour fields plus noise, so decoding costs what it costs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        arr = 127 + 100 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + rng.uniform(0, 6, 3))
        arr += rng.normal(0, 12, arr.shape)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)


def run_pipelined(args) -> dict:
    from pipeline.config import load_params
    from pipeline.teacher.run import run_teacher_cache

    t0 = time.perf_counter()
    overrides = [
        f"data.images={args.images_dir}", "data.manifest_hash=stat",
        f"teacher.model={args.model}", "teacher.pretrained=", f"teacher.precision={args.precision}",
        f"teacher.device={args.device}", f"teacher.batch_size={args.batch_size}",
        f"cache.grids=[{args.grids}]", f"cache.shard_rows={args.shard_rows}", f"cache.chunk_rows={min(64, args.shard_rows)}",
    ]
    warmup_s = 0.0
    if args.compile:
        overrides.append("teacher.compile=true")
        warm = Path(args.workdir) / "warmup_images"
        warm.mkdir()
        for path in sorted(Path(args.images_dir).glob("*.jpg"))[: args.shard_rows]:
            (warm / path.name).symlink_to(path)
        t1 = time.perf_counter()
        run_teacher_cache(load_params(None, [*overrides, f"data.images={warm}"]), str(Path(args.workdir) / "warmup.zarr"), progress=False)
        warmup_s = time.perf_counter() - t1
    t0 = time.perf_counter()
    stats = run_teacher_cache(load_params(None, overrides), str(Path(args.workdir) / "store.zarr"), progress=False)
    return {"process_s": time.perf_counter() - t0, "steady_s": stats.model_s + stats.views_s + stats.decode_wait_s + stats.write_wait_s,
            "images": stats.rows_computed, "views": stats.views_computed, "split": {
                "decode_thread_s": stats.decode_s, "decode_wait_s": stats.decode_wait_s, "views_s": stats.views_s,
                "model_s": stats.model_s, "write_thread_s": stats.write_s, "write_wait_s": stats.write_wait_s, "wall_s": stats.wall_s},
            "compile_warmup_s": warmup_s}


def run_naive(args) -> dict:
    """The slow baseline: PIL crop + open_clip preprocess + encode_image, one crop at a time."""
    import open_clip
    import torch

    from pipeline.clip.model import Teacher
    from pipeline.config import TeacherConfig
    from pipeline.core.decode import center_square_box
    from pipeline.core.views import cell_edges, view_layout

    t0 = time.perf_counter()
    teacher = Teacher.load(TeacherConfig(model=args.model, pretrained="", precision=args.precision, device=args.device))
    spec = teacher.spec
    pre = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
    paths = sorted(Path(args.images_dir).glob("*.jpg"))[: args.naive_images]
    grids = [int(g) for g in args.grids.split(",")]
    out = []
    t1 = time.perf_counter()
    for path in paths:
        img = Image.open(path).convert("RGB")
        square = img.crop(center_square_box(*img.size))
        for g, r, c in view_layout(grids):
            e = cell_edges(square.size[0], g)
            out.append(teacher.encode(pre(square.crop((e[c], e[r], e[c + 1], e[r + 1])))[None]).half().cpu().numpy())
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    steady = time.perf_counter() - t1
    np.save(Path(args.workdir) / "naive.npy", np.concatenate(out))
    return {"process_s": time.perf_counter() - t0, "steady_s": steady, "images": len(paths), "views": len(out)}


def teacher_flops_per_view(args) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.clip.model import Teacher
    from pipeline.config import TeacherConfig

    teacher = Teacher.load(TeacherConfig(model=args.model, pretrained="", precision="fp32", device="cpu"))
    # An input that requires grad keeps nn.MultiheadAttention off its inference fast path,
    # whose fused kernel FlopCounterMode does not see (it undercounts ViT-L-14 as 104 GFLOP).
    x = torch.zeros(1, 3, teacher.spec.size, teacher.spec.size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        teacher.model.encode_image(x)
    return float(counter.get_total_flops())


def child(args) -> None:
    result = run_naive(args) if args.mode == "naive" else run_pipelined(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_result(result)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="ViT-S-32")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--naive-images", type=int, default=12, help="images for the naive per-crop loop (0: skip it)")
    ap.add_argument("--compile", action="store_true", help="teacher.compile=true on the pipelined side")
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (ImageNet's typical size)")
    ap.add_argument("--grids", default="1,2,3,4")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=64)
    ap.add_argument("--mode", choices=["naive", "pipelined"], help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        w, h = map(int, args.size.split("x"))
        make_images(Path(tmp) / "images", args.images, w, h)
        results = {}
        for mode in ("naive", "pipelined") if args.naive_images else ("pipelined",):
            wd = Path(tmp) / mode
            wd.mkdir()
            results[mode] = run_child("bench.teacher_cache_bench", sys.argv[1:], mode, images_dir=Path(tmp) / "images", workdir=wd)
    for r in results.values():
        r["images_per_s"] = r["images"] / r["steady_s"]
        r["views_per_s"] = r["views"] / r["steady_s"]
        r["process_images_per_s"] = r["images"] / r["process_s"]
    report = {"model": args.model, "precision": args.precision, "compile": args.compile, "device": args.device, "image_size": args.size, "grids": args.grids, **results}
    if "naive" in results:
        report["speedup_steady"] = results["pipelined"]["images_per_s"] / results["naive"]["images_per_s"]
        report["speedup_process"] = results["pipelined"]["process_images_per_s"] / results["naive"]["process_images_per_s"]
    flops = teacher_flops_per_view(args)
    achieved = results["pipelined"]["views"] * flops / results["pipelined"]["split"]["wall_s"] / 1e12
    report.update(gflops_per_view=flops / 1e9, achieved_tflops_end_to_end=achieved)
    if args.device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = dense_bf16_peak(name)
        report.update(gpu=name, fraction_of_dense_bf16_peak=achieved / peak if peak else None)
    emit(report, args.json)


if __name__ == "__main__":
    main()
