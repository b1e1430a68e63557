"""What stage two asks of the cache's own teacher: the text anchors of `loss.token_anchors`. The
teacher is refused if params name another than the one the cache was built with."""

from __future__ import annotations

import dataclasses
import logging

import torch

from pipeline.clip.model import Teacher
from pipeline.clip.text import name_key
from pipeline.config import Params
from pipeline.core.errors import ConfigError
from pipeline.demo.data import CLASSES as DEMO_WORDS
from pipeline.demo.teacher import MODEL as DEMO_TEACHER
from pipeline.student.anchors import anchor_names
from pipeline.student.anchors import text_anchors as embed_anchors

log = logging.getLogger(__name__)


def cache_teacher(params: Params, attrs: dict, device: torch.device, option: str):
    """The cache's own teacher, loaded in stage two for `option` (refused if params name another)."""
    teacher = Teacher.load(dataclasses.replace(params.teacher, device=str(device)))
    built = attrs["teacher"]
    if teacher.identity.weights_sha256 != built["weights_sha256"]:
        source = "a local checkpoint" if built.get("pretrained") == "local" else f"pretrained {built.get('pretrained') or '(random init)'}"
        raise ConfigError(f"{params.origin('teacher.model', 'teacher.pretrained')}: {option} embeds its words with the cache's own teacher, "
                          f"{built['model']} ({source}, weights sha256 {built['weights_sha256'][:12]}), but teacher.model / teacher.pretrained "
                          f"load {teacher.identity.model} (weights {teacher.identity.weights_sha256[:12]}): set them to the cache's teacher "
                          f"(`zeroseg cache info` names it), or set {option}=0")
    return teacher


def text_anchors(params: Params, attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor terms' [K, D] text embeddings of `loss.anchor_vocabulary` by the cache's teacher,
    and [K] bool: which of the words are `eval.bg_words` (they keep a zero `loss.anchor_prior`)."""
    names = anchor_names(params.loss.anchor_vocabulary)  # a bad vocabulary fails before the teacher loads
    if {name_key(n) for n in names} == {name_key(w) for w in DEMO_WORDS} and attrs["teacher"]["model"] != DEMO_TEACHER:
        log.warning("loss.anchor_vocabulary is the demo's shape words (%s), but the cache was built with %s: the token terms will "
                    "sort your images into shapes; set it to your own classes (\"a, b, c\" or @FILE), or imagenet",
                    ", ".join(names), attrs["teacher"]["model"])
    teacher = cache_teacher(params, attrs, torch.device("cpu"), "loss.token_anchors")
    background = {name_key(w) for w in params.eval.bg_words}
    return embed_anchors(teacher, names), torch.tensor([name_key(n) in background for n in names])
