"""What a store is for: its identity (teacher, views, images) and finding the store built for given params.

The fingerprint of the identity is the store's name in `cache.root`, so `teacher-cache` and
`train` with the same params meet at the same store whoever wrote it."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import fsspec

import cache_schema as cs
from pipeline.cache.manifest import Manifest, build_manifest
from pipeline.cache.reader import read_store_attrs
from pipeline.clip.model import Teacher, TeacherIdentity
from pipeline.config import Params
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.views import ViewSpec, canonical_grids

log = logging.getLogger(__name__)


PREPROCESSING_VERSION = 1  # bump when view geometry or resizing changes meaning


def expected_identity(teacher: Teacher, manifest: Manifest, min_side: int, draft_side: int = 0) -> dict:
    """The identity sections (see cache_schema) a store built with this teacher and manifest has."""
    return identity_sections(teacher.identity, teacher.spec, manifest, min_side, draft_side)


def identity_sections(identity: TeacherIdentity, spec: ViewSpec, manifest: Manifest, min_side: int, draft_side: int = 0) -> dict:
    """`expected_identity` from a teacher's identity and view spec (what a dask worker reports).

    `draft_side` (teacher.jpeg_draft_side) changes the pixels of large JPEGs, so it is part of
    the identity when it is on; stores built without it keep their fingerprint.
    """
    draft = {"jpeg_draft_side": draft_side} if draft_side else {}
    return {
        "teacher": identity.fingerprint_fields(),
        "preprocessing": {
            "version": PREPROCESSING_VERSION,
            "decode": "PIL, EXIF orientation applied, convert RGB (16-bit gray scaled to 8 bits)",
            "crop": "center square of side min(H, W) at source resolution",
            "cells": "integer edges floor(i*S/g), row-major",
            "resize": "torch interpolate with antialias, rounded and clamped to 8-bit levels",
            "size": spec.size,
            "interpolation": spec.interpolation,
            "resize_mode": spec.resize_mode,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "min_side": min_side,
            **draft,
        },
        "manifest": {"hash": manifest.hash, "hash_mode": manifest.hash_mode, "n": len(manifest)},
    }


def default_store_url(root: str, identity: dict) -> str:
    """`{root}/{model}-{fingerprint[:12]}.zarr`: a store per identity, so none overwrites another.

    `root` is a directory or an fsspec URL (`s3://bucket/caches`, `memory://`).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(identity["teacher"]["model"]).stem).strip("-") or "teacher"
    return _under(root, f"{slug}-{cs.fingerprint(identity)[:12]}.zarr")


def _under(root: str, name: str) -> str:
    """`name` inside `root`, a directory or an fsspec URL (`s3://bucket/caches`, `memory://`)."""
    return (root if root.endswith("://") else root.rstrip("/") + "/") + name


def identity_from_params(params: Params, progress: bool = True) -> dict:
    """The identity a store built from `params` must have (loads the teacher, hashes the manifest).

    The teacher is loaded on the CPU: its identity does not depend on the device.
    """
    params_grids(params)
    manifest = build_manifest(params.data.images, params.data.manifest_hash, progress=progress)
    teacher = Teacher.load(dataclasses.replace(params.teacher, device="cpu"))
    return expected_identity(teacher, manifest, params.data.min_side, params.teacher.jpeg_draft_side)


DVC_STORE_NAME = "teacher.zarr"  # where dvc.yaml's teacher_cache stage writes, under cache.root


def find_store(params: Params, progress: bool = True) -> str:
    """The store `zeroseg teacher-cache` built for `params` (no `--out`), found by fingerprint.

    Looks at `default_store_url` first, then `cache.root/teacher.zarr` (the DVC stage's store),
    then every other `*.zarr` under `cache.root`, and returns the first whose fingerprint is the
    one `params` give: the same teacher, preprocessing and images. So `teacher-cache` and
    `train` with the same params meet at the same store whoever wrote it.

    Raises:
        InputError: no store there was built for these params; the message says what to run.
    """
    identity = identity_from_params(params, progress)
    want = cs.fingerprint(identity)
    root = params.cache.root
    default = default_store_url(root, identity)
    candidates = [default, _under(root, DVC_STORE_NAME)]
    try:
        fs, path = fsspec.core.url_to_fs(root)
        fs.invalidate_cache()
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        for found in sorted(fs.glob(path.rstrip("/") + "/*.zarr")):
            candidates.append(found if protocol in ("file", "local") else f"{protocol}://{found}")
    except Exception:  # noqa: BLE001 - an unlistable root: the two named candidates are still tried
        pass
    looked, seen_keys = [], set()
    for url in candidates:
        key = url if "://" in url else str(Path(url).resolve())
        if key in seen_keys:
            continue
        seen_keys.add(key)
        attrs, group = read_store_attrs(url)
        if group is None:
            continue
        looked.append(url)
        if attrs.get("fingerprint") == want:
            return url
    others = f"; {len(looked)} store(s) there were built for other teachers or images" if looked else ""
    raise InputError(
        f"no teacher cache under {root} for these params (fingerprint {want[:12]}, "
        f"{identity['manifest']['n']} images of {params.data.images}){others}: "
        f"run `zeroseg teacher-cache` with the same --params/--set (it writes {default}), or pass --cache STORE"
    )


def check_manifest(store: str, attrs: dict, images: str, progress: bool = False) -> None:
    """Refuse a store whose images are not `images` (`data.images`), hashed as the store was.

    A source that does not exist here is not checked: a store shared by another team carries
    its own student images, and training from them needs no source files.

    Raises:
        InputError: one line naming the store, the source and how they differ.
    """
    stored = attrs.get("manifest", {})
    if not Path(images).exists():
        log.warning("%s: data.images %s is not here; the store's own %s images are trusted unchecked", store, images, stored.get("n"))
        return
    manifest = build_manifest(images, stored.get("hash_mode", "content"), progress=progress)
    if manifest.hash == stored.get("hash"):
        return
    raise InputError(
        f"refusing to train on {store}: it was built from other images than data.images {images} "
        f"(store: {stored.get('n')} images, manifest {str(stored.get('hash'))[:12]}; "
        f"{images}: {len(manifest)} images, manifest {manifest.hash[:12]}): pass the store built from them, "
        "or set data.images to the images the store was built from"
    )


def params_grids(params: Params) -> tuple[int, ...]:
    """Every grid stage one writes: the crop grids (`cache.grids`) and the dense ones (`cache.dense_grids`)."""
    both = sorted(set(params.cache.grids) & set(params.cache.dense_grids))
    if both:
        raise ConfigError(f"{params.source}: cache.dense_grids and cache.grids both have {both[0]}x{both[0]}: a grid's views are crops or dense embeddings, not both")
    grids = canonical_grids([*params.cache.grids, *params.cache.dense_grids])
    size = params.cache.student_image_size
    if 0 < size < 8:  # negative sides are refused when params load
        raise ConfigError(f"{params.source}: cache.student_image_size={size}: use 0 (off) or the student's input side (e.g. 224)")
    if max(grids) > params.data.min_side:
        raise ConfigError(f"{params.source}: cache.grids has {max(grids)}x{max(grids)} but data.min_side is {params.data.min_side}; raise data.min_side")
    return grids
