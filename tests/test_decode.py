import numpy as np
import pytest

from bad_images import write_bad_images
from pipeline.decode import center_square_box, decode_center_square


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
