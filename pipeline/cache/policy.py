"""Which store a writer gets at a URL: the one built for this identity, reused; another, refused or replaced.

A store holding the same identity is reused (re-keyed first when it was keyed by its teacher's
paths before the identity left paths out); a store of another identity is refused with the
differences, or replaced when asked (`--replace`); anything else at the URL is never written
into. Whether a location is read-only is found by trying, and said in one line."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import zarr

import cache_schema as cs
from pipeline.cache.codecs import layout_attr
from pipeline.cache.reader import read_store_attrs
from pipeline.cache.store import CREATION_WAIT_S, CacheStore, stale_dense_grids
from pipeline.config import CacheConfig
from pipeline.core.errors import InputError

log = logging.getLogger(__name__)


def open_or_create(
    url: str,
    identity: Mapping[str, Any],
    paths: Sequence[str],
    grids: Sequence[int],
    cfg: CacheConfig,
    *,
    replace: bool = False,
) -> CacheStore:
    """Open the store at `url` if it holds this identity, else create it.

    The arrays for `grids` (and for `cfg.student_image_size`, when set) are added if missing.

    A store built for a different identity is never reused; it is replaced only when
    `replace` is set (and then said so in the log), otherwise refused with the differences.
    """
    fp = cs.fingerprint(identity)
    fs, root, exists = _probe(url)
    summary = ""  # how the store at `url` differs from `identity`, when it does
    try:
        if exists:
            existing, group = _settled_attrs(url, fs, root)
            same = existing.get("fingerprint") == fp
            if not same and _keyed_by_paths(existing, identity):
                same = True
                was = ", ".join(v for v in (existing["teacher"].get("model"), existing["teacher"].get("pretrained")) if v and v not in (identity["teacher"]["model"], cs.LOCAL_WEIGHTS))
                try:
                    zarr.open_group(url, mode="r+").attrs.update(teacher=identity["teacher"], fingerprint=fp)
                    log.warning("%s: re-keyed by its teacher's weights and config instead of their paths (%s); fingerprint %s is now %s",
                                url, was, existing["fingerprint"][:12], fp[:12])
                    existing, group = read_store_attrs(url)
                except PermissionError:
                    log.warning("%s: keyed by its teacher's paths (%s), the same weights and config: used as it is (read-only, so not re-keyed)",
                                url, was)
            if existing.get("schema") != cs.SCHEMA_NAME:
                if fs.ls(root):
                    raise InputError(f"{url}: exists and is not a zeroseg teacher cache; refusing to write into it")
            elif same:
                wanted = layout_attr(cfg)
                if existing.get("layout", wanted) != wanted:  # chunking and codec are the store's, set at creation
                    log.warning("%s keeps its layout %s; cache params ask for %s, which only a new store gets (--replace rebuilds it)",
                                url, existing["layout"], wanted)
                # A complete store stays opened read-only (a shared location may be read-only);
                # one with work left is reopened for writing.
                sizes = (cfg.student_image_size,) if cfg.student_image_size else ()
                if not (set(grids) <= set(cs.store_grids(group)) and set(sizes) <= set(cs.store_image_sizes(group)) and existing.get("complete")
                        and not stale_dense_grids(group, grids, cfg)):
                    group = zarr.open_group(url, mode="r+")
                    CacheStore(group, url)._ensure_row_arrays(paths)  # a writer that created it may still be adding them
                store = CacheStore(group, url)
                store._ensure_arrays(grids, cfg)
                return store
            else:
                diffs = cs.differences({k: existing.get(k, {}) for k in cs.IDENTITY_FIELDS}, {k: identity[k] for k in cs.IDENTITY_FIELDS})
                summary = "; ".join(diffs) or "fingerprint differs"
                if not replace:
                    raise InputError(f"{url}: holds a cache built for other params ({summary}); pass --replace to rebuild it, or another --out")
                log.warning("replacing %s, built for other params: %s", url, summary)
            fs.rm(root, recursive=True)
        store = CacheStore._create(url, identity, fp, paths, cfg)
        store._ensure_arrays(grids, cfg)
        return store
    except PermissionError as exc:
        why = f"it holds a cache built for other params ({summary})" if summary else "a read-only location can only serve stores already built for these params"
        raise InputError(f"{url}: cannot write there ({exc.strerror or exc}); {why}") from None


def _settled_attrs(url: str, fs: fsspec.AbstractFileSystem, root: str, wait: float = CREATION_WAIT_S) -> tuple[dict, zarr.Group | None]:
    """`read_store_attrs(url)`, waiting out another writer that is creating the store right now.

    A writer launched at the same moment creates the folder, then writes the group's metadata
    (`zarr.json`, with the identity) in one file, which zarr's local store writes as
    `zarr.<hex>.partial` and renames: in between, the folder holds nothing readable. Something
    at `url` that is no zeroseg store is read again (every 50 ms, up to `wait` seconds) while it
    holds nothing but that file; then it is what it is.
    """
    deadline = time.monotonic() + wait
    while True:
        existing, group = read_store_attrs(url)
        if existing.get("schema") == cs.SCHEMA_NAME or time.monotonic() > deadline:
            return existing, group
        fs.invalidate_cache()
        try:
            names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)}
        except FileNotFoundError:
            names = set()
        if not all(_group_metadata(name) for name in names):  # more than a group's metadata: not a store being created
            return existing, group
        time.sleep(0.05)


def _group_metadata(name: str) -> bool:
    """Whether a file name is a zarr group's metadata or zarr's temporary file for it."""
    return name == "zarr.json" or (name.startswith("zarr.") and name.endswith(".partial"))


def _probe(url: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, path, whether something is there) of `url`, looked up afresh (no cached listing).

    Raises:
        InputError: one line for what the filesystem says: package missing, no credentials, bad URL.
    """
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.invalidate_cache()  # another process (a dask worker, another team) may have written
        return fs, root, fs.exists(root)
    except Exception as exc:  # noqa: BLE001 - a filesystem's own error, e.g. s3:// without s3fs
        raise InputError(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'cannot reach it'}") from None


def _keyed_by_paths(existing: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """A store written before the identity left paths out (of a local checkpoint, a model-config
    JSON or a local-dir model), holding this very identity otherwise (the same weights and model
    config, by sha256): its embeddings are this identity's."""
    if existing.get("schema") != cs.SCHEMA_NAME:
        return False
    from pipeline.clip.model import (
        identity_model_name,  # only here (it loads open_clip): only writers call this
    )

    old = dict(existing.get("teacher", {}))
    moved = {"model": identity_model_name(str(old.get("model", "")))}
    if identity["teacher"].get("pretrained") == cs.LOCAL_WEIGHTS and old.get("pretrained") not in ("", cs.LOCAL_WEIGHTS, None):
        import open_clip

        # keyed by a tag: tag users share it, a local copy of those weights is another key
        if old["pretrained"] not in open_clip.list_pretrained_tags_by_model(old.get("model", "")):
            moved["pretrained"] = cs.LOCAL_WEIGHTS
    if all(old.get(k) == v for k, v in moved.items()):
        return False  # no path in it: a store of another identity, not an old key of this one
    old.update(moved)
    return not cs.differences({"teacher": old, **{k: existing.get(k, {}) for k in cs.IDENTITY_FIELDS if k != "teacher"}},
                              {k: identity[k] for k in cs.IDENTITY_FIELDS})
