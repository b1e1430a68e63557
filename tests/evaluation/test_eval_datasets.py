"""Benchmark readers on tiny datasets written in each benchmark's exact folder layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.palette import voc_palette
from pipeline.demo.data import CLASSES, split_scenes, write_demo_dataset
from pipeline.evaluation import DATASETS, ConfusionMatrix, open_dataset

W, H = 40, 30  # not square, so a transposed mask would be caught


def write_image(path: Path, width: int = W, height: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path, quality=90)


def write_mask(path: Path, labels: np.ndarray, *, palette: bool) -> None:
    """A label PNG: a palette image (VOC) or an 8-bit grayscale one (the converted layouts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), "P" if palette else "L")
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def labels(*values: int) -> np.ndarray:
    """[H, W] uint8: vertical bands of the given labels."""
    bands = np.array_split(np.arange(W), len(values))
    out = np.zeros((H, W), np.uint8)
    for band, v in zip(bands, values):
        out[:, band] = v
    return out


VOC_MASKS = {"2007_000033": labels(0, 1, 255), "2007_000042": labels(15, 255, 0), "2008_000005": labels(20)}
CONTEXT_MASKS = {"2008_000002": labels(0, 1, 59), "2008_000010": labels(37, 41)}
COCO_MASKS = {"000000000139": labels(0, 1, 80), "000000000285": labels(23, 0)}


