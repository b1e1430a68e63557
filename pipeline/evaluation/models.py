"""Loading a trained student with the teacher it was trained from, from its checkpoint alone."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path


from pipeline.clip.model import Teacher, teacher_candidates
from pipeline.config import Params
from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.errors import InputError
from pipeline.clip.text import ClassEmbedder
from pipeline.student import StudentArch, ZeroSegStudent
from pipeline.student.legacy import upgrade_arch

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
        arch = StudentArch(**upgrade_arch(ckpt["arch"], StudentArch))
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


def demo_model_note(model: LoadedModel, classes=()) -> str:
    """A line for users of the demo model asking it for words it does not know (its teacher knows
    only the demo's shapes and background); "" for any other model, or for the demo's own words."""
    from pipeline.clip.text import name_key
    from pipeline.demo.data import CLASSES
    from pipeline.demo.teacher import MODEL

    if model.teacher.identity.model != MODEL or {name_key(c) for c in classes} <= set(CLASSES):
        return ""
    return (f"this is the demo model: its teacher ({MODEL}) was trained on synthetic scenes and knows only "
            f"{', '.join(CLASSES[1:])} and background; other words get the nearest of those, so train on your own images "
            "for other classes (README: 'Switching to the paper's setup')")
