"""The teacher cache, schema v1: names, identity, fingerprint and validation.

This module is the contract between stage one (which writes a store) and everything that reads
one (training, evaluation, other teams). It depends on zarr and numpy only. README.md beside it
describes the layout for readers who use plain zarr or dask.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zarr

# `images/S` uses numcodecs' Delta filter (zarr-python reads it through numcodecs, a dependency of
# zarr itself); zarr warns on every open that other zarr implementations may lack it. Said once,
# in README.md beside this file, instead of at each read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification", category=UserWarning)

SCHEMA_NAME = "zeroseg.teacher_cache"
SCHEMA_VERSION = 1

STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_FAILED: "failed"}

# Arrays of the group (besides one views/GxG and one progress/GxG per grid, and optionally one
# images/S and one progress/images-S per stored student input side).
STATUS, PATHS, FAILURES = "status", "paths", "failures"

# The identity sections whose canonical JSON (with the schema version) the fingerprint hashes.
IDENTITY_FIELDS = ("teacher", "preprocessing", "manifest")
# teacher.pretrained of weights loaded from a local file or folder: the path is not part of the
# identity (weights_sha256 is), so one checkpoint at two paths gives one fingerprint. Stores
# written before recorded the path; stage one re-keys them when the weights are the same.
LOCAL_WEIGHTS = "local"


class CacheSchemaError(ValueError):
    """A store that is not a complete, consistent v1 teacher cache, or not the one expected."""


def grid_name(g: int) -> str:
    return f"{g}x{g}"


def views_array(g: int) -> str:
    """`views/GxG`: float16 [N, g*g, D], projected teacher embeddings, not normalized, NaN when not ok.

    The array's `content` attribute says what a row's g*g embeddings are: `crops` (each cell's
    crop through the teacher; stores written before the attribute existed hold crops) or
    `dense` (the teacher's dense embeddings of the whole center square, averaged over each cell).
    """
    return f"views/{grid_name(g)}"


CROPS, DENSE = "crops", "dense"


def grid_content(group: zarr.Group, g: int) -> str:
    """`crops` or `dense`: what the `views/GxG` array of a store holds (see `views_array`)."""
    return str(group[views_array(g)].attrs.get("content", CROPS))


def dense_side(group: zarr.Group, g: int) -> int:
    """The side a dense grid's square was resized to (`cache.dense_side`; 0: the teacher's own)."""
    return int(group[views_array(g)].attrs.get("dense_side", 0))


def progress_array(g: int) -> str:
    """`progress/GxG`: uint8 [n_shards], 1 once that shard of `views/GxG` is written (the resume marker)."""
    return f"progress/{grid_name(g)}"


def images_array(size: int) -> str:
    """`images/S`: uint8 [N, 3, S, S], each row's center square resized for the student (optional).

    Stage two reads these instead of decoding the source images; zeros where the row is not ok.
    """
    return f"images/{size}"


def images_progress_array(size: int) -> str:
    """`progress/images-S`: uint8 [n_shards], 1 once that shard of `images/S` is written."""
    return f"progress/images-{size}"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the identity sections and the schema version.

    The grids are deliberately not part of it: grid ablations share one store.
    """
    doc = {k: identity[k] for k in IDENTITY_FIELDS}
    doc["schema_version"] = SCHEMA_VERSION
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def open_store(store: str | zarr.Group, mode: str = "r") -> zarr.Group:
    """Open a store (path, fsspec URL or group) as a zarr group, with a one-line error if it is none.

    URLs (s3://, gs://, ...) go through fsspec; credentials come from each filesystem's usual
    environment (AWS_* variables, ~/.aws, gcloud), never from arguments here.
    """
    if isinstance(store, zarr.Group):
        return store
    try:
        return zarr.open_group(store, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise CacheSchemaError(f"{store}: not a zarr group ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - a filesystem's own error: package missing, no credentials, bad URL
        raise CacheSchemaError(f"{store}: cannot open it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def store_grids(group: zarr.Group) -> tuple[int, ...]:
    return tuple(sorted(int(g) for g in group.attrs.get("grids", [])))


def store_image_sizes(group: zarr.Group) -> tuple[int, ...]:
    """The sides S of the `images/S` arrays the store has (none unless stage one was asked for them)."""
    return tuple(sorted(int(s) for s in group.attrs.get("image_sizes", [])))


def differences(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`field: store has X, expected Y` for every leaf that differs (recursing into mappings)."""
    out = []
    for key in sorted(set(stored) | set(expected)):
        name = f"{prefix}{key}"
        a, b = stored.get(key), expected.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(differences(a, b, name + "."))
        elif _normalize(a) != _normalize(b):
            out.append(f"{name}: store has {_short(a)}, expected {_short(b)}")
    return out


def is_cache(store: str | zarr.Group) -> bool:
    """Whether `store` opens as a zarr group carrying this schema's name and version."""
    try:
        attrs = open_store(store).attrs
    except CacheSchemaError:
        return False
    return attrs.get("schema") == SCHEMA_NAME and attrs.get("schema_version") == SCHEMA_VERSION


def validate(store: str | zarr.Group, expected: Mapping[str, Any] | None = None, grids: tuple[int, ...] | None = None,
             *, deep: bool = False, on_rows: Callable[[int], None] | None = None, damaged_ok: bool = False) -> dict:
    """Check that a store is a complete, self-consistent v1 cache, and the one expected.

    Args:
        store: path, fsspec URL or open group.
        expected: identity sections (`teacher`, `preprocessing`, `manifest`) the caller needs,
            as `pipeline.cache.identity.expected_identity` builds them from params.
        grids: grids the caller will read; they must be present and complete.
        deep: also read every shard of every array and name each damaged one (`find_damage`).
        on_rows: called with the number of rows read, as the deep check goes (a progress bar).
        damaged_ok: the caller has reported the damaged shards already (`find_damage`): a
            `status` chunk that does not decode is not reported again.
    Returns:
        the store's attributes.
    Raises:
        CacheSchemaError: one line naming every field that differs.
    """
    group = open_store(store)
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA_NAME:
        raise CacheSchemaError(f"{store}: schema: store has {attrs.get('schema')!r}, expected {SCHEMA_NAME!r}")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheSchemaError(f"{store}: version: store has {attrs.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    problems = []
    if attrs.get("fingerprint") != fingerprint(attrs):
        problems.append("fingerprint: does not match the store's own identity attributes (edited by hand?)")
    if expected is not None:
        for section in IDENTITY_FIELDS:
            problems += differences({section: attrs.get(section, {})}, {section: expected[section]})
    have = store_grids(group)
    wanted = tuple(grids) if grids is not None else have
    missing = [g for g in wanted if g not in have]
    if missing:
        problems.append(f"views: store lacks grids {', '.join(grid_name(g) for g in missing)} (has {', '.join(map(grid_name, have)) or 'none'})")
    n, dim = attrs.get("manifest", {}).get("n"), attrs.get("teacher", {}).get("embed_dim")
    sizes = store_image_sizes(group)
    for name, shape in [(STATUS, (n,)), (PATHS, (n,)), (FAILURES, (n,))] + [
        (views_array(g), (n, g * g, dim)) for g in wanted if g in have
    ] + [(images_array(s), (n, 3, s, s)) for s in sizes]:
        if name not in group:
            problems.append(f"{name}: array missing")
        elif tuple(group[name].shape) != shape:
            problems.append(f"{name}: shape {tuple(group[name].shape)}, expected {shape}")
    if not problems:
        for g in wanted:
            if not group[views_array(g)].attrs.get("complete", False):
                problems.append(f"{views_array(g)}: incomplete (rerun stage one to resume it)")
        if grids is None and not attrs.get("complete", False):
            problems.append("complete: store is not marked complete (rerun stage one to resume it)")
        try:
            status = group[STATUS][:]
        except Exception as exc:  # noqa: BLE001 - each codec raises its own error type
            settle_reads()
            status = None
            if not damaged_ok:
                problems.append(f"status: does not decode ({type(exc).__name__}); cache validate --deep names the damaged shards")
        if not problems and status is not None and np.any(status == STATUS_PENDING):
            problems.append(f"status: {int(np.sum(status == STATUS_PENDING))} rows still pending")
    if deep and not problems:
        problems += [str(d) for d in find_damage(group, wanted, sizes, on_rows)]
    if problems:
        raise CacheSchemaError(f"{store}: " + "; ".join(problems))
    return attrs


def _normalize(value: Any) -> Any:
    return json.loads(canonical_json(value))  # tuples vs lists, ints vs floats as JSON sees them


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The integrity scan (every shard read, damage listed) lives in its own module; named here too,
# as every reader of the contract has always called it (`cs.find_damage`).
from cache_schema.integrity import CHECKSUM_MISMATCH, Damage, chunk_checksums, find_damage, read_error, settle_reads  # noqa: E402

__all__ = ["CHECKSUM_MISMATCH", "Damage", "chunk_checksums", "find_damage", "read_error", "settle_reads"]
