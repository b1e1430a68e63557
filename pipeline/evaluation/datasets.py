"""Readers of the zero-shot benchmarks in their standard folder layouts, and of VOC-style splits.

Each benchmark is a `Layout` (folders, file suffixes, split list, class names) read by one
function; `open_dataset(name, root)` looks the name up in `DATASETS`. Layouts, label values and
class names follow GroupViT's evaluation (NVlabs/GroupViT, segmentation/configs/_base_/datasets/
and segmentation/datasets/), which in turn uses mmsegmentation's converted layouts:

- voc: PASCAL VOC 2012 val, 1,449 images. Masks are palette PNGs whose palette indices are the
  labels: 0 background, 1..20 objects, 255 object boundaries (ignored).
- context: PASCAL Context val, 5,105 images, converted by mmsegmentation's
  tools/convert_datasets/pascal_context.py: grayscale PNGs, 0 background, 1..59 classes in the
  order of that script's sorted label map (alphabetical). No ignore pixels.
- coco_object: COCO-Object val2017, 5,000 images, converted from COCO-Stuff164k by GroupViT's
  convert_dataset/convert_coco_object.py: masks `<id>_instanceTrainIds.png` beside the original
  stuff maps, 0 background (every stuff class and unlabeled pixels), 1..80 the thing classes.
  That script maps 255 to background too, so the converted masks hold no ignore pixels.
- demo / voc_layout: any VOC-style folder (the project's own held-out split) whose class names
  are in a `classes.txt` beside it or one level up.

Class names are GroupViT's prompt-friendly ones ("table" for diningtable, "plant" for
pottedplant, "monitor" for tvmonitor); label indices are those of the masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.files import read_text_file

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train",
    "monitor",
)

CONTEXT_CLASSES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall", "water",
    "window", "wood",
)

COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


class Sample(NamedTuple):
    """One evaluation image.

    Attributes:
        image_id: the file stem, as listed in the split.
        image_path: the image file (not decoded here: the evaluator owns resizing).
        mask: [H, W] uint8 labels in [0, C) or the ignore index, H x W the image's stored size.
    """

    image_id: str
    image_path: Path
    mask: np.ndarray


@dataclass(frozen=True)
class Layout:
    """Where a benchmark keeps its files, relative to its root folder.

    Attributes:
        title: the benchmark's name in messages.
        image_dir, mask_dir: folders of images and masks.
        split: text file listing image ids one per line; None lists every image in image_dir.
        class_names: label index -> name; index 0 is background.
        subdirs: folders under a user's ROOT that may hold the benchmark (e.g. VOCdevkit/VOC2012).
        image_suffix, mask_suffix: appended to an image id to name its files.
    """

    title: str
    image_dir: str
    mask_dir: str
    split: str | None
    class_names: tuple[str, ...]
    subdirs: tuple[str, ...] = ()
    image_suffix: str = ".jpg"
    mask_suffix: str = ".png"

    def expected(self) -> str:
        parts = [f"{self.image_dir}/", f"{self.mask_dir}/"] + ([self.split] if self.split else [])
        where = f" (in ROOT or {', '.join(f'ROOT/{s}' for s in self.subdirs)})" if self.subdirs else ""
        return f"{', '.join(parts[:-1])} and {parts[-1]}{where}"

    def matches(self, folder: Path) -> bool:
        split_ok = self.split is None or (folder / self.split).is_file()
        return (folder / self.image_dir).is_dir() and (folder / self.mask_dir).is_dir() and split_ok


VOC2012 = Layout(
    title="PASCAL VOC 2012",
    image_dir="JPEGImages",
    mask_dir="SegmentationClass",
    split="ImageSets/Segmentation/val.txt",
    class_names=VOC_CLASSES,
    subdirs=("VOC2012", "VOCdevkit/VOC2012"),
)
PASCAL_CONTEXT = Layout(
    title="PASCAL Context (mmsegmentation layout)",
    image_dir="JPEGImages",
    mask_dir="SegmentationClassContext",
    split="ImageSets/SegmentationContext/val.txt",
    class_names=CONTEXT_CLASSES,
    subdirs=("VOC2010", "VOCdevkit/VOC2010"),
)
COCO_OBJECT = Layout(
    title="COCO-Object (GroupViT layout)",
    image_dir="images/val2017",
    mask_dir="annotations/val2017",
    split=None,
    class_names=COCO_OBJECT_CLASSES,
    subdirs=("coco_stuff164k", "coco"),
    mask_suffix="_instanceTrainIds.png",
)


@dataclass(frozen=True)
class SegmentationDataset:
    """A resolved benchmark split: which images, where their masks are, what the labels mean.

    Iterating (or indexing) reads one mask at a time and checks it against its image.

    Attributes:
        root: the folder that holds the layout's files.
        layout: the layout it was read with.
        image_ids: ids in split order (sorted file order when the layout has no split file).
        class_names: label index -> name, index 0 "background" for the benchmarks.
        ignore_index: ground-truth label that is not scored.
    """

    root: Path
    layout: Layout
    image_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        return self.root / self.layout.image_dir / f"{image_id}{self.layout.image_suffix}"

    def mask_path(self, image_id: str) -> Path:
        return self.root / self.layout.mask_dir / f"{image_id}{self.layout.mask_suffix}"

    def __getitem__(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        image_path, mask_path = self.image_path(image_id), self.mask_path(image_id)
        mask = _read_mask(mask_path, self.num_classes, self.ignore_index)  # [H, W]
        # stored size: benchmark masks annotate the stored pixels
        _require_same_size(mask_path, (mask.shape[1], mask.shape[0]), image_path, _image_size(image_path))
        return Sample(image_id, image_path, mask)

    def check_headers(self) -> None:
        """Read every image's and mask's header (not their pixels): each opens, each mask is a
        single-channel 8-bit PNG of its image's size (0.07 ms a pair on the demo split, files
        cached), so that a bad file near the end of a split stops the run before the
        evaluation, not hours into it.

        Raises:
            InputError: naming the first bad file and what is wrong with it.
        """
        for image_id in self.image_ids:
            image_path, mask_path = self.image_path(image_id), self.mask_path(image_id)
            image_size = _image_size(image_path)
            try:
                with Image.open(mask_path) as img:
                    mode, size = img.mode, img.size
            except PIL_ERRORS as exc:
                raise InputError(f"{mask_path}: cannot read mask ({type(exc).__name__}: {exc})") from None
            _require_label_mode(mask_path, mode)
            _require_same_size(mask_path, size, image_path, image_size)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


# What PIL raises on a file it cannot open: OSError (UnidentifiedImageError is one), SyntaxError
# for some broken headers, DecompressionBombError (not an OSError) past its pixel limit.
PIL_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def _require_label_mode(path: Path, mode: str) -> None:
    if mode not in ("P", "L"):
        raise InputError(f"{path}: mask has PIL mode {mode}; expected a single-channel 8-bit label PNG (palette or grayscale)")


def _require_same_size(mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]) -> None:
    """Sizes as (width, height)."""
    if mask_size != image_size:
        raise InputError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path.name} is {image_size[0]}x{image_size[1]}")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header."""
    try:
        with Image.open(path) as img:
            return img.size
    except PIL_ERRORS as exc:
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'empty or not an image'})") from None


