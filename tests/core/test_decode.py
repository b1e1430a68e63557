import numpy as np
import pytest
import torch
from bad_images import write_bad_images
from helpers import smooth_photo
from PIL import Image

from pipeline.core.decode import center_square_box, decode_center_square


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_images(folder)


def test_every_awkward_file_is_embedded_or_fails_with_its_reason(bad_dir):
    folder, expected = bad_dir
    for name, (status, reason) in expected.items():
        d = decode_center_square(folder / name, min_side=16)
        if status == "ok":
            assert d.reason == "" and d.square is not None, name
            assert d.square.dtype == np.uint8 and d.square.ndim == 3 and d.square.shape[2] == 3
            assert d.square.shape[0] == d.square.shape[1] == min(d.size)
        else:
            assert d.square is None and reason in d.reason, (name, d.reason)
            assert "\n" not in d.reason


def test_conversions_keep_the_picture(bad_dir):
    folder, _ = bad_dir
    cmyk = decode_center_square(folder / "cmyk.jpg").square
    assert cmyk[32, 5, 0] > 150 and cmyk[32, 5, 2] < 90  # still red on the left
    gray16 = decode_center_square(folder / "gray16.png").square
    # 16-bit values scaled to 8 bits, not clipped to white: row 32 holds values near 32*64*16.
    assert abs(int(gray16[32, 0, 0]) - round(32 * 64 * 16 * 255 / 65535)) <= 1
    assert len(np.unique(gray16)) > 100
    gray = decode_center_square(folder / "gray.png").square
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_exif_orientation_is_applied(bad_dir):
    folder, _ = bad_dir
    d = decode_center_square(folder / "exif_rotated.jpg")
    assert d.size == (64, 96)  # 96x64 stored, rotated to portrait
    # red was on the left; rotated 90 degrees clockwise it is on top
    assert d.square[2, 32, 0] > 150 and d.square[-3, 32, 2] > 150


def test_missing_file_and_max_pixels(tmp_path, bad_dir):
    folder, _ = bad_dir
    assert "cannot read file" in decode_center_square(tmp_path / "nope.jpg").reason
    assert "exceeds data.max_pixels=1000" in decode_center_square(folder / "plain.jpg", max_pixels=1000).reason


def test_center_square_box_matches_torchvision_rounding():
    assert center_square_box(96, 64) == (16, 0, 80, 64)
    assert center_square_box(5, 8) == (0, 2, 5, 7)  # round(1.5) == 2, as torchvision rounds


def test_jpeg_draft_decodes_a_smaller_square_with_the_same_picture(tmp_path):
    from pipeline.core.views import ViewSpec, make_views

    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_photo(1600, 1200)).save(path, quality=92)
    full = decode_center_square(path)
    draft = decode_center_square(path, draft_side=256)
    assert full.square.shape == (1200, 1200, 3) and full.size == draft.size == (1600, 1200)
    # 1/4 scale gives 300 >= 256; 1/8 (150) would be too small
    assert draft.square.shape == (300, 300, 3)
    # the views a teacher sees (4x4 cells at 64 px, every cell still downsampled) are nearly the same
    spec = ViewSpec(size=64, interpolation="bicubic", mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    a, b = (make_views([torch.from_numpy(d.square)], (1, 2, 4), spec)[0] for d in (full, draft))
    diff = (a - b).abs()
    assert float(diff.mean()) < 2.0 and float(diff.quantile(0.99)) < 8.0  # 8-bit levels
    # no reduction when the source is already small enough, and never for other formats
    assert decode_center_square(path, draft_side=1200).square.shape == (1200, 1200, 3)
    png = tmp_path / "big.png"
    Image.fromarray(smooth_photo(800, 600)).save(png)
    assert decode_center_square(png, draft_side=100).square.shape == (600, 600, 3)


def test_jpeg_draft_keeps_the_exif_rotation_and_reports_the_source_size(tmp_path):
    img = Image.fromarray(smooth_photo(1200, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=92)
    d = decode_center_square(path, draft_side=200)
    assert d.size == (800, 1200) and d.square.shape == (200, 200, 3)  # 1/4 of 800
