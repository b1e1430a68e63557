"""Stage two: train the ZeroSeg student from the teacher cache.

AdamW (betas from params, weight decay off for norms, biases, position embeddings and tokens),
lr = base_lr * effective_batch / 256 with linear warm-up then half-cycle cosine per optimizer
step (MAE), gradient accumulation up to the effective batch, bf16 autocast and timm's fused
attention (scaled_dot_product_attention) on CUDA, optional torch.compile, optional gradient
clipping, DistributedDataParallel under torchrun with each rank reading only its own chunks.

Checkpoints (each epoch, and every `train.checkpoint_every` steps) carry model, optimizer,
schedule, step, RNG states, config and the cache's fingerprint; `--resume` continues exactly
where the checkpoint left off (same batches, same masks, same numbers). A non-finite loss stops
the run before the optimizer step, leaving the last good checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import cache_schema as cs
from pipeline import __version__
from pipeline.checkpoint import deferred_signals, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.config import Params, TrainConfig, section_dict
from pipeline.errors import ConfigError, InputError, ZerosegError
from pipeline.student import ZeroSegStudent, param_groups_for_weight_decay, student_arch
from pipeline.student.grouping import compose_assignments
from pipeline.student.health import health_metrics
from pipeline.student.losses import (
    AssignmentInfoMaxLoss,
    ContrastiveRegionLoss,
    DistillationLoss,
    ReconstructionLoss,
    RegionMatchingLoss,
    SegmentCropLoss,
    SegmentMatchingLoss,
    cell_layout,
    local_view_mask,
    token_cells,
)
from pipeline.student.target_space import TargetSpace
from pipeline.student_data import CachePairs, ParentEnviron, normalize_images, teacher_statistics
from pipeline.teacher import resolve_device, teacher_files
from pipeline.views import view_layout

log = logging.getLogger(__name__)

# The checkpoint this process wrote last ({"step", "path"}): what an interrupted run can say it keeps.
SAVED: dict = {}

CHECKPOINT_NAME = "checkpoint.pt"
_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ZerosegError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainSummary:
    """What a run did; `losses` are the last logged averages of each term, `health` the last
    logged label-free health figures (`pipeline/student/health.py`)."""

    checkpoint: str = ""
    step: int = 0
    total_steps: int = 0
    epochs: int = 0
    resumed_from: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    first_losses: dict[str, float] = field(default_factory=dict)
    health: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    data_wait_fraction: float = 0.0


@dataclass(frozen=True)
class Schedule:
    """Derived sizes: computed from config and data, never written back into config."""

    peak_lr: float
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def lr_at(self, step: int, cfg: TrainConfig) -> float:
        """MAE's per-iteration schedule: linear warm-up, then half-cycle cosine to min_lr."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return cfg.min_lr + (self.peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(cfg: TrainConfig, batches_per_epoch: int, world: int) -> Schedule:
    if cfg.batch_size % (cfg.micro_batch * world):
        raise ConfigError(f"train.batch_size ({cfg.batch_size}) must be a multiple of train.micro_batch x devices ({cfg.micro_batch} x {world})")
    accum = cfg.batch_size // (cfg.micro_batch * world)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size ({cfg.batch_size}) is larger than one epoch of the cache allows ({batches_per_epoch} micro-batches of {cfg.micro_batch} per device)")
    total = cfg.epochs * steps_per_epoch
    return Schedule(
        peak_lr=cfg.base_lr * cfg.batch_size / 256,
        accum=accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, round(cfg.warmup_epochs * steps_per_epoch)),
    )


