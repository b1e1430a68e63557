"""Loading a trained student with its teacher, and `zeroseg segment`: any images, any vocabulary."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.checkpoint import load_checkpoint
from pipeline.config import Params, threshold_problem
from pipeline.decode import load_rgb
from pipeline.errors import InputError
from pipeline.inference import StudentSegmenter, name_key, vocabulary
from pipeline.manifest import IMAGE_EXTENSIONS, list_images, output_folder, read_text_file
from pipeline.overlay import class_table, write_mask, write_overlay
from pipeline.student import StudentArch, ZeroSegStudent
from pipeline.teacher import Teacher, resolve_device, teacher_candidates
from pipeline.text import ClassEmbedder, template_set

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A student from its checkpoint, and the teacher whose space its segments live in."""

    student: ZeroSegStudent
    teacher: Teacher
    embedder: ClassEmbedder
    checkpoint: dict


def load_model(params: Params, checkpoint: str | Path) -> LoadedModel:
    """Build the student from the checkpoint's own architecture and load the teacher of `params`.

    Raises:
        InputError: when the teacher in params is not the one the student was trained against
            (its segments would be classified in another embedding space).
    """
    ckpt = load_checkpoint(checkpoint)
    try:
        arch = StudentArch(**ckpt["arch"])
        student = ZeroSegStudent(arch=arch, out_dim=int(ckpt["cache"]["embed_dim"]))
        student.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{checkpoint}: not a zeroseg student checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    teacher = load_teacher_of(params, ckpt, checkpoint)
    return LoadedModel(student.eval(), teacher, ClassEmbedder(teacher), ckpt)


def load_teacher_of(params: Params, ckpt: dict, checkpoint: str | Path) -> Teacher:
    """The teacher a student was trained against: the one `params` name, or the checkpoint's own.

    `params.teacher` comes first. If it loads, it must be the student's teacher (same weights),
    or this is refused: segments would be classified in another embedding space. If it cannot
    be loaded here (a relative path from another folder, a file not on this machine), the
    places the checkpoint recorded (`teacher_files`: beside the checkpoint, where it was at
    training) are tried, and the first with the right weights is used.

    Raises:
        InputError: another teacher in params, or the student's teacher found nowhere (the
            message names it and the places tried).
    """
    trained = ckpt["cache"]["teacher"]
    want = trained["weights_sha256"]
    try:
        teacher = Teacher.load(params.teacher)
    except InputError as exc:
        first = f"{exc}"
    else:
        if teacher.identity.weights_sha256 != want:
            raise InputError(
                f"{checkpoint}: trained against teacher {trained['model']} (weights {want[:12]}), "
                f"but params name {teacher.identity.model} (weights {teacher.identity.weights_sha256[:12]})"
            )
        return teacher
    files = ckpt.get("teacher_files")
    tried = [f"{params.teacher.model} + {params.teacher.pretrained!r} from {params.source}"]
    for model, pretrained in teacher_candidates(files, checkpoint) if files else []:
        if (model, pretrained) == (params.teacher.model, params.teacher.pretrained):
            continue
        tried.append(f"{model} + {pretrained!r}")
        try:
            teacher = Teacher.load(dataclasses.replace(params.teacher, model=model, pretrained=pretrained))
        except InputError:
            continue
        if teacher.identity.weights_sha256 == want:
            log.info("teacher of %s: %s + %s (the checkpoint's record)", checkpoint, model, pretrained)
            return teacher
    raise InputError(
        f"{checkpoint}: needs its teacher {trained['model']} (pretrained {trained['pretrained']!r}, weights {want[:12]}), "
        f"found nowhere (tried {'; '.join(tried)}; first: {first}): set teacher.model and teacher.pretrained to where it is"
    )


def demo_model_note(model: LoadedModel) -> str:
    """A line for users of the demo model (its teacher knows only the demo's shapes); "" otherwise."""
    from pipeline.demo_data import CLASSES
    from pipeline.demo_teacher import MODEL

    if model.teacher.identity.model != MODEL:
        return ""
    return (f"this is the demo model: its teacher ({MODEL}) was trained on synthetic scenes and knows only "
            f"{', '.join(CLASSES[1:])} and background; other words get the nearest of those, so train on your own images "
            "for other classes (README: 'Switching to the paper's setup')")


