"""One optimizer step and one epoch of the student, and the window of figures logged between.

What `run.py` sets up (model, objective, optimizer, data) this module runs, as MAE's
`engine_pretrain.train_one_epoch` does for `main_pretrain.py`: the learning rate of the step,
gradient accumulation over micro-batches (DDP synchronises only on the last), autocast, the
non-finite check before the optimizer step, gradient clipping and the scaler.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function
from torch.utils.data import DataLoader

from pipeline.config import Params
from pipeline.core.errors import ZerosegError
from pipeline.student.model import StudentOutput, ZeroSegStudent
from pipeline.student.normalize import normalize_images
from pipeline.student.objective import StudentObjective
from pipeline.training.data import CachePairs
from pipeline.training.schedule import Schedule

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ZerosegError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StepResult:
    """One optimizer step: its loss terms (averaged over its micro-batches) and what it took."""

    terms: dict[str, float]
    lr: float
    out: StudentOutput  # the last micro-batch's forward: the health figures are read from it
    targets: torch.Tensor  # [B, V, D] the last micro-batch's targets
    images: int  # images of the step, over every process
    wait: float  # seconds spent waiting for the data loader


@dataclass
class MetricWindow:
    """The steps since the last log: averages of each term, images per second, data wait."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        for k, v in result.terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += result.images
        self.wait += result.wait

    def averages(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()}

    def rates(self) -> tuple[float, float]:
        """(images per second, fraction of the time spent waiting for data) since the window began."""
        elapsed = time.perf_counter() - self.started
        return self.images / elapsed, self.wait / elapsed


class Engine:
    """The student's training step on one process (DDP or compiled model included)."""

    def __init__(self, params: Params, model: ZeroSegStudent, train_model: torch.nn.Module, objective: StudentObjective,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, sched: Schedule, device: torch.device,
                 world: int, ckpt_path: Path):
        self.params, self.cfg = params, params.train
        self.model, self.train_model, self.objective = model, train_model, objective
        self.optimizer, self.scaler, self.sched = optimizer, scaler, sched
        self.device, self.world, self.ckpt_path = device, world, ckpt_path
        self.amp = AMP[self.cfg.precision] if device.type == "cuda" else None

    def train_epoch(self, loader: DataLoader, dataset: CachePairs, step: int, limit: int,
                    on_step: Callable[[int, int, StepResult], None]) -> tuple[int, bool]:
        """Steps of the epoch `step` falls in, from `step` to the epoch's end or `limit`.

        A resumed run starts mid-epoch: the dataset skips the micro-batches already trained on.
        `on_step(step, epoch, result)` follows every step (logging, periodic checkpoints).
        Returns (the step reached, whether the epoch was finished).
        """
        sched = self.sched
        epoch, done_in_epoch = divmod(step, sched.steps_per_epoch)
        dataset.set_epoch(epoch, skip_batches=done_in_epoch * sched.accum, micro_batch=self.cfg.micro_batch)
        batches = iter(loader)
        while done_in_epoch < sched.steps_per_epoch and step < limit:
            result = self.train_step(batches, step)
            step += 1
            done_in_epoch += 1
            on_step(step, epoch, result)
        return step, done_in_epoch == sched.steps_per_epoch

    def train_step(self, batches: Iterator, step: int) -> StepResult:
        """One optimizer step over `sched.accum` micro-batches drawn from `batches`.

        Raises:
            TrainingDiverged: a loss term is not finite; the optimizer has not stepped.
        """
        cfg, sched, params = self.cfg, self.sched, self.params
        lr = sched.lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Loss terms stay on the device until the step's end: one host sync per optimizer
        # step, instead of one per term per micro-batch, each of which idled the GPU.
        on_device: dict[str, torch.Tensor] = {}
        seen, wait = 0, 0.0
        for micro in range(sched.accum):
            t0 = time.perf_counter()
            with record_function("data"):
                images, targets, _ = next(batches)
            wait += time.perf_counter() - t0
            images = normalize_images(images.to(self.device, non_blocking=True))  # [B, 3, H, W] uint8 -> normalized
            targets = targets.to(self.device, non_blocking=True).float()  # [B, V, D]
            last = micro == sched.accum - 1
            sync = self.train_model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync, torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None), record_function("forward"):
                out = self.train_model(images, params.student.mask_ratio, decode=self.objective.needs_decoder, tokens=self.objective.needs_tokens)
                total, terms = self.objective(out, targets, self.model.patchify(images))
            with record_function("backward"):
                self.scaler.scale(total / sched.accum).backward()
            for k, v in {**terms, "total": total}.items():
                on_device[k] = on_device.get(k, 0.0) + v.detach().float() / sched.accum
            seen += images.shape[0] * self.world
        terms_sum = dict(zip(on_device, torch.stack(list(on_device.values())).tolist()))  # the one sync
        if not all(math.isfinite(v) for v in terms_sum.values()):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms_sum.items())
            kept = f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"non-finite loss at step {step} ({shown}); stopped before the optimizer step; {kept}")
        with record_function("optimizer"):
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(terms=terms_sum, lr=lr, out=out, targets=targets, images=seen, wait=wait)
