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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs.numcodecs import Delta

import cache_schema as cs
from pipeline.config import CacheConfig
from pipeline.errors import InputError
from pipeline.views import grid_boxes

log = logging.getLogger(__name__)


def checksum() -> zarr.codecs.Crc32cCodec:
    """The last codec of every array a new store gets: a crc32c of each chunk's encoded bytes.

    A store lives for months on shared disks and object stores; without it a flipped bit that
    still decodes would be read as a teacher embedding (`cache validate --deep` finds the rest).
    Zarr v3's own codec, so any v3 reader checks it too; 4 bytes per chunk.
    """
    return zarr.codecs.Crc32cCodec()


def compressors(cfg: CacheConfig) -> list:
    """Codecs of `views/GxG` (inside each shard, per chunk), the chunk checksum last."""
    if cfg.codec == "none":
        return [checksum()]
    if cfg.codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=cfg.codec_level), checksum()]
    # blosc with byte shuffle groups the high bytes of the float16 values, which repeat more.
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=cfg.codec_level, shuffle="shuffle", typesize=2), checksum()]


def image_codecs(cfg: CacheConfig) -> dict:
    """Lossless codecs of `images/S`: deltas of consecutive bytes (the flattened chunk, so mostly
    neighbouring pixels of a row), then zstd.

    Measured on 224 px squares (see docs/teacher-cache.md, "Stored student images"): 1.6x smaller than raw on
    noisy photo-like JPEGs and 2.0x on the demo scenes, where zstd alone gives 1.04x and 1.34x.
    """
    if cfg.codec == "none":
        return {"compressors": [checksum()]}
    return {"filters": [Delta(dtype="u1")], "compressors": [zarr.codecs.ZstdCodec(level=cfg.codec_level), checksum()]}


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

        The arrays for `grids` (and for `cfg.student_image_size`, when set) are added if missing.

        A store built for a different identity is never reused; it is replaced only when
        `replace` is set (and then said so in the log), otherwise refused with the differences.
        """
        fp = cs.fingerprint(identity)
        fs, root, exists = _probe(url)
        summary = ""  # how the store at `url` differs from `identity`, when it does
        try:
            if exists:
                existing, group = read_store_attrs(url)
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
                    wanted = _layout(cfg)
                    if existing.get("layout", wanted) != wanted:  # chunking and codec are the store's, set at creation
                        log.warning("%s keeps its layout %s; cache params ask for %s, which only a new store gets (--replace rebuilds it)",
                                    url, existing["layout"], wanted)
                    # A complete store stays opened read-only (a shared location may be read-only);
                    # one with work left is reopened for writing.
                    sizes = (cfg.student_image_size,) if cfg.student_image_size else ()
                    if not (set(grids) <= set(cs.store_grids(group)) and set(sizes) <= set(cs.store_image_sizes(group)) and existing.get("complete")):
                        group = zarr.open_group(url, mode="r+")
                        cls(group, url)._ensure_row_arrays(paths)  # a writer that created it may still be adding them
                    store = cls(group, url)
                    store._ensure_arrays(grids, cfg)
                    return store
                else:
                    diffs = cs.differences({k: existing.get(k, {}) for k in cs.IDENTITY_FIELDS}, {k: identity[k] for k in cs.IDENTITY_FIELDS})
                    summary = "; ".join(diffs) or "fingerprint differs"
                    if not replace:
                        raise InputError(f"{url}: holds a cache built for other params ({summary}); pass --replace to rebuild it, or another --out")
                    log.warning("replacing %s, built for other params: %s", url, summary)
                fs.rm(root, recursive=True)
            store = cls._create(url, identity, fp, paths, cfg)
            store._ensure_arrays(grids, cfg)
            return store
        except PermissionError as exc:
            why = f"it holds a cache built for other params ({summary})" if summary else "a read-only location can only serve stores already built for these params"
            raise InputError(f"{url}: cannot write there ({exc.strerror or exc}); {why}") from None

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
            layout=_layout(cfg),
            provenance=_provenance(),
            complete=False,
        )
        try:
            group = zarr.open_group(url, mode="w-", attributes=attrs)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            group = zarr.open_group(url, mode="r+")
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
        per_row = dict(compressors=[zarr.codecs.ZstdCodec(level=0), checksum()], dimension_names=("image",))  # zarr's default, checksummed
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
                **image_codecs(cfg),
            )
            arr.attrs.update(size=size, content="RGB center square resized with PIL bicubic (antialiased), channels first", complete=False)
            _create_array(self.group, cs.images_progress_array(size), shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0, dimension_names=("shard",))
            self.group.attrs.update(image_sizes=sorted({*cs.store_image_sizes(self.group), size}), complete=False)

    def _ensure_grids(self, grids: Sequence[int], cfg: CacheConfig) -> None:
        """Add arrays for grids the store lacks."""
        have = set(cs.store_grids(self.group))
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
                compressors=compressors(cfg),
                dimension_names=("image", "view", "feature"),
            )
            arr.attrs.update(grid=g, boxes=[list(b) for b in grid_boxes(g)], box_format="top,left,bottom,right as fractions of the center square", complete=False)
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


def view_arrays(store: str | zarr.Group, grids: Sequence[int]) -> list[zarr.Array]:
    """The `views/GxG` arrays of `grids` in canonical order, opened (each lookup reads metadata,
    so a reader of many slices opens them once).

    Raises:
        InputError: the store has no views for one of `grids`.
    """
    group = cs.open_store(store)
    have = cs.store_grids(group)
    for g in sorted(set(grids)):
        if g not in have:
            raise InputError(f"{store}: no views for grid {g}x{g} (has {', '.join(map(cs.grid_name, have))})")
    return [group[cs.views_array(g)] for g in sorted(set(grids))]


def load_targets(store: str | zarr.Group | Sequence[zarr.Array], grids: Sequence[int] = (), rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Teacher targets for `grids` in canonical order (grid ascending, row-major cells).

    Args:
        store: path, URL or open group; or the arrays `view_arrays` opened (then `grids` is unused).
        grids: which grids; their views are concatenated along V.
        rows: a slice or index array of images; None for all.
    Returns:
        [N, V, D] float16, as stored (not normalized).
    """
    arrays = store if isinstance(store, (list, tuple)) else view_arrays(store, grids)
    sel = slice(None) if rows is None else rows
    parts = [arr[sel] if isinstance(sel, slice) else arr.get_orthogonal_selection((sel, slice(None), slice(None))) for arr in arrays]
    return np.concatenate(parts, axis=1)  # [N, V, D]


