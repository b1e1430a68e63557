"""Class embeddings from the teacher's text tower, cached per (teacher, vocabulary, templates),
and vocabularies as users write them.

open_clip's tokenizer and `build_zero_shot_classifier` do the work: every prompt embedded and
normalized, averaged per class, normalized again. The result is cached on disk under a key
made of the teacher's weights hash and model config, the class names and the templates, so a
1000-class vocabulary is embedded once per teacher, not once per evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from pipeline.clip.model import Teacher
from pipeline.core.errors import InputError
from pipeline.core.files import read_text_file

SINGLE_TEMPLATE = ("a photo of a {}.",)


def name_key(name: str) -> str:
    """A class name as CLIP's tokenizer sees it: lowercased, whitespace runs as one space."""
    return " ".join(name.lower().split())


def parse_vocabulary(text: str, option: str) -> list[str]:
    """'cat, dog,grass' -> ['cat', 'dog', 'grass']; a @FILE reads one name per line (UTF-8).

    Names that differ only in case or spacing are refused as repeats: CLIP's tokenizer lowercases
    and splits on whitespace, so they would get one embedding and the second could never win
    (refused for every teacher: names so close are a typo more often than two classes).

    Raises:
        InputError: no names, a repeat, or an unreadable file, in one line that starts with `option`.
    """
    if text.startswith("@"):
        try:
            names = read_text_file(Path(text[1:])).splitlines()
        except OSError as exc:
            raise InputError(f"{option}: {exc.filename}: {exc.strerror}") from None
    else:
        names = text.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError(f"{option}: give at least one class name")
    seen: dict[str, str] = {}
    for name in names:
        key = name_key(name)
        if key in seen:
            same = "repeated" if seen[key] == name else f"the same to the text encoder as {seen[key]!r}"
            raise InputError(f"{option}: {name!r} is {same}")
        seen[key] = name
    return names


def template_set(name: str) -> tuple[str, ...]:
    """`single`: "a photo of a {}."; `imagenet`: the 80 prompts of CLIP's ImageNet evaluation."""
    if name == "single":
        return SINGLE_TEMPLATE
    if name == "imagenet":
        return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)  # open_clip keeps them as lambdas
    raise InputError(f"eval.templates: unknown template set {name!r} (single, imagenet)")


def default_cache_dir() -> Path:
    base = os.environ.get("ZEROSEG_STATE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroseg"
    return Path(base) / "text"


class ClassEmbedder:
    """Embeds vocabularies with a teacher's text tower, with an on-disk cache.

    Args:
        teacher: the loaded teacher (its model must have a text tower).
        cache_dir: where embeddings are kept; None for the default (~/.cache/zeroseg/text).
    """

    def __init__(self, teacher: Teacher, cache_dir: str | Path | None = None):
        if not hasattr(teacher.model, "encode_text"):
            raise InputError(f"teacher {teacher.identity.model}: has no text tower to embed class names with")
        self.teacher = teacher
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tokenizer = open_clip.get_tokenizer(teacher.open_clip_name)
        self.prompts_encoded = 0  # prompts run through the text tower by this instance

    def key(self, classes: Sequence[str], templates: Sequence[str]) -> str:
        ident = self.teacher.identity
        doc = {"model_config": ident.model_config_sha256, "weights": ident.weights_sha256, "classes": list(classes), "templates": list(templates)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def __call__(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[K, D] float32 unit vectors, one per class, in the order given."""
        if not classes:
            raise InputError("the vocabulary is empty")
        path = self.cache_dir / f"{self.key(classes, templates)}.pt"
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                pass
        with torch.inference_mode():
            weights = build_zero_shot_classifier(
                self.teacher.model, self.tokenizer, list(classes), list(templates),
                num_classes_per_batch=max(1, 256 // len(templates)), device=self.teacher.device,
            )  # [D, K]
        self.prompts_encoded += len(classes) * len(templates)
        emb = weights.T.float().cpu().contiguous()  # [K, D]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(emb, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: embeddings are recomputed next time
        return emb

    @property
    def logit_scale(self) -> float:
        """exp of the teacher's learned temperature, clamped at 100 as CLIP does."""
        scale = getattr(self.teacher.model, "logit_scale", None)
        return float(min(100.0, scale.exp().item())) if scale is not None else 100.0
