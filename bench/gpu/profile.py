"""Where the device's time goes: torch.profiler tables of the teacher's forward and of a student step.

The throughput benchmarks say how far each stage is from the GPU's peak; this says why. For
each of the two hot loops it profiles a few iterations after a warm-up and writes
- the top ops by self device time (CPU time on the CPU), and
- one line comparing the device's busy time (the sum of its kernels) with the wall time of the
  same iterations: a large gap means the GPU waits for the host (launches, syncs, Python),
  a small one that the kernels themselves are slow.

    python -m bench.gpu.profile --device cuda --out /tmp/prof                        # ViT-L-14, zeroseg_vit_b16
    python -m bench.gpu.profile --teacher ViT-S-32 --views 64 --student zeroseg_micro --micro-batch 8   # CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.train_bench import training_step
from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig
from bench.harness import emit, parser


def profiled(fn, device: torch.device, iters: int, warmup: int) -> tuple[str, dict]:
    """Run fn `warmup` times, then `iters` times under the profiler: (table, figures)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25, max_name_column_width=60)
    # Kernels only (the table's "Self CUDA time total"): CPU ops also carry their kernels' time.
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) if cuda else None
    figures = {"iters": iters, "wall_ms_per_iter": 1e3 * wall / iters}
    if busy_us is not None:
        figures["device_busy_ms_per_iter"] = busy_us / 1e3 / iters
        figures["device_busy_fraction"] = busy_us / 1e6 / wall
    return table, figures


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher", default="ViT-L-14")
    ap.add_argument("--precision", default="bf16", help="the teacher's: bf16 | pure_bf16 | fp32 | fp16")
    ap.add_argument("--views", type=int, default=1920, help="views per teacher forward (64 images x 30 views)")
    ap.add_argument("--student", default="zeroseg_vit_b16")
    ap.add_argument("--micro-batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768, help="the student's target width (ViT-L-14's 768)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    teacher = Teacher.load(TeacherConfig(model=args.teacher, pretrained="", precision=args.precision, device=args.device))
    size = teacher.spec.size
    views = torch.randn(args.views, 3, size, size, device=device, dtype=teacher.view_dtype)
    table, figures = profiled(lambda: teacher.encode(views), device, args.iters, args.warmup)
    (args.out / "profile_teacher.txt").write_text(table)
    report["teacher"] = {"model": args.teacher, "precision": args.precision, "views": args.views, **figures}
    del teacher, views

    bench_args = argparse.Namespace(variant=args.student, dim=args.dim, grids="1,2,3,4",
                                    compile=False, micro_batch=args.micro_batch, mask_ratio=0.6)
    step, _ = training_step(bench_args, device)
    table, figures = profiled(step, device, args.iters, args.warmup)
    (args.out / "profile_student.txt").write_text(table)
    report["student"] = {"variant": args.student, "micro_batch": args.micro_batch, **figures}

    emit(report, args.json or args.out / "profile.json")


if __name__ == "__main__":
    main()
