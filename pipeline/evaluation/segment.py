"""Loading a trained student with its teacher, and `zeroseg segment`: any images, any vocabulary."""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.clip.text import parse_vocabulary
from pipeline.config import Params
from pipeline.core.decode import load_rgb
from pipeline.core.errors import InputError
from pipeline.core.files import (
    IMAGE_EXTENSIONS,
    list_images,
    output_folder,
)
from pipeline.evaluation.models import load_model
from pipeline.evaluation.overlay import class_table, write_mask, write_overlay
from pipeline.evaluation.segmenter import Segmenter

log = logging.getLogger(__name__)


# Folders of ground truth beside the images in the layouts users bring: VOC (SegmentationClass,
# SegmentationClassAug, SegmentationObject), Cityscapes (gtFine, gtCoarse), ADE20K and COCO
# (annotations), and the common masks/labels. Searched folders leave them out; a folder named
# as an input is segmented whatever its name.
ANNOTATION_DIRS = ("segmentation*", "annotations*", "gtfine", "gtcoarse", "masks", "mask", "labels", "label", "groundtruth", "ground_truth")


def is_annotation_dir(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in ANNOTATION_DIRS)


def expand_images(inputs: Sequence[str | Path], exclude: str | Path | None = None, *, include_globs: Sequence[str] = (), exclude_globs: Sequence[str] = ()) -> list[tuple[Path, Path]]:
    """(path, name) per image: files as given (named by their file name), folders searched
    recursively (sorted; named by their path inside the folder), leaving out the masks and
    overlays under `exclude` (the output folder: a second run must not segment the first one's)
    and annotation folders inside a searched folder (`ANNOTATION_DIRS`).

    `include_globs` keep only the images whose name (path inside the folder, or file name)
    matches one of them; `exclude_globs` then leave out those matching one (fnmatch: `*` also
    crosses `/`, so `*.png` means every PNG at any depth).
    """
    out = []
    skip = Path(exclude).resolve() if exclude is not None else None

    def ours(path: Path) -> bool:
        return skip is not None and path.name.endswith(OUTPUT_SUFFIXES) and path.resolve().is_relative_to(skip)

    def wanted(name: Path) -> bool:
        text = name.as_posix()
        if include_globs and not any(fnmatch.fnmatchcase(text, g) for g in include_globs):
            return False
        return not any(fnmatch.fnmatchcase(text, g) for g in exclude_globs)

    left_out, annotations, filtered = 0, Counter(), 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            root, rels = list_images(path)
            for r in rels:
                name = Path(r)
                marked = next((i for i, part in enumerate(name.parts[:-1]) if is_annotation_dir(part)), None)
                if ours(root / r):
                    left_out += 1
                elif marked is not None:
                    annotations[path.joinpath(*name.parts[: marked + 1]).as_posix()] += 1
                elif not wanted(name):
                    filtered += 1
                else:
                    out.append((root / r, name))
        elif path.is_file():
            if ours(path):  # given by name too, e.g. by a shell glob over the folder
                left_out += 1
            elif not wanted(Path(path.name)):
                filtered += 1
            else:
                out.append((path, Path(path.name)))
        else:
            raise InputError(f"{path}: no such image or folder")
    if left_out:
        log.warning("left out %d masks and overlays under %s (the %s files a run writes there)", left_out, exclude, " and ".join(f"*{x}" for x in OUTPUT_SUFFIXES))
    if annotations:
        where = ", ".join(f"{folder} ({n})" for folder, n in sorted(annotations.items()))
        log.warning("left out %d files in annotation folders: %s; name such a folder as an input to segment it", sum(annotations.values()), where)
    if filtered:
        log.warning("left out %d images by --include/--exclude", filtered)
    if not out:
        raise InputError(f"no images in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
                         + (", outside annotation folders" if annotations else "") + (", matching --include/--exclude" if filtered else "") + ")")
    return out


OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")


def output_stems(names: Sequence[Path]) -> list[str]:
    """Where each image's outputs go, relative to --out: its name without the extension
    (sub/x.jpg -> sub/x), or with it where two images would share one (x.jpg, x.png).

    Raises:
        InputError: when two inputs still share one (two files x.jpg from different folders).
    """
    bare = [n.with_suffix("").as_posix() for n in names]
    shared = Counter(bare)
    stems = [n.as_posix() if shared[b] > 1 else b for n, b in zip(names, bare)]
    seen: dict[str, int] = {}
    for i, stem in enumerate(stems):
        if stem in seen:
            raise InputError(f"two inputs are both named {names[i].as_posix()}: their outputs would overwrite each other (segment their folder instead, or one at a time)")
        seen[stem] = i
    return stems


def parse_classes(text: str) -> list[str]:
    """`--classes`: 'cat, dog,grass' or @FILE (`parse_vocabulary`)."""
    return parse_vocabulary(text, "--classes")


def run_segment(params: Params, checkpoint: str | Path, images: Sequence[str | Path], classes: Sequence[str], out_dir: str | Path, *, threshold: float | None = None, progress: bool = True, on_result: Callable[[dict], None] | None = None,
                include_globs: Sequence[str] = (), exclude_globs: Sequence[str] = (), naming: str = "student", on_note: Callable[[str], None] | None = None) -> list[dict]:
    """Segment `images` with vocabulary `classes`; writes NAME_mask.png and NAME_overlay.png.

    `naming`: `student` (each segment by its own embedding), or a method of the teacher alone
    (`training_free`: its grid cells; `maskclip`, `sclip`, `naclip`: dense CLIP) whose scores,
    averaged over each student segment, name it (`NamedSegments`: the teacher runs too).

    An image that cannot be read is skipped with its reason; the others are still segmented.
    Images under `out_dir` are not inputs. `on_result` gets each image's entry as it is done;
    `on_note` (default: the log) the lines a user should read before the results: that a
    background word among `classes` is the background under the class rule, or that the demo
    model does not know some of the words.

    Returns:
        per image: its path and either the two outputs and the legend (classes present,
        largest first) or, for a skipped image, "error".
    """
    out_dir = output_folder(out_dir, "--out")  # before the model loads: an unusable --out is found at once
    inputs = expand_images(images, exclude=out_dir, include_globs=include_globs, exclude_globs=exclude_globs)
    stems = output_stems([name for _, name in inputs])
    try:
        segmenter = Segmenter(load_model(params, checkpoint), params, naming=naming, threshold=threshold, on_note=on_note)
    except InputError as exc:  # the options of the command line
        raise InputError(f"--{exc}") from None
    classes, _ = segmenter.vocabulary(classes)
    (out_dir / "classes.txt").write_text(class_table(classes), encoding="utf-8")  # what the masks' values mean
    results = []

    def done(entry: dict) -> None:
        results.append(entry)
        if on_result:
            on_result(entry)

    for (path, _), stem in tqdm(list(zip(inputs, stems)), desc="segment", unit="img", disable=not progress):
        try:
            image = load_rgb(path, max_pixels=params.data.max_pixels)
        except InputError as exc:
            done({"image": str(path), "error": str(exc)})
            continue
        result = segmenter(image, classes)
        mask_path, overlay_path = (out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        write_mask(mask_path, result.mask, classes)
        legend = write_overlay(overlay_path, image, result.mask, classes)
        done({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "legend": legend})
    return results