def write_split(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def voc_root(tmp_path) -> Path:
    """VOCdevkit/VOC2012 with three val images and one train image that must not be read."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for image_id, mask in {**VOC_MASKS, "2007_000032": labels(1)}.items():
        write_image(voc / "JPEGImages" / f"{image_id}.jpg")
        write_mask(voc / "SegmentationClass" / f"{image_id}.png", mask, palette=True)
    write_split(voc / "ImageSets" / "Segmentation" / "val.txt", list(VOC_MASKS))
    write_split(voc / "ImageSets" / "Segmentation" / "train.txt", ["2007_000032"])
    return tmp_path / "VOCdevkit"


@pytest.fixture
def context_root(tmp_path) -> Path:
    """VOCdevkit/VOC2010 as mmsegmentation's pascal_context converter leaves it."""
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    for image_id, mask in CONTEXT_MASKS.items():
        write_image(voc / "JPEGImages" / f"{image_id}.jpg")
        write_mask(voc / "SegmentationClassContext" / f"{image_id}.png", mask, palette=False)
    write_split(voc / "ImageSets" / "SegmentationContext" / "val.txt", list(CONTEXT_MASKS))
    return tmp_path / "VOCdevkit"


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """coco_stuff164k after GroupViT's convert_coco_object.py: its masks sit beside the stuff maps."""
    coco = tmp_path / "coco_stuff164k"
    for image_id, mask in COCO_MASKS.items():
        write_image(coco / "images" / "val2017" / f"{image_id}.jpg")
        write_mask(coco / "annotations" / "val2017" / f"{image_id}_instanceTrainIds.png", mask, palette=False)
        write_mask(coco / "annotations" / "val2017" / f"{image_id}.png", labels(181, 0), palette=False)
    return coco


def read_all(name: str, root: Path) -> dict[str, np.ndarray]:
    ds = open_dataset(name, root)
    out = {}
    for image_id, image_path, mask in ds:
        assert image_path.is_file() and image_path.stem == image_id
        assert mask.dtype == np.uint8 and mask.shape == (H, W)
        out[image_id] = mask
    return out


def test_registry_names():
    assert set(DATASETS) == {"voc", "context", "coco_object", "demo", "voc_layout"}
    with pytest.raises(InputError, match="nope: unknown dataset; choose one of voc, context"):
        open_dataset("nope", ".")


def test_voc_reads_val_split_with_palette_indices(voc_root):
    for root in (voc_root, voc_root / "VOC2012"):
        ds = open_dataset("voc", root)
        assert ds.root == voc_root / "VOC2012"
        assert ds.image_ids == tuple(VOC_MASKS)  # split order; the train image is not listed
        assert len(ds.class_names) == 21 and ds.class_names[0] == "background" and ds.ignore_index == 255
        assert ds.class_names[15] == "person" and ds.class_names[11] == "table"
    masks = read_all("voc", voc_root)
    for image_id, mask in VOC_MASKS.items():
        np.testing.assert_array_equal(masks[image_id], mask)  # 255 stays 255: no palette conversion


def test_voc_masks_feed_the_confusion_matrix(voc_root):
    ds = open_dataset("voc", voc_root)
    cm = ConfusionMatrix(ds.num_classes, ds.ignore_index)
    for _, _, mask in ds:
        cm.update(np.where(mask == 255, 0, mask), mask)
    scores = cm.scores().as_dict(ds.class_names)
    assert scores["miou"] == 1.0
    assert [k for k, v in scores["per_class_iou"].items() if v is not None] == ["background", "aeroplane", "person", "monitor"]


def test_context_layout(context_root):
    for root in (context_root, context_root / "VOC2010"):
        ds = open_dataset("context", root)
        assert len(ds) == 2 and len(ds.class_names) == 60
    assert ds.class_names[1] == "airplane" and ds.class_names[37] == "person" and ds.class_names[59] == "wood"
    masks = read_all("context", context_root)
    np.testing.assert_array_equal(masks["2008_000002"], CONTEXT_MASKS["2008_000002"])


def test_coco_object_layout_reads_only_instance_train_ids(coco_root):
    for root in (coco_root, coco_root.parent):
        ds = open_dataset("coco_object", root)
        assert ds.image_ids == tuple(sorted(COCO_MASKS)) and len(ds.class_names) == 81
    assert ds.class_names[1] == "person" and ds.class_names[80] == "toothbrush"
    assert ds.mask_path("000000000139").name == "000000000139_instanceTrainIds.png"
    masks = read_all("coco_object", coco_root)
    np.testing.assert_array_equal(masks["000000000139"], COCO_MASKS["000000000139"])


@pytest.mark.parametrize(
    "name, message",
    [  # voc is pointed at an empty folder, the others at the VOC 2012 devkit
        ("voc", "not a PASCAL VOC 2012 folder: expected JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/val.txt"),
        ("context", "not a PASCAL Context (mmsegmentation layout) folder: expected JPEGImages/, SegmentationClassContext/ and ImageSets/SegmentationContext/val.txt"),
        ("coco_object", "not a COCO-Object (GroupViT layout) folder: expected images/val2017/ and annotations/val2017/"),
        ("demo", "not a zeroseg demo split folder: expected JPEGImages/, SegmentationClass/"),
    ],
)
def test_wrong_layout_says_what_was_expected(tmp_path, voc_root, name, message):
    root = tmp_path / "empty" if name == "voc" else voc_root
    root.mkdir(exist_ok=True)
    with pytest.raises(InputError, match=re.escape(f"{root}: {message}")) as info:
        open_dataset(name, root)
    assert "\n" not in str(info.value)


def test_missing_mask_names_the_file(voc_root, coco_root):
    missing = voc_root / "VOC2012" / "SegmentationClass" / "2007_000042.png"
    missing.unlink()
    with pytest.raises(InputError, match=re.escape(f"{missing}: missing mask for image 2007_000042 listed in ImageSets/Segmentation/val.txt")):
        open_dataset("voc", voc_root)
    missing = coco_root / "annotations" / "val2017" / "000000000285_instanceTrainIds.png"
    missing.unlink()
    with pytest.raises(InputError, match=re.escape(f"{missing}: missing mask for image 000000000285")):
        open_dataset("coco_object", coco_root)


def test_missing_image_names_the_file(context_root):
    missing = context_root / "VOC2010" / "JPEGImages" / "2008_000010.jpg"
    missing.unlink()
    with pytest.raises(InputError, match=re.escape(f"{missing}: missing image 2008_000010")):
        open_dataset("context", context_root)


def test_a_bad_file_anywhere_in_the_split_is_found_when_it_opens(voc_root):
    """Headers are read when the split opens (not pixels): the last file is found before any work."""
    voc = voc_root / "VOC2012"
    bad = voc / "SegmentationClass" / "2008_000005.png"
    write_mask(bad, labels(1).T, palette=True)  # [W, H]: transposed
    with pytest.raises(InputError, match=re.escape(f"{bad}: mask is {H}x{W} but its image 2008_000005.jpg is {W}x{H}")):
        open_dataset("voc", voc_root)
    write_mask(bad, labels(1), palette=True)
    Image.new("RGB", (W, H)).save(voc / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(InputError, match="2007_000042.png: mask has PIL mode RGB; expected a single-channel 8-bit label PNG"):
        open_dataset("voc", voc_root)
    write_mask(voc / "SegmentationClass" / "2007_000042.png", labels(15, 255, 0), palette=True)
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # a PNG header claiming 400 Mpx
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    for content in (b"", b"not an image", bomb):
        (voc / "JPEGImages" / "2008_000005.jpg").write_bytes(content)
        with pytest.raises(InputError, match=re.escape(f"{voc / 'JPEGImages' / '2008_000005.jpg'}: cannot read image (")):
            open_dataset("voc", voc_root)


def test_bad_mask_contents(voc_root):
    seg = voc_root / "VOC2012" / "SegmentationClass"
    write_mask(seg / "2007_000033.png", labels(0, 21), palette=True)
    ds = open_dataset("voc", voc_root)  # opening reads headers, not labels
    with pytest.raises(InputError, match="2007_000033.png: mask holds label 21, neither a class in \\[0, 21\\) nor the ignore label 255"):
        ds[0]


def test_malformed_split(voc_root):
    split = voc_root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text("2007_000033\n2007_000042 1\n")
    with pytest.raises(InputError, match=re.escape(f"{split}: line 2 is '2007_000042 1'; expected one image id per line")):
        open_dataset("voc", voc_root)
    split.write_text("\n")
    with pytest.raises(InputError, match="the split lists no images"):
        open_dataset("voc", voc_root)
    split.write_text("2007_000033\n2007_000042\n2007_000033\n")  # it would be scored twice
    with pytest.raises(InputError, match=re.escape(f"{split}: line 3 repeats image 2007_000033 (first on line 1)")):
        open_dataset("voc", voc_root)
    split.write_bytes(b"\xff\xfe2\x000\x00")  # UTF-16
    with pytest.raises(InputError, match=re.escape(f"{split}: not UTF-8 text (byte 0: b'\\xff')")):
        open_dataset("voc", voc_root)
    split.write_bytes("\ufeff2007_000033\n".encode())  # a UTF-8 BOM is fine
    assert open_dataset("voc", voc_root).image_ids == ("2007_000033",)


def test_demo_split(tmp_path):
    write_demo_dataset(tmp_path, n_train=0, n_eval=3, size=32, seed=5)
    expected = [mask for _, mask, _ in split_scenes("test", 3, size=32, seed=5)]  # the held-out split's own stream
    for name, root in (("demo", tmp_path), ("demo", tmp_path / "eval"), ("voc_layout", tmp_path / "eval")):
        ds = open_dataset(name, root)
        assert ds.class_names == CLASSES and ds.image_ids == ("eval_000000", "eval_000001", "eval_000002")
        for sample, mask in zip(ds, expected):
            np.testing.assert_array_equal(sample.mask, mask)


def test_voc_layout_needs_classes_file(tmp_path):
    write_demo_dataset(tmp_path, n_train=0, n_eval=2, size=32)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(InputError, match="no classes.txt in .*eval or .*; expected one class name per line"):
        open_dataset("voc_layout", tmp_path / "eval")
    (tmp_path / "classes.txt").write_text("background\n")
    with pytest.raises(InputError, match="classes.txt: expected at least two class names"):
        open_dataset("demo", tmp_path)
    (tmp_path / "classes.txt").write_text("background\ncircle\n")  # fewer classes than the masks use
    with pytest.raises(InputError, match="mask holds label [2-6], neither a class in \\[0, 2\\)"):
        list(open_dataset("demo", tmp_path))
