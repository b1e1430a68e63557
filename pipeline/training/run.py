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
import logging
import os
import random
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import cache_schema as cs
from pipeline import __version__
from pipeline.cache.identity import check_manifest, find_store
from pipeline.clip.model import teacher_files
from pipeline.config import Params, section_dict
from pipeline.core.checkpoint import (
    deferred_signals,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.student import ZeroSegStudent, param_groups_for_weight_decay, student_arch
from pipeline.student.health import health_metrics
from pipeline.student.objective import StudentObjective
from pipeline.training import state
from pipeline.training.data import CachePairs, ParentEnviron, teacher_sample
from pipeline.training.engine import Engine, MetricWindow, StepResult
from pipeline.training.live import log_step, open_live
from pipeline.training.schedule import Schedule, make_schedule
from pipeline.training.state import CHECKPOINT_NAME, SAVED, compatibility
from pipeline.training.teacher_targets import text_anchors

log = logging.getLogger(__name__)


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
    cache, attrs = _open_cache(params, cache, grids, progress=progress and rank == 0)
    out_dim = int(attrs["teacher"]["embed_dim"])
    # Every global RNG, not only torch's: a checkpoint stores them all (for exact resume), and an
    # unseeded one would make two identical runs write different checkpoint files.
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    s = params.student
    arch = student_arch(s.variant, hard_assignment=s.hard_assignment, gumbel_tau=s.gumbel_tau)
    model = ZeroSegStudent(arch=arch, out_dim=out_dim)
    if s.init_from:
        report = model.load_encoder_state_dict(load_checkpoint(s.init_from))
        log.info("student.init_from %s: %s", s.init_from, report.summary())
    model.to(device)
    objective = StudentObjective(params.loss, grids).to(device)
    if objective.needs_anchors:
        anchors, background = text_anchors(params, attrs)
        sample = teacher_sample(cache, grids, params.loss.target_stats_rows) if objective.needs_sample else None  # [n, V, D]
        objective.set_anchors(anchors, background=background, sample=sample, seed=cfg.seed)

    dataset, loader, sched = _data(params, cache, attrs, grids, arch.img_size, rank, world, device)
    optimizer = torch.optim.AdamW(param_groups_for_weight_decay(model, cfg.weight_decay), lr=sched.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.precision == "fp16")

    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    compat = compatibility(params, attrs, world, model)
    summary = TrainSummary(checkpoint=str(ckpt_path), total_steps=sched.total_steps)
    summary.resumed_from = state.resume(ckpt_path, resume, compat, rank, model, optimizer, scaler)
    step = summary.resumed_from or 0

    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    engine = Engine(params, model, train_model, objective, optimizer, scaler, sched, device, world, ckpt_path)
    live = open_live(live_dir, resume_step=summary.resumed_from) if rank == 0 else None
    extra = {
        "teacher_files": teacher_files(params.teacher, ckpt_path),
        "arch": {k: (list(map(list, v)) if k == "group_stages" else v) for k, v in asdict(arch).items()},
        "cache": {"url": str(cache), "fingerprint": attrs["fingerprint"], "grids": list(grids), "embed_dim": out_dim, "teacher": attrs["teacher"]},
        "zeroseg_version": __version__,
    }
    saver = _Checkpointer(params, engine, compat, extra, rank, world, saved=step if summary.resumed_from is not None else -1)

    limit = min(sched.total_steps, cfg.max_steps) if cfg.max_steps else sched.total_steps
    bar = tqdm(total=limit, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    window = MetricWindow()

    def on_step(step: int, epoch: int, result: StepResult) -> None:
        nonlocal window
        bar.update(1)
        window.add(result)
        if not summary.first_losses:
            summary.first_losses = dict(result.terms)
        if step % cfg.log_every == 0 or step == limit:
            with record_function("logging"):
                log_window(step, result)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            saver.save(step, epoch)

    def log_window(step: int, result: StepResult) -> None:
        """The window's averages to the bar and dvclive, with the health figures of the step's last micro-batch."""
        nonlocal window
        summary.losses = window.averages()
        summary.images_per_s, summary.data_wait_fraction = window.rates()
        bar.set_postfix(loss=f"{summary.losses['total']:.4f}", lr=f"{result.lr:.2e}", img_s=f"{summary.images_per_s:.0f}")
        if rank == 0:  # label-free signs of a collapse
            summary.health = health_metrics(result.out, result.targets, objective.local)
        if live is not None:
            log_step(live, step, summary.losses, summary.health, lr=result.lr, images_per_s=summary.images_per_s,
                     data_wait_fraction=summary.data_wait_fraction)
        window = MetricWindow()

    model.train()
    try:
        while step < limit:
            step, finished = engine.train_epoch(loader, dataset, step, limit, on_step)
            if finished:
                saver.save(step, step // sched.steps_per_epoch)
        if saver.saved != step:
            saver.save(step, step // sched.steps_per_epoch)
    finally:
        bar.close()
        if live is not None:
            live.end()
            from pipeline.training.curves import write_curves

            write_curves(live.dir, title=Path(out_dir).name)  # offline PNGs beside dvclive's tables
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary.step, summary.epochs = step, step // sched.steps_per_epoch
    return summary


def _open_cache(params: Params, cache: str | None, grids: tuple[int, ...], progress: bool) -> tuple[str, dict]:
    """(store, its attributes): `cache`, or the store built for these params when None; validated."""
    found = cache is None
    if found:
        cache = find_store(params, progress=progress)
        log.info("teacher cache: %s (built for these params)", cache)
    try:
        attrs = cs.validate(cache, grids=grids)
    except cs.CacheSchemaError as exc:
        raise InputError(f"refusing to train on {cache}: {exc}") from None
    if not found:  # found by its fingerprint, which holds the manifest of data.images
        check_manifest(cache, attrs, params.data.images)
    return cache, attrs


def _data(params: Params, cache: str, attrs: dict, grids: tuple[int, ...], img_size: int, rank: int, world: int,
          device: torch.device) -> tuple[CachePairs, DataLoader, Schedule]:
    """The rank's share of the cache, its loader, and the schedule its length gives."""
    cfg = params.train
    dataset = CachePairs(cache, data_root(params.data.images), grids, img_size, rank=rank, world=world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, max_pixels=params.data.max_pixels, images=cfg.images, hflip=cfg.hflip)
    log.info("student images: %s", f"read from {cs.images_array(img_size)} in the cache" if dataset.image_source == "cache" else "decoded from the source files")
    other = [s for s in attrs.get("image_sizes", []) if s != img_size]
    if dataset.image_source == "decode" and cfg.images == "auto" and other:
        log.warning("%s stores student images at %s px, but %s takes %d px: decoding the source files instead", cache, other, params.student.variant, img_size)
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
    return dataset, loader, sched


class _Checkpointer:
    """Writes `checkpoint.pt` (rank 0, every process's RNG states gathered); remembers the last step saved."""

    def __init__(self, params: Params, engine: Engine, compat: dict, extra: dict, rank: int, world: int, saved: int):
        self.params, self.engine, self.compat, self.extra = params, engine, compat, extra
        self.rank, self.world, self.saved = rank, world, saved

    def save(self, step: int, epoch: int) -> None:
        self.saved = step
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if self.rank != 0:
            return
        e = self.engine
        payload = {
            "model": e.model.state_dict(), "optimizer": e.optimizer.state_dict(), "scaler": e.scaler.state_dict(),
            "schedule": asdict(e.sched), "step": step, "epoch": epoch, "rng": states, "compat": self.compat,
            "config": {name: section_dict(getattr(self.params, name)) for name in ("data", "teacher", "cache", "student", "loss", "train", "eval")},
            **self.extra,
        }
        with deferred_signals():  # a stop inside torch.save would surface as the zip writer's error, not as the stop
            save_checkpoint(e.ckpt_path, payload)
            SAVED.update(step=step, path=str(e.ckpt_path))


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