def _read_mask(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """[H, W] uint8 labels of a label PNG; palette indices are kept (no palette conversion)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.array(img)
    except OSError as exc:
        raise InputError(f"{path}: cannot read mask ({exc})") from None
    _require_label_mode(path, mode)  # P and L arrays are uint8
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        raise InputError(
            f"{path}: mask holds label {int(mask[bad][0])}, neither a class in [0, {num_classes}) "
            f"nor the ignore label {ignore_index}"
        )
    return mask


def _resolve_root(layout: Layout, root: Path) -> Path:
    for folder in (root, *(root / s for s in layout.subdirs)):
        if layout.matches(folder):
            return folder
    raise InputError(f"{root}: not a {layout.title} folder: expected {layout.expected()}")


def _read_split(path: Path) -> tuple[str, ...]:
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        fields = line.split()
        if len(fields) > 1:
            raise InputError(f"{path}: line {number} is {line.strip()!r}; expected one image id per line")
        for image_id in fields:
            if image_id in first_line:  # it would be scored twice
                raise InputError(f"{path}: line {number} repeats image {image_id} (first on line {first_line[image_id]})")
            first_line[image_id] = number
            ids.append(image_id)
    if not ids:
        raise InputError(f"{path}: the split lists no images")
    return tuple(ids)


def open_layout(layout: Layout, root: str | Path) -> SegmentationDataset:
    """Find `layout` under `root`, list the split and check every listed file exists and that
    its header reads (`SegmentationDataset.check_headers`).

    Raises:
        InputError: the folders or split file are missing (naming the layout expected), the
            split is empty, malformed or repeats an id, or a listed image or mask is missing or
            unreadable or of the wrong kind or size (naming the file).
    """
    folder = _resolve_root(layout, Path(root))
    if layout.split is not None:
        ids = _read_split(folder / layout.split)
    else:
        image_dir = folder / layout.image_dir
        ids = tuple(sorted(p.name[: -len(layout.image_suffix)] for p in image_dir.glob(f"*{layout.image_suffix}")))
        if not ids:
            raise InputError(f"{image_dir}: no *{layout.image_suffix} images")
    dataset = SegmentationDataset(folder, layout, ids, layout.class_names)
    listed_in = f"listed in {layout.split}" if layout.split else f"in {layout.image_dir}/"
    for image_id in ids:
        if not dataset.image_path(image_id).is_file():
            raise InputError(f"{dataset.image_path(image_id)}: missing image {image_id} {listed_in}")
        if not dataset.mask_path(image_id).is_file():
            raise InputError(f"{dataset.mask_path(image_id)}: missing mask for image {image_id} {listed_in}")
    dataset.check_headers()
    return dataset


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names one per line (blank lines skipped); line i is label i."""
    names = tuple(line.strip() for line in read_text_file(path).splitlines() if line.strip())
    if len(names) < 2:
        raise InputError(f"{path}: expected at least two class names, one per line, background first")
    if len(names) != len(set(names)):
        raise InputError(f"{path}: class names are not unique")
    if len(names) > IGNORE_INDEX:
        raise InputError(f"{path}: {len(names)} classes; label {IGNORE_INDEX} is reserved for ignored pixels")
    return names


def open_voc_layout(root: str | Path, *, title: str = "VOC-layout", subdirs: tuple[str, ...] = ()) -> SegmentationDataset:
    """A VOC-style split (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt) whose
    label names are in classes.txt inside the split folder or one level up."""
    root = Path(root)
    probe = Layout(title, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt", (), subdirs)
    folder = _resolve_root(probe, root)
    candidates = (folder / "classes.txt", folder.parent / "classes.txt")
    classes_file = next((p for p in candidates if p.is_file()), None)
    if classes_file is None:
        raise InputError(f"{root}: no classes.txt in {folder} or {folder.parent}; expected one class name per line")
    return open_layout(replace(probe, class_names=read_class_names(classes_file)), folder)


DATASETS: dict[str, Callable[[str | Path], SegmentationDataset]] = {
    "voc": partial(open_layout, VOC2012),
    "context": partial(open_layout, PASCAL_CONTEXT),
    "coco_object": partial(open_layout, COCO_OBJECT),
    "demo": partial(open_voc_layout, title="zeroseg demo split", subdirs=("eval",)),
    "voc_layout": open_voc_layout,
}


def open_dataset(name: str, root: str | Path) -> SegmentationDataset:
    """Open benchmark `name` (a key of DATASETS) found under `root`."""
    if name not in DATASETS:
        raise InputError(f"{name}: unknown dataset; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](root)
