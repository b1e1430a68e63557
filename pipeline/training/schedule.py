"""Derived sizes of a run: peak learning rate, accumulation, steps, warm-up (MAE's schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import TrainConfig
from pipeline.core.errors import ConfigError


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
