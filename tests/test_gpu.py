"""Checks that need a CUDA device (skipped elsewhere): the GPU paths agree with the CPU ones."""

import numpy as np
import pytest
import torch
from conftest import write_params

from pipeline.cache.reader import load_targets
from pipeline.clip.model import Teacher
from pipeline.config import TeacherConfig, load_params
from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.decode import decode_center_square
from pipeline.core.views import make_views
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.run import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_views_on_the_gpu_match_the_cpu(demo_dir):
    teacher = Teacher.load(TeacherConfig(model="zeroseg-test-vit", pretrained="", precision="fp32", device="cpu"))
    squares = [torch.from_numpy(decode_center_square(p).square) for p in sorted((demo_dir / "images").glob("*.jpg"))]
    cpu = make_views(squares, [1, 2, 3, 4], teacher.spec, "cpu")
    gpu = make_views(squares, [1, 2, 3, 4], teacher.spec, "cuda").cpu()
    # Both are rounded to 8-bit levels; rounding can flip by one level where the float results differ.
    levels = (cpu - gpu).abs() * torch.tensor(teacher.spec.std).view(1, 1, 3, 1, 1) * 255
    assert levels.max() <= 1.01 and (levels > 0.5).float().mean() < 0.01


def test_cache_built_on_the_gpu_matches_the_cpu(tmp_path, demo_dir):
    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    run_teacher_cache(load_params(params), str(tmp_path / "cpu.zarr"), progress=False)
    run_teacher_cache(load_params(params, ["teacher.device=cuda"]), str(tmp_path / "gpu.zarr"), progress=False)
    a = load_targets(tmp_path / "cpu.zarr", [1, 2, 3, 4]).astype(np.float32)
    b = load_targets(tmp_path / "gpu.zarr", [1, 2, 3, 4]).astype(np.float32)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999
    run_teacher_cache(load_params(params, ["teacher.device=cuda", "teacher.precision=bf16"]), str(tmp_path / "bf16.zarr"), progress=False)
    c = load_targets(tmp_path / "bf16.zarr", [1, 2, 3, 4]).astype(np.float32)
    assert ((a * c).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(c, axis=-1)).min() > 0.99


def test_training_on_the_gpu_in_bf16(built_cache, tmp_path):
    store, params = built_cache
    overrides = ["student.variant=zeroseg_micro", "train.device=cuda", "train.precision=bf16", "train.batch_size=8", "train.micro_batch=4",
                 "train.num_workers=2", "train.epochs=20", "train.warmup_epochs=0", "train.base_lr=0.05", "train.log_every=5"]
    summary = run_training(load_params(params, overrides), str(store), tmp_path / "run", progress=False)
    assert summary.step == 20 and all(np.isfinite(v) for v in summary.losses.values())
    assert summary.losses["distill"] < summary.first_losses["distill"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # opens on the CPU
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_cutting_views_and_launching_the_teacher_never_wait_for_the_gpu(demo_dir):
    # Stage one launches batch k's forward, then cuts batch k+1's views: any synchronous copy in
    # between would wait for forward k and leave the GPU idle while the CPU works.
    teacher = Teacher.load(TeacherConfig(model="zeroseg-test-vit", pretrained="", precision="bf16", device="cuda"))
    squares = [torch.from_numpy(decode_center_square(p).square) for p in sorted((demo_dir / "images").glob("*.jpg"))]
    teacher.encode(make_views(squares, [1, 2, 3, 4], teacher.spec, "cuda").flatten(0, 1))  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = make_views(squares, [1, 2, 3, 4], teacher.spec, "cuda")
        feats = teacher.encode(views.flatten(0, 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert feats.shape == (len(squares) * 30, teacher.identity.embed_dim) and torch.isfinite(feats).all()


def test_stage_one_never_waits_for_the_gpu_between_batches(tmp_path, demo_dir):
    # Each batch's results come back through pinned memory and an event, never a stream-wide sync:
    # a sync would drain the queue (the next batch's forward included) and idle the GPU while the
    # following batch is cut.
    from pipeline.cache.identity import expected_identity
    from pipeline.cache.manifest import build_manifest
    from pipeline.cache.policy import open_or_create
    from pipeline.teacher.shards import RunStats, compute_shards

    params = load_params(write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", teacher={"device": "cuda", "batch_size": 2}))
    teacher = Teacher.load(params.teacher)
    manifest = build_manifest(params.data.images, "stat", progress=False)
    store = open_or_create(str(tmp_path / "s.zarr"), expected_identity(teacher, manifest, params.data.min_side), manifest.paths, (1, 2, 3, 4), params.cache)
    teacher.encode(make_views([torch.from_numpy(decode_center_square(manifest.root / manifest.paths[0]).square)], [1, 2, 3, 4], teacher.spec, "cuda")[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        compute_shards(store, manifest.root, manifest.paths, teacher, store.missing((1, 2, 3, 4)), params, RunStats())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert store.finalize()
    run_teacher_cache(params, str(tmp_path / "again.zarr"), progress=False)
    np.testing.assert_array_equal(load_targets(tmp_path / "s.zarr", [1, 2, 3, 4]).view(np.uint16), load_targets(tmp_path / "again.zarr", [1, 2, 3, 4]).view(np.uint16))


def test_a_training_step_queues_without_waiting_for_the_gpu(built_cache):
    # The batch's upload and normalization, the forward, every loss term and backward are
    # queued without the host waiting; run_training then reads the terms back once per
    # optimizer step.
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.student.normalize import normalize_images
    from pipeline.student.objective import StudentObjective

    _, params_file = built_cache
    params = load_params(params_file, ["loss.region_match=1.0", "loss.infomax=0.5", "loss.bidirectional_matching=true"])
    grids = (1, 2, 3, 4)
    model = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=32).cuda()
    objective = StudentObjective(params.loss, grids).cuda()
    size = model.arch.img_size
    host_images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8).pin_memory()  # as the DataLoader gives them
    host_targets = torch.randn(4, 30, 32).half().pin_memory()

    def step():
        images = normalize_images(host_images.to("cuda", non_blocking=True))
        targets = host_targets.to("cuda", non_blocking=True).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, terms = objective(model(images, 0.6), targets, model.patchify(images))
        total.backward()
        return terms

    step()  # warm-up: library handles, allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {"distill", "segment_match", "region_match", "reconstruction"} <= set(terms)
