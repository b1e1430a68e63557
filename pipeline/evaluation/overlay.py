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

from pipeline.core.palette import voc_palette

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colour(label: int) -> tuple[int, int, int]:
    """Colour of a label: black for background (0), else the palette's, past 255 cycling over
    entries 1-255 (entry 0 is black, which would read as background)."""
    return (0, 0, 0) if label == 0 else tuple(int(v) for v in PALETTE[1 + (label - 1) % 255])


def write_mask(path: str | Path, labels: np.ndarray, names: Sequence[str] | None = None) -> None:
    """labels: [H, W] ints -> palette PNG (16-bit grayscale PNG when a label exceeds 255).

    `names` (the vocabulary, label k = names[k-1]) go into the PNG's "classes" text chunk, one
    `k name` per line from `0 background`, so a mask says what its values mean on its own.
    """
    info = PngImagePlugin.PngInfo()
    if names is not None:
        info.add_itxt("classes", class_table(names))
    if labels.max(initial=0) > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path, pnginfo=info)
        return
    img = Image.fromarray(labels.astype(np.uint8), "P")
    img.putpalette(voc_palette())
    img.save(path, pnginfo=info)


def class_table(names: Sequence[str]) -> str:
    """"0 background\n1 NAME\n...": what each mask value means."""
    return "\n".join(f"{k} {name}" for k, name in enumerate(["background", *names])) + "\n"


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
        font = legend_font(max(8, min(32, out.height // 40)), cjk=any(ord(ch) >= CJK_START for name in legend for ch in name))
        line = max(8, draw.textbbox((0, 0), "Ag", font=font)[3] + 3)
        # The legend keeps to the picture's lower quarter (one line on a picture at least three lines
        # tall); else it would hide the picture. The PNG's text chunk lists every class either way.
        rows = max(int(out.height >= 3 * line), (out.height // LEGEND_SHARE - 4) // line)
        if rows >= 1:
            shown = legend_lines(legend, rows)
            width = max(draw.textlength(n, font=font) for n in shown) + line + 8
            top = out.height - 4 - line * len(shown)
            draw.rectangle([2, top - 2, 2 + width, out.height - 2], fill=(255, 255, 255))
            for i, (k, name) in enumerate(zip(order, shown)):
                y = top + i * line
                if i < len(shown) - 1 or len(shown) == len(legend):
                    draw.rectangle([5, y + 1, 5 + line - 4, y + line - 3], fill=colour(k), outline=(0, 0, 0))
                draw.text((8 + line, y), name, fill=(0, 0, 0), font=font)
    return out, legend


LEGEND_SHARE = 4  # the legend's box is at most 1/LEGEND_SHARE of the picture's height


def legend_lines(legend: Sequence[str], rows: int) -> list[str]:
    """The legend's lines in `rows` rows: all names, or as many as fit and "+N more"."""
    return list(legend) if len(legend) <= rows else [*legend[: rows - 1], f"+{len(legend) - rows + 1} more"]


# System fonts tried before PIL's own (Latin only): DejaVu and Noto also cover Greek, Cyrillic,
# Arabic, Hebrew..., so class names in those scripts are not drawn as boxes.
LEGEND_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial.ttf")


# Fonts with CJK glyphs, tried first when a class name has characters from U+2E80 on (CJK
# radicals, kana, hangul, ideographs); DejaVu draws them as boxes.
LEGEND_FONTS_CJK = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "wqy-microhei.ttc", "wqy-zenhei.ttc",
                    "DroidSansFallbackFull.ttf", "msyh.ttc", "YuGothM.ttc")


CJK_START = 0x2E80


@functools.cache
def legend_font(size: int, cjk: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The legend's font at `size` pixels: the first of LEGEND_FONTS found (after
    LEGEND_FONTS_CJK when `cjk`), else PIL's default."""
    for name in (*LEGEND_FONTS_CJK, *LEGEND_FONTS) if cjk else LEGEND_FONTS:
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
