"""Loading a trained student with its teacher, and `zeroseg segment`: any images, any vocabulary."""

from __future__ import annotations

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
from pipeline.overlay import write_mask, write_overlay
from pipeline.student import StudentArch, ZeroSegStudent
from pipeline.teacher import Teacher, resolve_device
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
    teacher = Teacher.load(params.teacher)
    trained = ckpt["cache"]["teacher"]
    if teacher.identity.weights_sha256 != trained["weights_sha256"]:
        raise InputError(
            f"{checkpoint}: trained against teacher {trained['model']} (weights {trained['weights_sha256'][:12]}), "
            f"but params name {teacher.identity.model} (weights {teacher.identity.weights_sha256[:12]})"
        )
    return LoadedModel(student.eval(), teacher, ClassEmbedder(teacher), ckpt)


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


def expand_images(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(path, name) per image: files as given (named by their file name), folders searched
    recursively (sorted; named by their path inside the folder), leaving out the masks and
    overlays under `exclude` (the output folder: a second run must not segment the first one's)."""
    out = []
    skip = Path(exclude).resolve() if exclude is not None else None

    def ours(path: Path) -> bool:
        return skip is not None and path.name.endswith(OUTPUT_SUFFIXES) and path.resolve().is_relative_to(skip)

    left_out = 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            root, rels = list_images(path)
            kept = [(root / r, Path(r)) for r in rels if not ours(root / r)]
            left_out += len(rels) - len(kept)
            out += kept
        elif path.is_file():
            if ours(path):  # given by name too, e.g. by a shell glob over the folder
                left_out += 1
            else:
                out.append((path, Path(path.name)))
        else:
            raise InputError(f"{path}: no such image or folder")
    if left_out:
        log.warning("left out %d masks and overlays under %s (the %s files a run writes there)", left_out, exclude, " and ".join(f"*{x}" for x in OUTPUT_SUFFIXES))
    if not out:
        raise InputError(f"no images in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
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


def run_segment(params: Params, checkpoint: str | Path, images: Sequence[str | Path], classes: Sequence[str], out_dir: str | Path, *, threshold: float | None = None, progress: bool = True, on_result: Callable[[dict], None] | None = None) -> list[dict]:
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
    inputs = expand_images(images, exclude=out_dir)
    stems = output_stems([name for _, name in inputs])
    model = load_model(params, checkpoint)
    threshold = threshold if threshold is not None else e.bg_threshold.get("default", 0.5)
    text, rule = vocabulary(model.embedder, list(classes), template_set(e.templates), mode=e.bg_rule, threshold=threshold, bg_words=e.bg_words)
    device = resolve_device(e.device, key="eval.device")
    seg = StudentSegmenter(model.student, text, model.embedder.logit_scale, rule, short_side=e.short_side, window=e.window, stride=e.stride, topk_classes=e.topk_classes, device=device,
                           center=calibration_center(params, model, checkpoint))
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
        write_mask(mask_path, pred.labels)
        legend = write_overlay(overlay_path, image, pred.labels, classes)
        done({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "legend": legend})
    return results