def _create_array(group: zarr.Group, name: str, **kwargs: Any) -> zarr.Array:
    """`group.create_array`, or the array another writer created under `name` meanwhile (the
    same metadata: both derive it from the same identity and params)."""
    try:
        return group.create_array(name, **kwargs)
    except zarr.errors.ContainsArrayError:
        return group[name]


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


def _layout(cfg: CacheConfig) -> dict:
    """The store attribute `layout`: how its arrays are chunked and compressed."""
    return {"chunk_rows": cfg.chunk_rows, "shard_rows": cfg.shard_rows, "codec": cfg.codec, "codec_level": cfg.codec_level}


def _keyed_by_paths(existing: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """A store written before the identity left paths out (of a local checkpoint, a model-config
    JSON or a local-dir model), holding this very identity otherwise (the same weights and model
    config, by sha256): its embeddings are this identity's."""
    if existing.get("schema") != cs.SCHEMA_NAME:
        return False
    from pipeline.teacher import identity_model_name  # only here (it loads open_clip): only writers call this

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


def read_store_attrs(url: str) -> tuple[dict, zarr.Group | None]:
    """(attributes, group opened read-only) of whatever is at `url`; ({}, None) if it is no zarr group."""
    try:
        group = zarr.open_group(url, mode="r")
        return dict(group.attrs), group
    except Exception:  # noqa: BLE001 - anything unreadable is "not a store of ours"
        return {}, None


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