def calibration_center(params: Params, model: LoadedModel, checkpoint: str | Path) -> torch.Tensor | None:
    """eval.calibration's mean: the teacher's dataset mean from the student's checkpoint (None when off).

    Raises:
        InputError: calibration is on and the checkpoint predates the statistics.
    """
    if params.eval.calibration == "none":
        return None
    stats = model.checkpoint.get("teacher_stats")
    if stats is None:
        raise InputError(f"{checkpoint}: eval.calibration={params.eval.calibration} needs the teacher's statistics, which this checkpoint predates; retrain it or set eval.calibration=none")
    return torch.tensor(stats["mean"], dtype=torch.float32)


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
    """'cat, dog,grass' -> ['cat', 'dog', 'grass']; a @FILE reads one class per line (UTF-8).

    Names that differ only in case or spacing are refused as repeats: CLIP's tokenizer lowercases
    and splits on whitespace, so they would get one embedding and the second could never win
    (refused for every teacher: names so close are a typo more often than two classes).
    """
    if text.startswith("@"):
        names = read_text_file(Path(text[1:])).splitlines()
    else:
        names = text.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError("--classes: give at least one class name")
    seen: dict[str, str] = {}
    for name in names:
        key = name_key(name)
        if key in seen:
            same = "repeated" if seen[key] == name else f"the same to the text encoder as {seen[key]!r}"
            raise InputError(f"--classes: {name!r} is {same}")
        seen[key] = name
    return names


def run_segment(params: Params, checkpoint: str | Path, images: Sequence[str | Path], classes: Sequence[str], out_dir: str | Path, *, threshold: float | None = None, progress: bool = True, on_result: Callable[[dict], None] | None = None,
                include_globs: Sequence[str] = (), exclude_globs: Sequence[str] = ()) -> list[dict]:
    """Segment `images` with vocabulary `classes`; writes NAME_mask.png and NAME_overlay.png.

    An image that cannot be read is skipped with its reason; the others are still segmented.
    Images under `out_dir` are not inputs. `on_result` gets each image's entry as it is done.

    Returns:
        per image: its path and either the two outputs and the legend (classes present,
        largest first) or, for a skipped image, "error".
    """
    e = params.eval
    if threshold is not None:
        if e.bg_rule == "class":
            raise InputError(f"--threshold {threshold}: eval.bg_rule is class, where background is wherever a bg_words entry wins; "
                             "the threshold applies to bg_rule probability or cosine")
        problem = threshold_problem(e.bg_rule, threshold)
        if problem:
            raise InputError(f"--threshold {threshold}: {problem}")
    out_dir = output_folder(out_dir, "--out")  # before the model loads: an unusable --out is found at once
    inputs = expand_images(images, exclude=out_dir, include_globs=include_globs, exclude_globs=exclude_globs)
    stems = output_stems([name for _, name in inputs])
    model = load_model(params, checkpoint)
    note = demo_model_note(model)
    if note:
        log.warning("%s", note)
    threshold = threshold if threshold is not None else e.bg_threshold.get("default", 0.5)
    text, rule = vocabulary(model.embedder, list(classes), template_set(e.templates), mode=e.bg_rule, threshold=threshold, bg_words=e.bg_words)
    device = resolve_device(e.device, key="eval.device")
    seg = StudentSegmenter(model.student, text, model.embedder.logit_scale, rule, short_side=e.short_side, window=e.window, stride=e.stride, topk_classes=e.topk_classes, device=device, protocol=e.protocol,
                           center=calibration_center(params, model, checkpoint))
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
        pred = seg.predict(image)
        mask_path, overlay_path = (out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        write_mask(mask_path, pred.labels, classes)
        legend = write_overlay(overlay_path, image, pred.labels, classes)
        done({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "legend": legend})
    return results
