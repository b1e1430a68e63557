"""The demo's CLIP teacher: a small open_clip model trained on captioned crops of the scenes.

No pretrained CLIP can be downloaded on a first, offline try, so the embedded default ships a
teacher of its own, reproducible from a seed with `zeroseg demo-teacher`. Training data are
crops of synthetic scenes at the cache's own scales (the whole scene, and cells of 2x2, 3x3
and 4x4 grids) captioned with the shape that dominates the crop ("a photo of a star.") or as
background; the loss is CLIP's contrastive loss with every pair of the same class counted as
positives of each other (a batch holds many crops of each class). The result is written in
open_clip's local-dir format (open_clip_config.json + open_clip_model.safetensors, fp16), so
`teacher.pretrained: assets/demo-teacher` loads it like any open_clip checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.clip.model import SHIPPED_CONFIGS, quiet_root_logger  # noqa: F401 - registers the shipped configs
from pipeline.core.errors import InputError
from pipeline.core.views import ViewSpec, cell_edges, make_views
from pipeline.demo.data import CLASSES, make_scene

MODEL = "zeroseg-demo-rn"


SHAPES = CLASSES[1:]


TRAIN_TEMPLATES = ("a photo of a {}.", "a {}.", "a {} shape.", "a picture of a {}.", "{}")


EVAL_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Crop:
    """One training or evaluation example: a crop of a scene and the class that dominates it."""

    pixels: np.ndarray  # [h, w, 3] uint8
    label: int  # index into CLASSES; 0 = background


def dominant_label(mask: np.ndarray, min_share: float = 0.25) -> int | None:
    """The class that dominates a crop's mask, 0 for plain background, None when ambiguous.

    A shape dominates when it covers at least `min_share` of the crop and 1.5x the next shape;
    a crop is background when shapes cover under 3% of it.
    """
    counts = np.bincount(mask.ravel(), minlength=len(CLASSES))[1:] / mask.size  # [6] shape shares
    order = np.argsort(counts)[::-1]
    if counts[order[0]] < 0.03:
        return 0
    if counts[order[0]] >= min_share and counts[order[0]] >= 1.5 * counts[order[1]]:
        return int(order[0]) + 1
    return None


def sample_crops(rng: np.random.Generator, n: int, *, size: int = 128, grids: tuple[int, ...] = (1, 2, 3, 4), background_share: float = 0.15) -> list[Crop]:
    """`n` labelled crops, shuffled: one cell of every grid per fresh scene (so every scale is
    equally common, the whole scene included), `background_share` of them background."""
    n_background = round(n * background_share)
    shapes: list[Crop] = []
    background: list[Crop] = []
    while len(shapes) < n - n_background or len(background) < n_background:
        img, mask, _ = make_scene(rng, size)
        pixels = np.array(img)  # [size, size, 3]
        for g in grids:
            edges = cell_edges(size, g)
            r, c = int(rng.integers(g)), int(rng.integers(g))
            cell = (slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1]))
            label = dominant_label(mask[cell])
            if label is not None:
                (background if label == 0 else shapes).append(Crop(pixels[cell], label))
    crops = shapes[: n - n_background] + background[:n_background]
    return [crops[i] for i in rng.permutation(len(crops))]


def to_views(crops: list[Crop], spec: ViewSpec) -> torch.Tensor:
    """[n, 3, T, T]: each crop resized as stage one resizes a cell (one 1x1 view of it)."""
    return make_views([torch.from_numpy(np.ascontiguousarray(c.pixels)) for c in crops], [1], spec)[:, 0]


def class_positive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with all same-class pairs as positives (soft targets).

    Args:
        image, text: [B, D] unit embeddings of the crops and of their captions.
        labels: [B] class of each pair.
    """
    logits = logit_scale * image @ text.T  # [B, B]
    positive = (labels[:, None] == labels[None, :]).float()  # [B, B]
    targets = positive / positive.sum(dim=1, keepdim=True)
    return 0.5 * (-(targets * logits.log_softmax(dim=1)).sum(1).mean() - (targets * logits.log_softmax(dim=0)).sum(0).mean())


