"""Decode one image into the center square both teacher and student see, or say why not.

Every kind of bad input ends here as a failure reason, never as an exception that stops the run:
missing, empty, non-image, truncated or corrupt files, decompression bombs, images too small for
the grid. Unusual but valid images are converted the way open_clip's own preprocess would see
them (`convert("RGB")`: CMYK, palette, RGBA, grayscale), except 16-bit grayscale, which PIL's
convert would clip to white and which is scaled to 8 bits instead. EXIF orientation is applied.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.core import tars
from pipeline.core.errors import InputError

# Truncated files must fail, not decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Decoded:
    """A decoded center square, or the reason there is none.

    Attributes:
        square: [S, S, 3] uint8 RGB, the center square at source resolution; None on failure.
        reason: "" when decoded, otherwise one line saying what is wrong with the file.
        size: (width, height) of the source after EXIF rotation, (0, 0) when unknown.
    """

    square: np.ndarray | None
    reason: str = ""
    size: tuple[int, int] = (0, 0)


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centered square, rounded as torchvision's center_crop."""
    side = min(width, height)
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def decode_center_square(path: str | Path, *, min_side: int = 1, max_pixels: int = 178_956_970, draft_side: int = 0) -> Decoded:
    """Read `path`, apply EXIF orientation, convert to RGB and cut the center square.

    Args:
        path: the image file.
        min_side: the smallest acceptable square side (the largest grid: every cell needs a pixel).
        max_pixels: images with more pixels are refused as decompression bombs before decoding.
        draft_side: 0, or let a JPEG decode at a reduced DCT scale (1/2, 1/4 or 1/8: libjpeg
            skips most of the work) as long as the center square keeps at least this side.
            The square is then smaller than the source's; `size` still reports the source.
    """
    rgb, reason, size = _open_rgb(Path(path), max_pixels, draft_side=draft_side)
    if rgb is None:
        return Decoded(None, reason, size)
    width, height = rgb.size
    if min(size) < min_side:
        return Decoded(None, f"too small: {size[0]}x{size[1]}, the center square needs at least {min_side} px", size)
    square = np.array(rgb.crop(center_square_box(width, height)))  # [S, S, 3] uint8, writable
    return Decoded(square, "", size)


def student_input(square: np.ndarray, size: int) -> np.ndarray:
    """[3, size, size] uint8: a center square [S, S, 3] resized for the student (PIL bicubic, antialiased).

    The one definition of the student's pixels: stage two decoding on the fly and stage one
    storing them in the cache (`cache.student_image_size`) both call it, so both give the same bytes.
    """
    img = Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # [3, size, size]


def load_rgb(path: str | Path, *, max_pixels: int = 178_956_970, exif: bool = True) -> np.ndarray:
    """The whole image as [H, W, 3] uint8 RGB, for inference.

    Args:
        exif: apply the EXIF orientation (False for benchmarks, whose masks annotate stored pixels).
    Raises:
        InputError: naming the file and what is wrong with it.
    """
    rgb, reason, _ = _open_rgb(Path(path), max_pixels, exif)
    if rgb is None:
        raise InputError(f"{path}: {reason}")
    return np.array(rgb)


def _open_rgb(path: Path, max_pixels: int, exif: bool = True, draft_side: int = 0) -> tuple[Image.Image | None, str, tuple[int, int]]:
    """The decoded RGB image, or None and the reason; and the source's (width, height) after EXIF rotation.

    `path` is a file, or a member of a webdataset tar shard (`SHARD::MEMBER`, pipeline/core/tars.py).
    """
    source: Path | io.BytesIO = path
    try:
        if tars.is_member(path):
            data = tars.read_member(path)
            if not data:
                return None, "empty tar member (0 bytes)", (0, 0)
            source = io.BytesIO(data)
        elif path.stat().st_size == 0:
            return None, "empty file (0 bytes)", (0, 0)
    except OSError as exc:
        return None, f"cannot read {'tar member' if tars.is_member(path) else 'file'} ({exc.strerror or exc})", (0, 0)
    size = (0, 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return None, f"decompression bomb: {width}x{height} pixels exceeds data.max_pixels={max_pixels}", (width, height)
                size = (width, height)
                side = min(width, height)
                if draft_side and img.format == "JPEG" and side > draft_side:
                    # PIL picks the largest DCT reduction whose result is at least the requested size.
                    scale = draft_side / side
                    img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                img.load()
                rgb = _to_rgb(ImageOps.exif_transpose(img) if exif else img)
                if (rgb.width > rgb.height) != (width > height):  # EXIF rotated it by 90 degrees
                    size = (height, width)
                return rgb, "", size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression bomb: {exc}", size
    except UnidentifiedImageError:
        return None, "not an image PIL can identify", size
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, f"corrupt or truncated image ({str(exc) or type(exc).__name__})", size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: PIL's convert("RGB") clips at 255, so scale instead.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if img.mode == "F":
        gray = np.clip(np.round(np.asarray(img) * (255.0 if np.asarray(img).max() <= 1.0 else 1.0)), 0, 255)
        return Image.fromarray(np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2), "RGB")
    return img.convert("RGB")
