"""A run's checkpoint: what it holds, when it may be continued, and continuing it.

A checkpoint carries model, optimizer, scaler, schedule, step, every process's RNG states, the
config and the cache's fingerprint, so `--resume` continues exactly where it left off (same
batches, same masks, same numbers). It is continued only when everything that fixes the numbers
is as it was (`compatibility`); checkpoints written before a field joined that check are
migrated once, with a warning that says what is assumed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

import cache_schema as cs
from pipeline.config import LossConfig, Params, TrainConfig, section_dict
from pipeline.core.checkpoint import load_checkpoint, set_rng_state
from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"

# The checkpoint this process wrote last ({"step", "path"}): what an interrupted run can say it keeps.
SAVED: dict = {}


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


def resume(ckpt_path: Path, mode: str, compat: dict, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler) -> int | None:
    """Continue the checkpoint at `ckpt_path` into model, optimizer, scaler and this process's RNGs.

    Args:
        mode: "never" (start fresh), "must" (continue it, or fail), "auto" (continue it when it
            was made with the same `compat`, else start fresh).
    Returns:
        The step it continues from, or None when the run starts afresh.
    Raises:
        InputError: `mode` is "must" and there is no checkpoint, or one made with other settings.
    """
    if mode == "never":
        if ckpt_path.exists():
            log.warning("%s exists and is started afresh: it is replaced at the first checkpoint (--resume continues it)", ckpt_path)
        return None
    if not ckpt_path.exists():
        if mode == "must":
            raise InputError(f"{ckpt_path}: no checkpoint to resume")
        return None
    ckpt = _migrated(load_checkpoint(ckpt_path), ckpt_path, compat)
    if ckpt.get("compat") != compat:
        differs = [d.split(":")[0] for d in cs.differences(ckpt.get("compat", {}), compat)]  # train.base_lr, cache_fingerprint
        if mode == "must":
            why = " (they fix the data order and steps per epoch: set them as before)" if {"train.num_workers", "processes"} & set(differs) else ""
            raise InputError(f"{ckpt_path}: made with other {', '.join(differs)}{why}; cannot resume (remove it or use another --out)")
        log.warning("%s was made with other %s: starting afresh", ckpt_path, ", ".join(differs))
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
    return int(ckpt["step"])


def _migrated(ckpt: dict, ckpt_path: Path, compat: dict) -> dict:
    """A checkpoint written before a field joined the check, taken as made with today's value."""
    if "processes" not in ckpt.get("compat", {"processes": None}):
        # Written before the data order joined the check: it cannot say, so it is taken as it is.
        log.warning("%s predates the check of train.num_workers and the process count: resuming assumes they are as before", ckpt_path)
        ckpt["compat"] = {**ckpt["compat"], "processes": compat["processes"],
                          "train": {**ckpt["compat"].get("train", {}), "num_workers": compat["train"]["num_workers"]}}
    if "model" not in ckpt.get("compat", {}):
        log.warning("%s predates the check of the model's definition: resuming assumes it is as before", ckpt_path)
        ckpt["compat"] = {**ckpt.get("compat", {}), "model": compat["model"]}
    # A loss or train key added since (loss.view_anchors, train.hflip) is missing from an older
    # checkpoint, which was trained as the key's code default does: taken as that default, so it
    # resumes where today's value is the default and is refused where it is not.
    for name, defaults in (("loss", section_dict(LossConfig())), ("train", section_dict(TrainConfig()))):
        if isinstance(old := ckpt.get("compat", {}).get(name), dict):
            added = {k: defaults[k] for k in compat.get(name, {}) if k in defaults and k not in old}
            ckpt["compat"] = {**ckpt["compat"], name: {**old, **added}}
    return ckpt