def zero_shot_accuracy(model: torch.nn.Module, tokenizer, spec: ViewSpec, seed: int = 1234, per_grid: int = 400) -> dict[str, float]:
    """Shape accuracy on held-out crops: single-object scenes (1x1) and one-shape-dominated cells."""
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        text = F.normalize(model.encode_text(tokenizer([EVAL_TEMPLATE.format(s) for s in SHAPES])).float(), dim=-1)  # [6, D]
        out = {}
        for g in (1, 2, 3, 4):
            crops = [c for c in sample_crops(rng, 4 * per_grid, grids=(g,), background_share=0.0) if c.label > 0][:per_grid]
            image = F.normalize(model.encode_image(to_views(crops, spec)).float(), dim=-1)  # [n, D]
            predicted = (image @ text.T).argmax(dim=1) + 1
            out[f"{g}x{g}"] = float((predicted == torch.tensor([c.label for c in crops])).float().mean())
    return out


def train_demo_teacher(out_dir: str | Path, *, seed: int = 0, steps: int = 300, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.1, threads: int = 2, log=print,
                       model_name: str = MODEL) -> dict:
    """Train the demo teacher for `steps` optimizer steps and write it in open_clip's local-dir format.

    A fixed number of steps (not of minutes) keeps it reproducible from the seed on any machine.

    Returns:
        the metrics written to out_dir/metrics.json (accuracies, steps, seconds, sha256).
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    with quiet_root_logger():
        model = open_clip.create_model(model_name)  # a random init is what training starts from, not a failure to load
    model.visual.to(memory_format=torch.channels_last)  # 2-3x faster convolutions on the CPU
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else int(pp["size"][0])  # a ViT config gives (H, W)
    spec = ViewSpec(size=size, interpolation=pp["interpolation"], mean=tuple(pp["mean"]), std=tuple(pp["std"]))
    # Every caption there can be: (class, template) -> row of `captions` (35 of them).
    keys = [(label, t) for label in range(len(CLASSES)) for t in range(len(TRAIN_TEMPLATES))]
    captions = tokenizer([TRAIN_TEMPLATES[t].format(CLASSES[label] if label else "background") for label, t in keys])  # [35, ctx]
    row = {key: i for i, key in enumerate(keys)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    start, step = time.perf_counter(), 0
    log(f"training the demo teacher ({model_name}): {steps} steps of {batch_size} crops, seed {seed}, {threads} threads")
    model.train()
    while step < steps:
        crops = sample_crops(rng, batch_size)
        labels = torch.tensor([c.label for c in crops])
        rows = torch.tensor([row[(c.label, int(rng.integers(len(TRAIN_TEMPLATES))))] for c in crops])  # [B]
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        image = F.normalize(model.encode_image(to_views(crops, spec).contiguous(memory_format=torch.channels_last)), dim=-1)  # [B, D]
        text = F.normalize(model.encode_text(captions), dim=-1)[rows]  # [35, D] -> [B, D]: each caption encoded once
        loss = class_positive_loss(image, text, labels, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    model.eval()
    model.visual.to(memory_format=torch.contiguous_format)
    accuracy = zero_shot_accuracy(model, tokenizer, spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "open_clip_model.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600: a teacher to share reads like any other file
    config = {"model_cfg": open_clip.get_model_config(model_name), "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    metrics = {
        "model": model_name, "seed": seed, "steps": step, "seconds": round(time.perf_counter() - start, 1), "batch_size": batch_size,
        "lr": lr, "weight_decay": weight_decay, "threads": threads, "zero_shot_shape_accuracy": accuracy,
        "weights_sha256": sha, "weights_mb": round(weights.stat().st_size / 2**20, 2), "chance": 1 / len(SHAPES),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "SHA256SUMS").write_text(f"{sha}  open_clip_model.safetensors\n")
    return metrics


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an --out that already holds files (the default is the shipped teacher) unless `overwrite`.

    Raises:
        InputError: found before training, not after it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: not a folder")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not overwrite:
        raise InputError(f"--out {out_dir} already holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}: "
                         "pass another --out, or --overwrite to replace it (the shipped teacher is in git: git checkout restores it)")


def verify(out_dir: str | Path) -> str:
    """Check the shipped weights against SHA256SUMS; returns the sha256."""
    out_dir = Path(out_dir)
    expected = (out_dir / "SHA256SUMS").read_text().split()[0]
    actual = hashlib.sha256((out_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{out_dir}: open_clip_model.safetensors has sha256 {actual}, SHA256SUMS says {expected}")
    return actual


if __name__ == "__main__":  # pragma: no cover - `zeroseg demo-teacher` is the entry point
    import sys

    print(json.dumps(train_demo_teacher(sys.argv[1] if len(sys.argv) > 1 else "assets/demo-teacher", steps=int(sys.argv[2]) if len(sys.argv) > 2 else 300), indent=2))
