"""Pictures of a segmentation: a palette mask PNG and an overlay PNG with a legend.

Both are the input's size. The mask's pixel values are the labels (0 = background, k = class
k-1 of the vocabulary) with the PASCAL VOC palette, so any image viewer shows it and any
reader gets the labels back. The overlay blends class colours over the image and draws a
legend of the classes present inside its lower-left corner; the legend's class names are also
stored in the PNG's text chunk `legend` (one per line) for tools.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from pipeline.demo_data import voc_palette

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colour(label: int) -> tuple[int, int, int]:
    """Colour of a label; labels past 255 wrap (the mask PNG then holds label % 256)."""
    return tuple(int(v) for v in PALETTE[label % 256]) if label % 256 else (0, 0, 0)


def write_mask(path: str | Path, labels: np.ndarray) -> None:
    """labels: [H, W] ints -> palette PNG (16-bit grayscale PNG when a label exceeds 255)."""
    if labels.max(initial=0) > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    img = Image.fromarray(labels.astype(np.uint8), "P")
    img.putpalette(voc_palette())
    img.save(path)


def overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], *, alpha: float = 0.55) -> tuple[Image.Image, list[str]]:
    """Blend class colours over `image` and draw a legend of the classes present.

    Args:
        image: [H, W, 3] uint8.
        labels: [H, W] ints, 0 = background, k = names[k - 1].
        names: the vocabulary.
    Returns:
        the overlay (the input's size) and the legend's entries, largest area first.
    """
    present, counts = np.unique(labels[labels > 0], return_counts=True)
    order = [int(k) for _, k in sorted(zip(-counts, present))]
    colours = np.array([colour(k) for k in range(int(labels.max(initial=0)) + 1)], dtype=np.float32)  # [L+1, 3]
    blend = image.astype(np.float32)
    fg = labels > 0
    blend[fg] = (1 - alpha) * blend[fg] + alpha * colours[labels[fg]]
    out = Image.fromarray(blend.round().clip(0, 255).astype(np.uint8))
    legend = [names[k - 1] for k in order]
    if legend:
        draw = ImageDraw.Draw(out)
        font = legend_font(max(11, min(32, out.height // 40)))
        line = max(10, draw.textbbox((0, 0), "Ag", font=font)[3] + 3)
        width = max(draw.textlength(n, font=font) for n in legend) + line + 8
        shown = legend[: max(1, (out.height - 4) // line)]
        top = out.height - 4 - line * len(shown)
        draw.rectangle([2, top - 2, 2 + width, out.height - 2], fill=(255, 255, 255))
        for i, (k, name) in enumerate(zip(order, shown)):
            y = top + i * line
            draw.rectangle([5, y + 1, 5 + line - 4, y + line - 3], fill=colour(k), outline=(0, 0, 0))
            draw.text((8 + line, y), name, fill=(0, 0, 0), font=font)
    return out, legend


# System fonts tried before PIL's own (Latin only): DejaVu and Noto also cover Greek, Cyrillic,
# Arabic, Hebrew..., so class names in those scripts are not drawn as boxes.
LEGEND_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial.ttf")


@functools.cache
def legend_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The legend's font at `size` pixels: the first of LEGEND_FONTS found, else PIL's default."""
    for name in LEGEND_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def write_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> list[str]:
    """Write the overlay PNG; returns its legend entries."""
    img, legend = overlay(image, labels, names)
    info = PngImagePlugin.PngInfo()
    info.add_text("legend", "\n".join(legend))
    img.save(path, pnginfo=info)
    return legend
