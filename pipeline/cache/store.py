"""Writing and reading the teacher cache store (layout and contract in cache_schema/).

Writes happen in whole shards only: a shard of `shard_rows` images is computed for every grid
it lacks (and for the stored student images, when asked for), then written as one whole shard
per array, then its `progress/GxG` (and `progress/images-S`) markers are set.
A kill between two writes costs at most that one shard, and shards never overlap, so any number
of writers may fill one store as long as each owns its shards (the dask executor's workers do).

A store lives at a local path or any fsspec URL (s3://, gs://, memory://, ...): zarr opens it
through fsspec, and credentials come from each filesystem's usual environment (AWS_* variables,
~/.aws, gcloud, fsspec's config files), never from params.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

import cache_schema as cs
from pipeline.cache import codecs
from pipeline.config import CacheConfig
from pipeline.core.errors import InputError
from pipeline.core.views import grid_boxes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardWork:
    """What one shard still lacks: the views of `grids`, and the student images at `image_size` (0: not).

    `settled`: other arrays already hold this shard, so which of its rows are ok was decided
    when they were written; what is added now must follow that (`CacheStore.settled_rows`),
    not a fresh decode.
    """

    grids: tuple[int, ...] = ()
    image_size: int = 0
    settled: bool = False
    # Grids computed beside `grids` but not written: a repair recomputes a shard in the batches a
    # whole build makes (every grid of each image in one forward), so its bytes are the build's.
    batch_grids: tuple[int, ...] = ()

    @property
    def computed(self) -> tuple[int, ...]:
        """The grids the teacher runs on, in canonical order (`grids` and `batch_grids`)."""
        return tuple(sorted({*self.grids, *self.batch_grids})) if self.grids else ()

    def __bool__(self) -> bool:
        return bool(self.grids or self.image_size)


@dataclass
class ShardResult:
    """One shard's worth of stage-one output.

    Attributes:
        shard: shard index; rows are [shard * shard_rows, min(N, (shard + 1) * shard_rows)).
        views: grid -> [rows, g*g, D] float16 (NaN on failed rows).
        status: [rows] uint8.
        failures: [rows] reasons ("" when ok).
        images: [rows, 3, S, S] uint8 student images (zeros on failed rows), or None.
        write: the grids of `views` to write (None: all); the others were computed only for
            the batches' sake (`ShardWork.batch_grids`).
    """

    shard: int
    views: dict[int, np.ndarray]
    status: np.ndarray
    failures: list[str]
    images: np.ndarray | None = None
    write: tuple[int, ...] | None = None

    @property
    def written_grids(self) -> list[int]:
        return [g for g in self.views if self.write is None or g in self.write]


def stale_dense_grids(group: zarr.Group, grids: Sequence[int], cfg: CacheConfig) -> list[int]:
    """The dense grids among `grids` that the store holds at another `cache.dense_side` than `cfg`'s."""
    return [g for g in grids if g in cfg.dense_grids and g in cs.store_grids(group) and cs.grid_content(group, g) == cs.DENSE
            and cs.dense_side(group, g) != cfg.dense_side]


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
    def _create(cls, url: str, identity: Mapping[str, Any], fp: str, paths: Sequence[str], cfg: CacheConfig) -> CacheStore:
        """A new store: the group with its identity and provenance in one write, then the per-row
        arrays (`_ensure_arrays` adds the rest).

        Another writer may create the same store at the same moment (two machines launched
        together): the group is created only if absent, and a store created meanwhile by the
        other is joined when it has this identity, refused otherwise.
        """
        attrs = {k: identity[k] for k in cs.IDENTITY_FIELDS}
        attrs.update(
            schema=cs.SCHEMA_NAME,
            schema_version=cs.SCHEMA_VERSION,
            fingerprint=fp,
            view_order="grid ascending, then row-major cells",
            grids=[],
            image_sizes=[],
            layout=codecs.layout_attr(cfg),
            provenance=_provenance(),
            complete=False,
        )
        try:
            group = zarr.open_group(url, mode="w-", attributes=attrs)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            group = _join_group(url)
            if group.attrs.get("fingerprint") != fp:
                raise InputError(f"{url}: another run created a store for other params there meanwhile (fingerprint "
                                 f"{str(group.attrs.get('fingerprint', '?'))[:12]}, expected {fp[:12]})") from None
        store = cls(group, url)
        store._ensure_row_arrays(paths)
        return store

    def _ensure_row_arrays(self, paths: Sequence[str]) -> None:
        """Create `status`, `failures` and `paths` if the store lacks them (one chunk per shard:
        each writer owns whole chunks). Two writers creating them at once write the same."""
        n = self.n
        rows = max(1, min(self.shard_rows, n))
        per_row = dict(compressors=[zarr.codecs.ZstdCodec(level=0), codecs.checksum()], dimension_names=("image",))  # zarr's default, checksummed
        if cs.STATUS not in self.group:
            status = _create_array(self.group, cs.STATUS, shape=(n,), dtype="uint8", chunks=(rows,), fill_value=cs.STATUS_PENDING, **per_row)
            status.attrs["codes"] = {str(code): name for code, name in cs.STATUS_NAMES.items()}  # the reason of a failed row: failures
        if cs.FAILURES not in self.group:
            _create_array(self.group, cs.FAILURES, shape=(n,), dtype=str, chunks=(rows,), **per_row)
        if cs.PATHS not in self.group:
            block = max(1, min(n, 65536))
            paths_arr = _create_array(self.group, cs.PATHS, shape=(n,), dtype=str, chunks=(block,), **per_row)
            for start in range(0, n, block):  # a chunk at a time: all of ImageNet's as one array is ~260 MB
                paths_arr[start : start + block] = np.asarray(paths[start : start + block], dtype=object).astype(str)

    @classmethod
    def open(cls, url: str, fingerprint: str) -> CacheStore:
        """Open an existing store for writing shards (a dask task does, in its own process).

        Raises:
            InputError: the store is gone or now holds another identity (replaced mid-run).
        """
        try:
            group = zarr.open_group(url, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise InputError(f"{url}: store not found ({type(exc).__name__}); was it removed during the run?") from None
        if group.attrs.get("fingerprint") != fingerprint:
            raise InputError(f"{url}: the store was replaced during the run (fingerprint {group.attrs.get('fingerprint', '?')[:12]}, expected {fingerprint[:12]})")
        return cls(group, url)

    def _row_blocks(self) -> tuple[int, int]:
        """(rows per chunk, rows per shard) of the per-image arrays."""
        chunk, shard = min(self.chunk_rows, max(1, self.n)), min(self.shard_rows, max(1, self.n))
        if shard % chunk:
            chunk = shard  # a store smaller than one chunk: one chunk per shard
        return chunk, shard

    def _ensure_arrays(self, grids: Sequence[int], cfg: CacheConfig) -> None:
        """Add the arrays the store lacks (views of new grids, student images); the rest is reused as it is."""
        self._ensure_grids(grids, cfg)
        size = cfg.student_image_size
        if size and size not in cs.store_image_sizes(self.group):
            chunk, shard = self._row_blocks()
            arr = _create_array(
                self.group,
                cs.images_array(size),
                shape=(self.n, 3, size, size),
                dtype="uint8",
                chunks=(chunk, 3, size, size),
                shards=(shard, 3, size, size),
                fill_value=0,
                dimension_names=("image", "channel", "y", "x"),
                **codecs.image_codecs(cfg),
            )
            arr.attrs.update(size=size, content="RGB center square resized with PIL bicubic (antialiased), channels first", complete=False)
            _create_array(self.group, cs.images_progress_array(size), shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0, dimension_names=("shard",))
            self.group.attrs.update(image_sizes=sorted({*cs.store_image_sizes(self.group), size}), complete=False)

    def _ensure_grids(self, grids: Sequence[int], cfg: CacheConfig) -> None:
        """Add arrays for grids the store lacks; a grid it has must hold the kind of views asked for.

        Raises:
            InputError: a grid the store holds as crops is asked for as dense (`cache.dense_grids`), or the reverse.
        """
        have = set(cs.store_grids(self.group))
        for g in sorted(have & set(grids)):
            stored, wanted = cs.grid_content(self.group, g), cs.DENSE if g in cfg.dense_grids else cs.CROPS
            if stored != wanted:
                raise InputError(f"{self.url}: its {cs.grid_name(g)} views are {stored}, but the params ask for {wanted} there "
                                 f"(cache.dense_grids {list(cfg.dense_grids)}); use another grid, or --replace to rebuild the store")
            if g in stale_dense_grids(self.group, [g], cfg):  # another scale of the same map: that grid again
                log.info("%s: %s was computed at dense side %d, the params ask for %d: recomputing that grid", self.url, cs.grid_name(g),
                         cs.dense_side(self.group, g), cfg.dense_side)
                for name in (cs.views_array(g), cs.progress_array(g)):
                    del self.group[name]
                have.discard(g)
        new = [g for g in grids if g not in have]
        if not new:
            return
        chunk, shard = self._row_blocks()
        for g in new:
            arr = _create_array(
                self.group,
                cs.views_array(g),
                shape=(self.n, g * g, self.dim),
                dtype="float16",
                chunks=(chunk, g * g, self.dim),
                shards=(shard, g * g, self.dim),
                fill_value=np.nan,
                compressors=codecs.compressors(cfg),
                dimension_names=("image", "view", "feature"),
            )
            arr.attrs.update(grid=g, boxes=[list(b) for b in grid_boxes(g)], box_format="top,left,bottom,right as fractions of the center square", complete=False,
                             content=cs.DENSE if g in cfg.dense_grids else cs.CROPS, **({"dense_side": cfg.dense_side} if g in cfg.dense_grids else {}))
            _create_array(self.group, cs.progress_array(g), shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0, dimension_names=("shard",))
        self.group.attrs.update(grids=sorted(have | set(new)), complete=False)

    def _markers(self, shards: slice | int = slice(None)) -> dict[str, np.ndarray]:
        """Progress marker name -> its values at `shards`, for every array the store has."""
        names = [cs.progress_array(g) for g in cs.store_grids(self.group)] + [cs.images_progress_array(s) for s in cs.store_image_sizes(self.group)]
        return {name: self.group[name][shards] for name in names}

    def missing(self, grids: Sequence[int], image_size: int = 0) -> dict[int, ShardWork]:
        """shard -> what it still lacks: views of (some of) `grids`, the student images at `image_size`."""
        done = self._markers()  # [n_shards] per array, one read each
        settled = np.any(list(done.values()), axis=0) if done else np.zeros(self.n_shards, bool)  # [n_shards]
        images = cs.images_progress_array(image_size)
        todo = {}
        for shard in range(self.n_shards):
            work = ShardWork(
                tuple(g for g in grids if not done[cs.progress_array(g)][shard]),
                image_size if image_size and not done[images][shard] else 0,
                bool(settled[shard]),
            )
            if work:
                todo[shard] = work
        return todo

    def lacking(self, shard: int, work: ShardWork) -> ShardWork:
        """The part of `work` shard `shard` still lacks (one marker read per array)."""
        done = self._markers(shard)
        size = work.image_size
        return ShardWork(
            tuple(g for g in work.grids if not done[cs.progress_array(g)]),
            size if size and not done[cs.images_progress_array(size)] else 0,
            any(bool(v) for v in done.values()),
            work.batch_grids,
        )

    def settled_rows(self, shard: int) -> tuple[np.ndarray, list[str]]:
        """(status [rows] uint8, failure reasons) as stored for a settled shard (see `ShardWork`)."""
        rows = self.shard_rows_range(shard)
        sl = slice(rows.start, rows.stop)
        return self.group[cs.STATUS][sl], [str(r) for r in self.group[cs.FAILURES][sl]]

    def write_shard(self, result: ShardResult) -> None:
        """Write one whole shard of every array, then its progress markers (the commit point)."""
        rows = self.shard_rows_range(result.shard)
        sl = slice(rows.start, rows.stop)
        for g in result.written_grids:
            self.group[cs.views_array(g)][sl] = result.views[g]
        if result.images is not None:
            self.group[cs.images_array(result.images.shape[-1])][sl] = result.images
        self.group[cs.STATUS][sl] = result.status
        self.group[cs.FAILURES][sl] = np.asarray(result.failures, dtype=object).astype(str)
        for g in result.written_grids:
            self.group[cs.progress_array(g)][result.shard] = 1
        if result.images is not None:
            self.group[cs.images_progress_array(result.images.shape[-1])][result.shard] = 1

    def forget(self, damage: Sequence[cs.Damage], paths: Sequence[str]) -> None:
        """Unmark the damaged shards, so that a run recomputes them and nothing else.

        A damaged views or images shard clears its own array's marker; a damaged `status` or
        `failures` chunk, or damage that may lie in `status` (`Damage.shard_wide`), clears every
        marker of its shard (which rows are ok is decided afresh); a damaged `paths` chunk is
        rewritten from the manifest. The arrays and the store are
        marked incomplete first, so a repair stopped halfway is resumed by a plain run.

        Raises:
            PermissionError: the store cannot be written (nothing was changed then).
        """
        if not damage:
            return
        names = {cs.views_array(g): cs.progress_array(g) for g in cs.store_grids(self.group)}
        names.update({cs.images_array(s): cs.images_progress_array(s) for s in cs.store_image_sizes(self.group)})
        self.group.attrs["complete"] = False  # the first write: a read-only store fails here, untouched
        fs, root = fsspec.core.url_to_fs(self.url)
        for d in damage:
            if d.array == cs.PATHS:
                self._drop(fs, root, cs.PATHS, d.shard)
                rows = slice(d.first, d.last + 1)
                self.group[cs.PATHS][rows] = np.asarray(paths[rows], dtype=object).astype(str)
                continue
            for name in [d.array] if d.array in names and not d.shard_wide else list(names):
                self.group[name].attrs["complete"] = False
                self.group[names[name]][d.shard] = 0
            for name in [d.array] if d.array in names else [cs.STATUS, cs.FAILURES]:
                self._drop(fs, root, name, d.shard)

    def _drop(self, fs: fsspec.AbstractFileSystem, root: str, name: str, shard: int) -> None:
        """Delete the stored object of `shard` of array `name`: zarr merges a shard write into the
        shard already there, which a damaged one cannot be read for."""
        array = self.group[name]
        key = f"{root.rstrip('/')}/{name}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"
        if fs.exists(key):
            fs.rm(key)

    def finalize(self) -> bool:
        """Mark each fully written array complete, then the store (written last). True when complete."""
        all_done = True
        arrays = [(cs.views_array(g), cs.progress_array(g)) for g in cs.store_grids(self.group)]
        arrays += [(cs.images_array(s), cs.images_progress_array(s)) for s in cs.store_image_sizes(self.group)]
        for name, progress in arrays:
            done = bool(np.all(self.group[progress][:] == 1))
            arr = self.group[name]
            if arr.attrs.get("complete") != done:  # write only what changes: a shared store may be read-only
                arr.attrs["complete"] = done
            all_done &= done
        if self.group.attrs.get("complete") != all_done:
            self.group.attrs["complete"] = all_done
        return all_done


CREATION_WAIT_S = 10.0  # how long a store another writer is creating is waited for before it is judged


def _join_group(url: str, wait: float = CREATION_WAIT_S) -> zarr.Group:
    """The group another writer is creating at `url`, opened for writing once its metadata is
    readable (it may have made the folder a moment before writing it; up to `wait` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return zarr.open_group(url, mode="r+")
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _create_array(group: zarr.Group, name: str, **kwargs: Any) -> zarr.Array:
    """`group.create_array`, or the array another writer created under `name` meanwhile (the
    same metadata: both derive it from the same identity and params)."""
    try:
        return group.create_array(name, **kwargs)
    except zarr.errors.ContainsArrayError:
        return group[name]


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