class StudentObjective(torch.nn.Module):
    """All loss terms, weighted in this one place. Returns (total, {term: unweighted value})."""

    def __init__(self, params: Params, grids: tuple[int, ...]):
        super().__init__()
        self.cfg = params.loss
        # Under a centered or standardised target space both sides arrive transformed (forward).
        self.affine = self.cfg.target_norm != "none"
        unit = not self.affine
        self.distill = DistillationLoss(normalize=unit)
        self.matching = SegmentMatchingLoss(bidirectional=self.cfg.bidirectional_matching, normalize=unit)
        self.reconstruction = ReconstructionLoss(norm_pix=self.cfg.norm_pix)
        self.infomax = AssignmentInfoMaxLoss(usage=self.cfg.infomax_usage)
        self.region = RegionMatchingLoss(normalize=unit)
        self.contrastive = ContrastiveRegionLoss(tau=self.cfg.contrastive_tau)
        self.segment_crop = SegmentCropLoss()
        self.grids = grids
        # Local views as indices, not a mask, and their presence as a Python bool: indexing with
        # a boolean CUDA mask and `bool(tensor)` each make the host wait for the GPU.
        local = local_view_mask(grids)
        self.has_local = bool(local.any())
        self.register_buffer("local", local.nonzero().squeeze(1), persistent=False)  # [V_local] view indices
        region = set(self.cfg.region_grids or grids)
        if self.cfg.region_grids and (not region <= set(grids) or region == {1}):
            raise ConfigError(f"loss.region_grids {list(self.cfg.region_grids)}: must be local grids among loss.grids {list(grids)}")
        self.register_buffer("region_views", torch.tensor([float(g in region) for g, _, _ in view_layout(grids)]), persistent=False)
        self.register_buffer("layout", cell_layout(grids), persistent=False)  # [3, V]

    def forward(self, out, targets: torch.Tensor, patches: torch.Tensor, space: TargetSpace,
                crops: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args:
            out: the student's `StudentOutput`.
            targets: [B, V, D] teacher views as cached.
            patches: [B, L, p*p*3] the images' patches (reconstruction targets).
            space: the student's target space (`model.target_space`).
            crops: with `loss.segment_crop`, the teacher's embeddings of the segments' crops and
                which segments have one (`SegmentCropTargets`).
        """
        c = self.cfg
        z, segments = out.z, out.segments
        if self.affine:
            targets = space.targets(targets)  # [B, V, D]
            z, segments = space.predictions(z, affine=True), space.predictions(segments, affine=True)
        terms = dict(self.distill(z, targets))
        weights = {"distill": c.distill}
        if c.segment_match and self.has_local:
            terms.update(self.matching(segments, targets, self.local))
            weights.update(segment_match=c.segment_match, view_match=c.view_match)
        if (c.region_match or c.contrastive) and self.has_local:
            cells = token_cells(out.ids_keep, out.grid, self.layout) * self.region_views  # [B, N, V]
            assignment = compose_assignments(out.hard_assignments)  # [B, S, N]
            if c.region_match:
                terms.update(self.region(segments, targets, assignment, cells))
                weights["region_match"] = c.region_match
            if c.contrastive:
                terms.update(self.contrastive(segments, targets, assignment, cells))
                weights["contrastive"] = c.contrastive
        if c.segment_crop and crops is not None:
            terms.update(self.segment_crop(out.segments, *crops, compose_assignments(out.hard_assignments)))
            weights["segment_crop"] = c.segment_crop
        if c.reconstruction and out.pred is not None:
            terms.update(self.reconstruction(out.pred, patches, out.mask))
            weights["reconstruction"] = c.reconstruction
        if c.infomax:
            terms.update(self.infomax(out.soft_assignments))
            weights.update(usage_neg_entropy=c.infomax, token_entropy=c.infomax)
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms


def _crop_targets(params: Params, attrs: dict, device: torch.device):
    """The cache's own teacher, loaded for `loss.segment_crop` (refused if it is another)."""
    from pipeline.student.segment_crops import SegmentCropTargets
    from pipeline.teacher import Teacher

    teacher = Teacher.load(dataclasses.replace(params.teacher, device=str(device)))
    if teacher.identity.weights_sha256 != attrs["teacher"]["weights_sha256"]:
        raise ConfigError(f"{params.source}: loss.segment_crop runs the teacher of params.teacher, which is not the teacher the cache was built "
                          f"with (weights sha256 {teacher.identity.weights_sha256[:12]}, the cache's {attrs['teacher']['weights_sha256'][:12]})")
    return SegmentCropTargets(teacher)


def model_signature(model: torch.nn.Module) -> str:
    """sha256 (16 hex) of the model's module tree as printed: every layer with its settings
    (sizes, LayerNorm eps, ...), so weights of another model definition are never continued."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


def compatibility(params: Params, cache_attrs: dict, world: int = 1, model: torch.nn.Module | None = None) -> dict:
    """What must be equal for a checkpoint to be resumed (run mechanics excluded).

    `train.num_workers` and the number of processes stay in: each (process, worker) pair reads
    its own share of the chunks, so they fix the data order and the steps per epoch, and with
    them the learning-rate schedule. A resume with other values would silently follow another
    schedule and skip the wrong rows. `model` adds the model's signature: after a change of the
    code that defines the model (a layer, a norm's eps), `--auto-resume` (the DVC stage) starts
    afresh instead of continuing weights trained for the old definition.
    """
    train = section_dict(params.train)
    train["num_workers"] = max(1, train["num_workers"])  # 0 (in process) reads as one worker does
    for key in ("max_steps", "log_every", "checkpoint_every", "compile", "device", "images"):
        train.pop(key)
    out = {"student": section_dict(params.student), "loss": section_dict(params.loss), "train": train, "processes": world,
           "cache_fingerprint": cache_attrs["fingerprint"]}
    if model is not None:
        out["model"] = model_signature(model)
    return out


def data_root(images: str) -> Path:
    """The folder the cache's relative paths start from (the folder itself, or the list's folder)."""
    path = Path(images)
    return path if path.is_dir() else path.parent


def run_training(params: Params, cache: str | None, out_dir: str | Path, *, resume: str = "never", live_dir: str | Path | None = None, progress: bool = True) -> TrainSummary:
    """Train (or resume training) the student on the teacher cache at `cache`.

    SIGTERM (a scheduler's or a killed `dvc repro`'s stop) unwinds like Ctrl-C while this
    runs: the DataLoader's worker processes are shut down with it, and the last checkpoint
    stays for `--resume`.

    Args:
        params: the `student`, `loss`, `train` and `data` sections are read.
        cache: teacher cache path or URL; refused unless it validates for `loss.grids` and was
            built from `data.images` (when that source is here). None: the store
            `zeroseg teacher-cache` builds for these params (`find_store`).
        out_dir: where `checkpoint.pt` is written.
        resume: "never" (start fresh), "must" (continue the checkpoint in out_dir, or fail),
            "auto" (continue it when it was made with the same config and cache, else start fresh).
        live_dir: dvclive's folder for metrics and plots (None: no dvclive).
    """
    with _sigterm_as_exit():
        return _train(params, cache, out_dir, resume=resume, live_dir=live_dir, progress=progress)


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit(143) in the main thread, so that finally blocks run.

    Without it the process dies at once and its forkserver and DataLoader workers are left
    running (measured: all four helper processes outlived a SIGTERM-ed run).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(params: Params, cache: str | None, out_dir: str | Path, *, resume: str, live_dir: str | Path | None, progress: bool) -> TrainSummary:
    cfg = params.train
    rank, world, local_rank = _init_distributed()
    device = _device(cfg.device, local_rank, world)
    grids = tuple(sorted(set(params.loss.grids)))
    from pipeline.teacher_cache import check_manifest, find_store

    found = cache is None
    if found:
        cache = find_store(params, progress=progress and rank == 0)
        log.info("teacher cache: %s (built for these params)", cache)
    try:
        attrs = cs.validate(cache, grids=grids)
    except cs.CacheSchemaError as exc:
        raise InputError(f"refusing to train on {cache}: {exc}") from None
    if not found:  # found by its fingerprint, which holds the manifest of data.images
        check_manifest(cache, attrs, params.data.images)
    out_dim = int(attrs["teacher"]["embed_dim"])
    # Every global RNG, not only torch's: a checkpoint stores them all (for exact resume), and an
    # unseeded one would make two identical runs write different checkpoint files.
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    s = params.student
    arch = student_arch(s.variant, hard_assignment=s.hard_assignment, gumbel_tau=s.gumbel_tau, learnable_assign_temperature=s.learnable_assign_temperature)
    model = ZeroSegStudent(arch=arch, out_dim=out_dim)
    # The teacher's statistics: the target space's map (loss.target_norm), and eval.calibration's mean.
    stat_mean, stat_std, stat_rows = teacher_statistics(cache, grids, params.loss.target_stats_rows)
    model.target_space.set_statistics(params.loss.target_norm, stat_mean, stat_std)
    if s.init_from:
        report = model.load_encoder_state_dict(load_checkpoint(s.init_from))
        log.info("student.init_from %s: %s", s.init_from, report.summary())
    model.to(device)
    objective = StudentObjective(params, grids).to(device)
    crop_targets = _crop_targets(params, attrs, device) if params.loss.segment_crop else None

    dataset = CachePairs(cache, data_root(params.data.images), grids, arch.img_size, rank=rank, world=world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, max_pixels=params.data.max_pixels, images=cfg.images)
    log.info("student images: %s", f"read from {cs.images_array(arch.img_size)} in the cache" if dataset.image_source == "cache" else "decoded from the source files")
    other = [s for s in attrs.get("image_sizes", []) if s != arch.img_size]
    if dataset.image_source == "decode" and cfg.images == "auto" and other:
        log.warning("%s stores student images at %s px, but %s takes %d px: decoding the source files instead", cache, other, params.student.variant, arch.img_size)
    batches = dataset.batches_per_epoch(cfg.micro_batch, cfg.num_workers)
    if world > 1:  # every rank must take the same number of steps
        t = torch.tensor(batches, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        batches = int(t.item())
    sched = make_schedule(cfg, batches, world)
    loader = DataLoader(
        dataset, batch_size=cfg.micro_batch, drop_last=True, num_workers=cfg.num_workers,
        multiprocessing_context="forkserver" if cfg.num_workers > 0 else None, persistent_workers=cfg.num_workers > 0,
        worker_init_fn=ParentEnviron() if cfg.num_workers > 0 else None, pin_memory=device.type == "cuda",
        # Each new iterator draws its workers' base seed from this generator; from the global one it
        # would shift the masks and Gumbel noise of every later step, differently in a resumed
        # run (which makes its iterator mid-epoch) than in an uninterrupted one. CachePairs seeds
        # its own order from (seed, epoch, rank, worker).
        generator=torch.Generator().manual_seed(cfg.seed + rank),
    )
    optimizer = torch.optim.AdamW(param_groups_for_weight_decay(model, cfg.weight_decay), lr=sched.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.precision == "fp16")

    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    compat = compatibility(params, attrs, world, model)
    step, summary = 0, TrainSummary(checkpoint=str(ckpt_path), total_steps=sched.total_steps)
    if resume == "never" and ckpt_path.exists():
        log.warning("%s exists and is started afresh: it is replaced at the first checkpoint (--resume continues it)", ckpt_path)
    if resume != "never" and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if "processes" not in ckpt.get("compat", {"processes": None}):
            # Written before the data order joined the check: it cannot say, so it is taken as it is.
            log.warning("%s predates the check of train.num_workers and the process count: resuming assumes they are as before", ckpt_path)
            ckpt["compat"] = {**ckpt["compat"], "processes": compat["processes"],
                              "train": {**ckpt["compat"].get("train", {}), "num_workers": compat["train"]["num_workers"]}}
        if "model" not in ckpt.get("compat", {}):
            log.warning("%s predates the check of the model's definition: resuming assumes it is as before", ckpt_path)
            ckpt["compat"] = {**ckpt.get("compat", {}), "model": compat["model"]}
        if ckpt.get("compat") != compat:
            differs = [d.split(":")[0] for d in cs.differences(ckpt.get("compat", {}), compat)]  # train.base_lr, cache_fingerprint
            if resume == "must":
                why = " (they fix the data order and steps per epoch: set them as before)" if {"train.num_workers", "processes"} & set(differs) else ""
                raise InputError(f"{ckpt_path}: made with other {', '.join(differs)}{why}; cannot resume (remove it or use another --out)")
            log.warning("%s was made with other %s: starting afresh", ckpt_path, ", ".join(differs))
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            step = int(ckpt["step"])
            set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
            summary.resumed_from = step
    elif resume == "must":
        raise InputError(f"{ckpt_path}: no checkpoint to resume")

    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = _AMP[cfg.precision] if device.type == "cuda" else None
    live = _open_live(live_dir, resume_step=summary.resumed_from) if rank == 0 else None

    def checkpoint(epoch: int) -> None:
        nonlocal saved_step
        saved_step = step
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if rank == 0:
            payload = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "schedule": asdict(sched), "step": step, "epoch": epoch, "rng": states, "compat": compat,
                "config": {name: section_dict(getattr(params, name)) for name in ("data", "teacher", "cache", "student", "loss", "train", "eval")},
                "teacher_files": teacher_files(params.teacher, ckpt_path),
                "arch": {k: (list(map(list, v)) if k == "group_stages" else v) for k, v in asdict(arch).items()},
                "cache": {"url": str(cache), "fingerprint": attrs["fingerprint"], "grids": list(grids), "embed_dim": out_dim, "teacher": attrs["teacher"]},
                "teacher_stats": {"mean": stat_mean.tolist(), "std": stat_std.tolist(), "rows": stat_rows, "grids": list(grids)},
                "zeroseg_version": __version__,
            }
            with deferred_signals():  # a stop inside torch.save would surface as the zip writer's error, not as the stop
                save_checkpoint(ckpt_path, payload)
                SAVED.update(step=step, path=str(ckpt_path))

    limit = min(sched.total_steps, cfg.max_steps) if cfg.max_steps else sched.total_steps
    bar = tqdm(total=limit, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    saved_step = step if summary.resumed_from is not None else -1
    window: dict[str, float] = {}
    seen, wait, t_window = 0, 0.0, time.perf_counter()
    model.train()
    try:
        while step < limit:
            epoch, done_in_epoch = divmod(step, sched.steps_per_epoch)
            dataset.set_epoch(epoch, skip_batches=done_in_epoch * sched.accum, micro_batch=cfg.micro_batch)
            batches_iter = iter(loader)
            while done_in_epoch < sched.steps_per_epoch and step < limit:
                lr = sched.lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Loss terms stay on the device until the step's end: one host sync per optimizer
                # step, instead of one per term per micro-batch, each of which idled the GPU.
                on_device: dict[str, torch.Tensor] = {}
                for micro in range(sched.accum):
                    t0 = time.perf_counter()
                    images, targets, _ = next(batches_iter)
                    wait += time.perf_counter() - t0
                    pixels = images.to(device, non_blocking=True)  # [B, 3, H, W] uint8
                    images = normalize_images(pixels)  # [B, 3, H, W]
                    targets = targets.to(device, non_blocking=True).float()  # [B, V, D]
                    sync = train_model.no_sync() if world > 1 and micro < sched.accum - 1 else contextlib.nullcontext()
                    with sync, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out = train_model(images, params.student.mask_ratio, decode=bool(params.loss.reconstruction))
                        crops = crop_targets(pixels, compose_assignments(out.hard_assignments).detach(), out.ids_keep, out.grid) if crop_targets else None
                        total, terms = objective(out, targets, model.patchify(images), model.target_space, crops)
                    scaler.scale(total / sched.accum).backward()
                    for k, v in {**terms, "total": total}.items():
                        on_device[k] = on_device.get(k, 0.0) + v.detach().float() / sched.accum
                    seen += images.shape[0] * world
                terms_sum = dict(zip(on_device, torch.stack(list(on_device.values())).tolist()))  # the one sync
                if not all(math.isfinite(v) for v in terms_sum.values()):
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in terms_sum.items())
                    kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
                    raise TrainingDiverged(f"non-finite loss at step {step} ({shown}); stopped before the optimizer step; {kept}")
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                done_in_epoch += 1
                bar.update(1)
                for k, v in terms_sum.items():
                    window[k] = window.get(k, 0.0) + v
                window["_n"] = window.get("_n", 0) + 1
                if not summary.first_losses:
                    summary.first_losses = {k: v for k, v in terms_sum.items()}
                if step % cfg.log_every == 0 or step == limit:
                    elapsed = time.perf_counter() - t_window
                    summary.losses = {k: v / window["_n"] for k, v in window.items() if k != "_n"}
                    summary.images_per_s, summary.data_wait_fraction = seen / elapsed, wait / elapsed
                    bar.set_postfix(loss=f"{summary.losses['total']:.4f}", lr=f"{lr:.2e}", img_s=f"{summary.images_per_s:.0f}")
                    if rank == 0:  # on the step's last micro-batch: label-free signs of a collapse
                        summary.health = health_metrics(out, targets, model.target_space, objective.local)
                    if live is not None:
                        live.step = step  # log_metric records at the current step: set it first
                        for k, v in summary.losses.items():
                            live.log_metric(f"loss/{k}", v)
                        for k, v in summary.health.items():
                            live.log_metric(f"health/{k}", v)
                        live.log_metric("lr", lr)
                        live.log_metric("images_per_s", summary.images_per_s)
                        live.log_metric("data_wait_fraction", summary.data_wait_fraction)
                        live.next_step()
                    window, seen, wait, t_window = {}, 0, 0.0, time.perf_counter()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(epoch)
            del batches_iter
            if done_in_epoch == sched.steps_per_epoch:
                checkpoint(epoch + 1)
        if saved_step != step:
            checkpoint(step // sched.steps_per_epoch)
    finally:
        bar.close()
        if live is not None:
            live.end()
            from pipeline.curves import write_curves

            write_curves(live.dir, title=Path(out_dir).name)  # offline PNGs beside dvclive's tables
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary.step, summary.epochs = step, step // sched.steps_per_epoch
    return summary


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int, world: int) -> torch.device:
    if world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return resolve_device(name, key="train.device")


def _open_live(live_dir: str | Path | None, *, resume_step: int | None):
    """dvclive in `live_dir` (None for no logging); resuming from `resume_step` keeps its rows up to that step."""
    if live_dir is None or str(live_dir).strip() in ("", "."):
        return None
    live_path = Path(live_dir).resolve()
    if live_path == Path.cwd().resolve() or (live_path / "dvc.yaml").exists() or (live_path / "params.yaml").exists():
        # dvclive clears metrics.json, plots/, params.yaml and dvc.yaml in its folder when it starts.
        raise InputError(f"--live-dir {live_dir}: must be a folder of its own (dvclive clears its files), not one holding params.yaml or dvc.yaml")
    from dvclive import Live

    if resume_step is not None:
        _drop_rows_after(live_path / "plots" / "metrics", resume_step)
    try:
        return Live(dir=str(live_dir), resume=resume_step is not None, save_dvc_exp=False, dvcyaml=None)
    except Exception as exc:  # noqa: BLE001 - dvclive raises scmrepo errors, e.g. in a repo without commits
        raise InputError(f"dvclive could not start in {live_dir} ({type(exc).__name__}: {exc}); commit once, or pass --live-dir ''") from None


def _drop_rows_after(plots: Path, step: int) -> None:
    """Remove the rows past `step` from dvclive's metric tables in `plots`.

    A run that stopped after its last checkpoint logged steps that the resumed run logs again;
    dvclive's resume only appends, so without this the plots would hold those steps twice.
    """
    for table in sorted(plots.rglob("*.tsv")):
        lines = table.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        header = lines[0].rstrip("\r\n").split("\t")
        column = header.index("step") if "step" in header else 0
        kept = [lines[0]] + [line for line in lines[1:] if line.strip() and int(line.split("\t")[column]) <= step]
        if len(kept) != len(lines):
            tmp = table.with_suffix(".tsv.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(table)
