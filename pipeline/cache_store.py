"""Writing and reading the teacher cache store (layout and contract in cache_schema/).

Writes happen in whole shards only: a shard of `shard_rows` images is computed for every grid
it lacks, then written as one whole shard per array, then its `progress/GxG` marker is set.
A kill between two writes costs at most that one shard, and shards never overlap, so any number
of writers may fill one store as long as each owns its shards.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

import cache_schema as cs
from pipeline.config import CacheConfig
from pipeline.errors import ConfigError, InputError
from pipeline.views import grid_boxes

log = logging.getLogger(__name__)


def compressors(cfg: CacheConfig) -> list:
    if cfg.codec == "none":
        return []
    if cfg.codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=cfg.codec_level)]
    # blosc with byte shuffle groups the high bytes of the float16 values, which repeat more.
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=cfg.codec_level, shuffle="shuffle", typesize=2)]


@dataclass
class ShardResult:
    """One shard's worth of stage-one output.

    Attributes:
        shard: shard index; rows are [shard * shard_rows, min(N, (shard + 1) * shard_rows)).
        views: grid -> [rows, g*g, D] float16 (NaN on failed rows).
        status: [rows] uint8.
        failures: [rows] reasons ("" when ok).
    """

    shard: int
    views: dict[int, np.ndarray]
    status: np.ndarray
    failures: list[str]


class CacheStore:
    """A v1 teacher cache opened for writing."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        layout = group.attrs["layout"]
        self.n = int(group.attrs["manifest"]["n"])
        self.shard_rows = int(layout["shard_rows"])
        self.chunk_rows = int(layout["chunk_rows"])
        self.dim = int(group.attrs["teacher"]["embed_dim"])

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_rows)

    def shard_rows_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.n, (shard + 1) * self.shard_rows))

    @classmethod
    def open_or_create(
        cls,
        url: str,
        identity: Mapping[str, Any],
        paths: Sequence[str],
        grids: Sequence[int],
        cfg: CacheConfig,
        *,
        replace: bool = False,
    ) -> CacheStore:
        """Open the store at `url` if it holds this identity, else create it.

        A store built for a different identity is never reused; it is replaced only when
        `replace` is set (and then said so in the log), otherwise refused with the differences.
        """
        if cfg.shard_rows % cfg.chunk_rows:
            raise ConfigError(f"cache.shard_rows ({cfg.shard_rows}) must be a multiple of cache.chunk_rows ({cfg.chunk_rows})")
        fp = cs.fingerprint(identity)
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            try:
                group = zarr.open_group(url, mode="r+")
                existing = dict(group.attrs)
            except Exception:  # noqa: BLE001 - anything unreadable is "not a store of ours"
                existing = {}
            if existing.get("schema") != cs.SCHEMA_NAME:
                if fs.ls(root):
                    raise InputError(f"{url}: exists and is not a zeroseg teacher cache; refusing to write into it")
            elif existing.get("fingerprint") == fp:
                store = cls(group, url)
                store._ensure_grids(grids, cfg)
                return store
            else:
                diffs = cs.differences({k: existing.get(k, {}) for k in cs.IDENTITY_FIELDS}, {k: identity[k] for k in cs.IDENTITY_FIELDS})
                summary = "; ".join(diffs) or "fingerprint differs"
                if not replace:
                    raise InputError(f"{url}: holds a cache built for other params ({summary}); pass --replace to rebuild it, or another --out")
                log.warning("replacing %s, built for other params: %s", url, summary)
            fs.rm(root, recursive=True)
        group = zarr.open_group(url, mode="w")
        n = len(paths)
        rows = max(1, min(cfg.shard_rows, n))
        # One chunk per shard for the small per-row arrays: each writer owns whole chunks.
        group.create_array(cs.STATUS, shape=(n,), dtype="uint8", chunks=(rows,), fill_value=cs.STATUS_PENDING)
        group.create_array(cs.FAILURES, shape=(n,), dtype=str, chunks=(rows,))
        paths_arr = group.create_array(cs.PATHS, shape=(n,), dtype=str, chunks=(max(1, min(n, 65536)),))
        paths_arr[:] = np.asarray(paths, dtype=object).astype(str)
        attrs = {k: identity[k] for k in cs.IDENTITY_FIELDS}
        attrs.update(
            schema=cs.SCHEMA_NAME,
            schema_version=cs.SCHEMA_VERSION,
            fingerprint=fp,
            view_order="grid ascending, then row-major cells",
            grids=[],
            layout={"chunk_rows": cfg.chunk_rows, "shard_rows": cfg.shard_rows, "codec": cfg.codec, "codec_level": cfg.codec_level},
            provenance=_provenance(),
            complete=False,
        )
        group.attrs.update(attrs)
        store = cls(group, url)
        store._ensure_grids(grids, cfg)
        return store

    def _ensure_grids(self, grids: Sequence[int], cfg: CacheConfig) -> None:
        """Add arrays for grids the store lacks; the rest of the store is reused as it is."""
        have = set(cs.store_grids(self.group))
        new = [g for g in grids if g not in have]
        if not new:
            return
        chunk, shard = min(self.chunk_rows, max(1, self.n)), min(self.shard_rows, max(1, self.n))
        if shard % chunk:
            chunk = shard  # a store smaller than one chunk: one chunk per shard
        for g in new:
            arr = self.group.create_array(
                cs.views_array(g),
                shape=(self.n, g * g, self.dim),
                dtype="float16",
                chunks=(chunk, g * g, self.dim),
                shards=(shard, g * g, self.dim),
                fill_value=np.nan,
                compressors=compressors(cfg),
                dimension_names=("image", "view", "feature"),
            )
            arr.attrs.update(grid=g, boxes=[list(b) for b in grid_boxes(g)], box_format="top,left,bottom,right as fractions of the center square", complete=False)
            self.group.create_array(cs.progress_array(g), shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0)
        self.group.attrs.update(grids=sorted(have | set(new)), complete=False)

    def missing_grids(self, grids: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """shard -> the grids (of `grids`) whose views that shard still lacks."""
        done = {g: self.group[cs.progress_array(g)][:] for g in grids}  # [n_shards] each
        todo = {}
        for shard in range(self.n_shards):
            lacking = tuple(g for g in grids if not done[g][shard])
            if lacking:
                todo[shard] = lacking
        return todo

    def write_shard(self, result: ShardResult) -> None:
        """Write one whole shard of every array, then its progress markers (the commit point)."""
        rows = self.shard_rows_range(result.shard)
        sl = slice(rows.start, rows.stop)
        for g, values in result.views.items():
            self.group[cs.views_array(g)][sl] = values
        self.group[cs.STATUS][sl] = result.status
        self.group[cs.FAILURES][sl] = np.asarray(result.failures, dtype=object).astype(str)
        for g in result.views:
            self.group[cs.progress_array(g)][result.shard] = 1

    def finalize(self) -> bool:
        """Mark each fully written grid complete, then the store (written last). True when complete."""
        all_done = True
        for g in cs.store_grids(self.group):
            done = bool(np.all(self.group[cs.progress_array(g)][:] == 1))
            self.group[cs.views_array(g)].attrs["complete"] = done
            all_done &= done
        self.group.attrs["complete"] = all_done
        return all_done


def load_targets(store: str | zarr.Group, grids: Sequence[int], rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Teacher targets for `grids` in canonical order (grid ascending, row-major cells).

    Args:
        store: path, URL or open group.
        grids: which grids; their views are concatenated along V.
        rows: a slice or index array of images; None for all.
    Returns:
        [N, V, D] float16, as stored (not normalized).
    """
    group = cs.open_store(store)
    sel = slice(None) if rows is None else rows
    parts = []
    for g in sorted(set(grids)):
        if cs.views_array(g) not in group:
            raise InputError(f"{store}: no views for grid {g}x{g} (has {', '.join(map(cs.grid_name, cs.store_grids(group)))})")
        arr = group[cs.views_array(g)]
        parts.append(arr.get_orthogonal_selection((sel, slice(None), slice(None))) if not isinstance(sel, slice) else arr[sel])
    return np.concatenate(parts, axis=1)  # [N, V, D]


def _provenance() -> dict[str, str]:
    from pipeline import __version__

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        user = ""
    return {
        "tool": "zeroseg",
        "tool_version": __version__,
        "zarr_version": zarr.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": user,
    }
