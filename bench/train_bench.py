"""Stage-two throughput: student training steps/s, images/s and the fraction of dense bf16 peak.

Two measurements in one run:
- compute: the training step (forward, all losses, backward, AdamW) on batches already on the
  device, FLOPs counted with torch's FlopCounterMode, so the figure is the model's alone;
- end to end: `run_training` on a generated cache and image folder with DataLoader workers,
  reporting images/s and the fraction of step time spent waiting for data, once per image
  source (`--e2e-sources decode,cache`: decoding the JPEGs, or the images stored in the cache).

    python -m bench.train_bench --variant zeroseg_tiny --micro-batch 64 --steps 10        # CPU
    python -m bench.train_bench --variant zeroseg_vit_b16 --micro-batch 256 --device cuda  # GPU
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import emit, parser
from bench.teacher_cache_bench import dense_bf16_peak
from pipeline.config import load_params
from pipeline.student import ZeroSegStudent, param_groups_for_weight_decay, student_arch
from pipeline.student.objective import StudentObjective


def training_step(args, device: torch.device):
    """One training step (forward, all losses, backward, AdamW) on fixed batches on the device.

    Returns (step, model): step(m) runs it through m (the model, or its compiled self).
    """
    arch = student_arch(args.variant)
    model = ZeroSegStudent(arch=arch, out_dim=args.dim).to(device)
    params = load_params(None, [f"loss.grids=[{args.grids}]"])
    grids = tuple(int(g) for g in args.grids.split(","))
    objective = StudentObjective(params.loss, grids).to(device)
    opt = torch.optim.AdamW(param_groups_for_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    v = sum(g * g for g in grids)
    images = torch.randn(args.micro_batch, 3, arch.img_size, arch.img_size, device=device)
    targets = torch.randn(args.micro_batch, v, args.dim, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(m=step_model):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = m(images, args.mask_ratio)
            total, _ = objective(out, targets, model.patchify(images))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def compute_bench(args, device: torch.device) -> dict:
    step, model = training_step(args, device)
    with FlopCounterMode(display=False) as counter:
        step(model)  # counted on the eager model: the counter does not see into compiled graphs
    flops = counter.get_total_flops()
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {"variant": args.variant, "micro_batch": args.micro_batch, "mask_ratio": args.mask_ratio, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "compile": args.compile, "warmup_s": warmup_s, "gflops_per_image": flops / args.micro_batch / 1e9, "step_s": dt, "images_per_s": args.micro_batch / dt, "achieved_tflops": flops / dt / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def end_to_end_bench(args, device: torch.device) -> dict:
    from bench.teacher_cache_bench import make_images
    from pipeline.teacher.run import run_teacher_cache
    from pipeline.training.run import run_training

    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", args.e2e_images, 500, 375)
        sources = args.e2e_sources.split(",")
        img_size = student_arch(args.variant).img_size
        base = [f"data.images={tmp}/images", "data.manifest_hash=stat", "teacher.model=zeroseg-test-vit", "teacher.pretrained=",
                f"teacher.device={device}", "teacher.precision=fp32", f"cache.grids=[{args.grids}]", "cache.shard_rows=256", "cache.chunk_rows=64",
                f"cache.student_image_size={img_size if 'cache' in sources else 0}"]
        store = f"{tmp}/cache.zarr"
        stats = run_teacher_cache(load_params(None, base), store, progress=False)
        micro = args.e2e_micro_batch or args.micro_batch
        report = {"images": args.e2e_images, "workers": args.workers, "stage_one_wall_s": stats.wall_s}
        for source in sources:
            train = [f"student.variant={args.variant}", f"train.device={device}", f"train.micro_batch={micro}", f"train.batch_size={micro}",
                     f"train.num_workers={args.workers}", "train.epochs=100", "train.warmup_epochs=0", f"train.max_steps={args.e2e_steps}",
                     f"train.log_every={max(1, args.e2e_steps // 2)}", f"loss.grids=[{args.grids}]", f"train.compile={str(args.compile).lower()}",
                     f"train.images={source}"]
            t0 = time.perf_counter()
            summary = run_training(load_params(None, base + train), store, f"{tmp}/run-{source}", live_dir=None, progress=False)
            # The last logging window (the second half of the steps) leaves out worker start-up.
            report[source] = {"steps": summary.step, "wall_s": time.perf_counter() - t0,
                              "images_per_s_second_half": summary.images_per_s, "data_wait_fraction_second_half": summary.data_wait_fraction}
        return report


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--variant", default="zeroseg_tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--dim", type=int, default=768, help="teacher embedding width (768 for ViT-L/14)")
    ap.add_argument("--grids", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--e2e-images", type=int, default=0, help="also run end to end on this many generated images (0: skip)")
    ap.add_argument("--e2e-steps", type=int, default=20)
    ap.add_argument("--e2e-micro-batch", type=int, default=0, help="micro-batch of the end-to-end run (0: --micro-batch)")
    ap.add_argument("--e2e-sources", default="decode", help="image sources to run end to end: decode, cache (stored in stage one), or both")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "compute": compute_bench(args, device)}
    if device.type == "cuda":
        peak = dense_bf16_peak(report["device"])
        report["compute"]["fraction_of_dense_bf16_peak"] = report["compute"]["achieved_tflops"] / peak if peak else None
    if args.json:  # written now too, so the compute figures survive a failing end-to-end run
        emit(report, args.json)
    if args.e2e_images:
        report["end_to_end"] = end_to_end_bench(args, device)
    emit(report, args.json)


if __name__ == "__main__":
    main()
