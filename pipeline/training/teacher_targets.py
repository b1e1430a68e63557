"""What stage two asks of the cache's own teacher: the segments' crop embeddings (`loss.segment_crop`)
and the text anchors (`loss.segment_anchors`, `loss.token_anchors`). The teacher is refused if
params name another than the one the cache was built with."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.clip.model import Teacher
from pipeline.clip.text import name_key
from pipeline.config import Params
from pipeline.core.errors import ConfigError
from pipeline.student.anchors import anchor_names
from pipeline.student.anchors import text_anchors as embed_anchors
from pipeline.student.segment_crops import SegmentCropTargets


def cache_teacher(params: Params, attrs: dict, device: torch.device, option: str):
    """The cache's own teacher, loaded in stage two for `option` (refused if params name another)."""
    teacher = Teacher.load(dataclasses.replace(params.teacher, device=str(device)))
    if teacher.identity.weights_sha256 != attrs["teacher"]["weights_sha256"]:
        raise ConfigError(f"{params.source}: {option} runs the teacher of params.teacher, which is not the teacher the cache was built "
                          f"with (weights sha256 {teacher.identity.weights_sha256[:12]}, the cache's {attrs['teacher']['weights_sha256'][:12]})")
    return teacher


def crop_targets(params: Params, attrs: dict, device: torch.device):
    """The teacher's embeddings of the segments' crops, for `loss.segment_crop`."""
    return SegmentCropTargets(cache_teacher(params, attrs, device, "loss.segment_crop"))


def text_anchors(params: Params, attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor terms' [K, D] text embeddings of `loss.anchor_vocabulary` by the cache's teacher,
    and [K] bool: which of the words are `eval.bg_words` (they keep a zero `loss.anchor_prior`)."""
    names = anchor_names(params.loss.anchor_vocabulary)  # a bad vocabulary fails before the teacher loads
    teacher = cache_teacher(params, attrs, torch.device("cpu"), "loss.segment_anchors / loss.token_anchors")
    background = {name_key(w) for w in params.eval.bg_words}
    return embed_anchors(teacher, names), torch.tensor([name_key(n) in background for n in names])
