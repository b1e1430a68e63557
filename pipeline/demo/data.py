"""The built-in synthetic scenes: coloured shapes on textured backgrounds, with class masks.

Deterministic from a seed (same seed, same bytes), so the embedded default is reproducible on
any machine without a download. Training images go to `images/`; held-out scenes go to `eval/`
in the PASCAL VOC layout (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/
val.txt) so the evaluation reader treats them like any VOC-style dataset.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.palette import voc_palette

CLASSES = ("background", "circle", "square", "triangle", "star", "cross", "ring")


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring_points(n: int, radii: list[float]) -> list[tuple[float, float]]:
        return [
            (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n), cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if kind == "square":
        return ring_points(4, [r])
    if kind == "triangle":
        return ring_points(3, [r])
    if kind == "star":
        return ring_points(10, [r, 0.42 * r])
    if kind == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(kind)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] uint8: noise, a gradient or stripes, in muted colours."""
    base = rng.uniform(40, 200, size=3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == 0:
        field = rng.normal(0, 18, size=(size, size, 1))
    elif kind == 1:
        theta = rng.uniform(0, 2 * math.pi)
        field = (np.cos(theta) * xx + np.sin(theta) * yy)[..., None] * rng.uniform(40, 90) - 30
    else:
        theta, freq = rng.uniform(0, math.pi), rng.uniform(4, 12)
        field = np.sign(np.sin(2 * math.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)))[..., None] * 20
    tint = rng.uniform(0.6, 1.0, size=3)
    return np.clip(base + field * tint, 0, 255).astype(np.uint8)


def make_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4) -> tuple[Image.Image, np.ndarray, list[tuple[str, str]]]:
    """One scene.

    Returns:
        the RGB image, its [size, size] uint8 class mask (index into CLASSES), and the
        (colour, shape) of every object drawn, back to front.
    """
    img = Image.fromarray(_background(rng, size))
    mask = Image.new("L", (size, size), 0)
    draw_img, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = CLASSES[int(rng.integers(1, len(CLASSES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        r = rng.uniform(0.12, 0.28) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        fill, label = COLOURS[colour], CLASSES.index(kind)
        if kind in ("circle", "ring"):
            box = [cx - r, cy - r, cx + r, cy + r]
            width = 0 if kind == "circle" else max(2, int(0.35 * r))
            draw_img.ellipse(box, fill=None if width else fill, outline=fill, width=width or 1)
            draw_mask.ellipse(box, fill=None if width else label, outline=label, width=width or 1)
        else:
            poly = _shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw_img.polygon(poly, fill=fill)
            draw_mask.polygon(poly, fill=label)
        objects.append((colour, kind))
    return img, np.asarray(mask), objects


# Each split's random stream: demo_seed + this offset. The training scenes share seed 0's stream
# with the demo teacher's training crops (`pipeline/demo/teacher.py`, both training data); the
# validation and held-out splits each have a stream that nothing else draws from, so no scene of
# one is a scene of another (tests/demo/test_demo.py checks it pixel for pixel).
SPLITS = {"train": 0, "val": 1, "test": 2}


def split_scenes(split: str, n: int, *, size: int = 128, seed: int = 0):
    """The first `n` scenes of a split's stream: (image, mask, objects) each, as `make_scene` draws them."""
    rng = np.random.default_rng(seed + SPLITS[split])
    for _ in range(n):
        yield make_scene(rng, size)


def write_demo_split(out: str | Path, split: str, n: int, *, size: int = 128, seed: int = 0) -> int:
    """Write `n` scenes of `split`: training scenes into `out` itself (JPEG, no masks: a folder of
    images, as a user's would be), validation and held-out scenes with their masks to out/eval in
    the PASCAL VOC layout, with the class names in out/classes.txt."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r} ({', '.join(SPLITS)})")
    out = Path(out)
    names = []
    if split == "train":
        folder, prefix = out, "scene_"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, _, _) in enumerate(split_scenes(split, n, size=size, seed=seed)):
            img.save(folder / f"{prefix}{i:06d}.jpg", quality=92)
        stale = [(folder, prefix)]
    else:
        ev = out / "eval"
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (ev / sub).mkdir(parents=True, exist_ok=True)
        for i, (img, mask, _) in enumerate(split_scenes(split, n, size=size, seed=seed)):
            name = f"eval_{i:06d}"
            img.save(ev / "JPEGImages" / f"{name}.jpg", quality=92)
            m = Image.fromarray(mask, "P")
            m.putpalette(voc_palette())
            m.save(ev / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (ev / "ImageSets/Segmentation/val.txt").write_text("".join(f"{n}\n" for n in names))
        stale = [(ev / "JPEGImages", "eval_"), (ev / "SegmentationClass", "eval_")]
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    # Scenes of an earlier, larger run would still be found by the manifest (which lists the folder).
    for folder, prefix in stale:
        for old in folder.glob(f"{prefix}[0-9][0-9][0-9][0-9][0-9][0-9].*"):
            if int(old.stem[len(prefix):]) >= n:
                old.unlink()
    return n


def write_demo_dataset(out: str | Path, *, n_train: int, n_eval: int, size: int = 128, seed: int = 0) -> dict[str, int]:
    """Training scenes to out/images and `n_eval` held-out scenes to out/eval (the test split), in one folder."""
    write_demo_split(Path(out) / "images", "train", n_train, size=size, seed=seed)
    write_demo_split(out, "test", n_eval, size=size, seed=seed)
    return {"train": n_train, "eval": n_eval}
