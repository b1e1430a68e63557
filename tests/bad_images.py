"""Write one file of every awkward kind the stage-one decoder must handle, with the expected outcome."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (expected status, substring of the failure reason or "" when embedded)
EXPECTED = {
    "corrupt.jpg": ("failed", "not an image"),
    "truncated.jpg": ("failed", "corrupt or truncated"),
    "zero.png": ("failed", "empty file"),
    "text.png": ("failed", "not an image"),
    "bomb.png": ("failed", "decompression bomb"),
    "tiny.png": ("failed", "too small"),
    "cmyk.jpg": ("ok", ""),
    "gray16.png": ("ok", ""),
    "palette.png": ("ok", ""),
    "rgba.png": ("ok", ""),
    "gray.png": ("ok", ""),
    "exif_rotated.jpg": ("ok", ""),
    "plain.jpg": ("ok", ""),
}


def stripes(w: int = 96, h: int = 64) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 30, 30)
    arr[:, w // 2 :] = (30, 30, 200)
    return Image.fromarray(arr)


def write_bad_images(folder: Path) -> dict[str, tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    stripes(256, 256).save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture\n")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx, a few KB on disk
    stripes(8, 8).save(folder / "tiny.png")
    stripes().convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    stripes().convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(folder / "palette.png")
    stripes().convert("RGBA").save(folder / "rgba.png")
    stripes().convert("L").save(folder / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    stripes().save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    stripes().save(folder / "plain.jpg", quality=95)
    return EXPECTED
