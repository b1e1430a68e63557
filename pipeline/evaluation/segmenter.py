"""A trained student from Python: any image, any words, the mask and the names back.

    from pipeline import Segmenter
    seg = Segmenter.load("models/student/checkpoint.pt")
    out = seg("photo.jpg", ["cat", "dog", "grass"])   # a path, a PIL image or an [H, W, 3] uint8 array
    out.mask, out.present                              # [H, W] labels (0 background, k: classes[k - 1]); names found
    out.overlay().save("overlay.png")

`zeroseg segment` runs this same code for every image it is given (`segment.run_segment`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.clip.dense import DENSE_CLIP
from pipeline.clip.text import name_key, parse_vocabulary, template_set
from pipeline.config import SECTIONS, Params, load_params, threshold_problem
from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.decode import load_rgb
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.evaluation.baselines import NamedSegments, teacher_segmenter
from pipeline.evaluation.models import LoadedModel, demo_model_note, load_model
from pipeline.evaluation.overlay import overlay
from pipeline.evaluation.student_naming import student_segmenter
from pipeline.evaluation.vocabulary import Namer, namers, student_calibrated, student_threshold

log = logging.getLogger(__name__)

NAMINGS = ("student", "training_free", *DENSE_CLIP)


def params_for_checkpoint(params: str | Path | None, overrides: Sequence[str], checkpoint: str | Path) -> Params:
    """Params for using a trained student: the file given, ./params.yaml, or else the checkpoint's own.

    The checkpoint records the teacher, data and eval sections it was trained with (and where its
    teacher's files were), so a model works from any folder with no params file at hand.
    """
    if params is not None or Path("params.yaml").is_file():
        return load_params(params or Path("params.yaml"), overrides)
    recorded = load_checkpoint(checkpoint, mmap=True).get("config", {})  # load_model reads the weights
    base = {}
    for name in ("teacher", "data", "eval"):  # what using a model reads; keys of other versions dropped
        known = {f.name for f in dataclasses.fields(SECTIONS[name])}
        base[name] = {k: v for k, v in recorded.get(name, {}).items() if k in known}
    return load_params(None, overrides, base=base, base_source=f"{checkpoint} (the params it was trained with)")


@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        mask: [H, W] int64 labels at the image's size: 0 background, k the class `classes[k - 1]`.
        classes: the vocabulary it was named with (background words of the class rule left out).
        image: [H, W, 3] uint8, the image as it was segmented.
    """

    mask: np.ndarray
    classes: list[str]
    image: np.ndarray

    @property
    def present(self) -> list[str]:
        """The classes in the mask, largest area first."""
        ids, counts = np.unique(self.mask[self.mask > 0], return_counts=True)
        return [self.classes[int(k) - 1] for _, k in sorted(zip(-counts, ids))]

    def overlay(self) -> Image.Image:
        """The classes' colours over the image, with a legend (as `zeroseg segment` writes it)."""
        return overlay(self.image, self.mask, self.classes)[0]


class Segmenter:
    """A trained student and its teacher, ready to segment images with any vocabulary.

    Args:
        model: the loaded student and teacher (`load_model`).
        params: the `eval` section decides the protocol, the background rule and its threshold.
        naming: `student` (its own naming), or a teacher method (`training_free`, `maskclip`,
            `sclip`, `naclip`) whose scores, averaged over each student segment, name it (the
            teacher runs too).
        threshold: the background threshold under the probability or cosine rule (None:
            `eval.student_bg_threshold.default` for the student's naming, else
            `eval.bg_threshold.default`, else 0.5).
        on_note: where the lines a user should read go (default: the log): that a background
            word is the background under the class rule, or that the demo model does not know a word.
    """

    def __init__(self, model: LoadedModel, params: Params, *, naming: str = "student", threshold: float | None = None,
                 on_note: Callable[[str], None] | None = None):
        e = params.eval
        if naming not in NAMINGS:
            raise InputError(f"naming: expected {', '.join(NAMINGS)}; got {naming!r}")
        if threshold is not None:
            if e.bg_rule == "class":
                raise InputError(f"threshold {threshold}: eval.bg_rule is class, where background is wherever a bg_words entry wins; "
                                 "the threshold applies to bg_rule probability or cosine")
            problem = threshold_problem(e.bg_rule, threshold)
            if problem:
                raise InputError(f"threshold {threshold}: {problem}")
        self.model, self.params, self.naming = model, params, naming
        teachers = e.bg_threshold.get("default", 0.5)
        self.threshold = threshold if threshold is not None else (teachers if naming != "student" else student_threshold(e, "default", teachers))
        self.note = on_note or (lambda line: log.warning("%s", line))
        seg = student_segmenter(model.student, e, resolve_device(e.device, key="eval.device"))
        if naming != "student":
            seg = NamedSegments(seg.student if isinstance(seg, NamedSegments) else seg, teacher_segmenter(naming, model.teacher, e))
        self.segmenter = seg
        self._namers: dict[tuple[str, ...], tuple[list[str], Namer]] = {}

    @classmethod
    def load(cls, checkpoint: str | Path, *, params: str | Path | None = None, overrides: Sequence[str] = (), **kwargs) -> Segmenter:
        """The student of `checkpoint`, with `params` (default: ./params.yaml, else the params it was
        trained with) and `overrides` (`SECTION.KEY=VALUE`, as `--set`). `kwargs`: as the constructor's."""
        loaded = params_for_checkpoint(params, overrides, checkpoint)
        return cls(load_model(loaded, checkpoint), loaded, **kwargs)

    def vocabulary(self, classes: Sequence[str] | str) -> tuple[list[str], Namer]:
        """The class names as the mask numbers them, and their embeddings under the background rule
        (computed once per vocabulary). `classes`: names, or a string as `--classes` takes it."""
        names = parse_vocabulary(classes, "classes") if isinstance(classes, str) else list(classes)
        key = tuple(names)
        if key not in self._namers:
            e = self.params.eval
            if e.bg_rule == "class":  # a dataset's class file lists its background too: under this rule it is the background
                words = {name_key(w) for w in e.bg_words}
                kept = [c for c in names if name_key(c) not in words]
                if len(kept) < len(names):
                    self.note(f"{', '.join(c for c in names if name_key(c) in words)}: the class rule's background word (eval.bg_words), "
                              "so the background, not a class")
                if not kept:
                    raise InputError("classes: every name is a background word (eval.bg_words); give the classes to find")
                names = kept
            unknown = demo_model_note(self.model, names)
            if unknown:
                self.note(unknown)
            namer = namers(self.model.embedder, names, template_set(e.templates), rules=[e.bg_rule], thresholds={e.bg_rule: self.threshold},
                           logit_scale=self.model.embedder.logit_scale, bg_words=e.bg_words, topk=e.topk_classes)[e.bg_rule]
            if self.naming == "student":
                namer = student_calibrated(namer, e, self.threshold)
            self._namers[key] = (names, namer)
        return self._namers[key]

    def __call__(self, image: str | Path | Image.Image | np.ndarray, classes: Sequence[str] | str) -> Segmentation:
        """Segment `image` (a file, a PIL image, or an [H, W, 3] / [H, W] uint8 array) with `classes`."""
        names, namer = self.vocabulary(classes)
        rgb = as_rgb(image, self.params.data.max_pixels)
        return Segmentation(self.segmenter.predict(rgb, namer).labels, names, rgb)


def as_rgb(image: str | Path | Image.Image | np.ndarray, max_pixels: int) -> np.ndarray:
    """[H, W, 3] uint8 of any image a user hands over (a file is decoded as `zeroseg segment` decodes it)."""
    if isinstance(image, (str, Path)):
        return load_rgb(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise InputError(f"image: expected an [H, W, 3] uint8 array, got {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)
