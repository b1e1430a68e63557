"""Stage one: embed the multi-scale views of every image with the teacher, into the cache.

A run hashes the manifest, learns the teacher's identity, opens (or creates) the store built for
that identity, and plans the work per shard from the store's progress markers, so a rerun after
a crash or kill computes only the shards (and, for a new grid, only the arrays) that are missing.
An executor (`teacher.executor`) then computes those shards:

- `local`: in this process, decode threads + the teacher + a writer thread (pipeline/teacher/shards.py);
- `dask`: one dask.distributed task per shard, on a local cluster or a scheduler's workers
  (pipeline/teacher/dask_executor.py), each running the same per-shard code.

Either way each shard is written whole and then marked done, and the result is the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from typing import Protocol

import fsspec
import numpy as np
import zarr
from tqdm.auto import tqdm

import cache_schema as cs
from pipeline.cache.identity import default_store_url, identity_sections, params_grids
from pipeline.cache.manifest import Manifest, build_manifest
from pipeline.cache.policy import open_or_create
from pipeline.cache.store import CacheStore, ShardWork
from pipeline.clip.model import Teacher, TeacherIdentity
from pipeline.config import Params
from pipeline.core import tars
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.views import ViewSpec, canonical_grids
from pipeline.teacher.shards import RunStats, compute_shards

__all__ = ["RunStats", "default_store_url", "run_teacher_cache"]


log = logging.getLogger(__name__)


class Executor(Protocol):
    """Computes the shards of a run; used as a context manager around the run."""

    def teacher(self) -> tuple[TeacherIdentity, ViewSpec]:
        """The teacher's identity and view spec (loading it if needed)."""

    def run(self, store: CacheStore, manifest: Manifest, todo: dict[int, ShardWork], params: Params, stats: RunStats, progress: bool) -> None:
        """Compute and write every shard of `todo` (shard -> what it lacks), adding to `stats`."""


def run_teacher_cache(params: Params, out: str | None = None, *, replace: bool = False, repair: bool = False, progress: bool = True) -> RunStats:
    """Build or resume the teacher cache described by `params`.

    Args:
        params: the `data`, `teacher` and `cache` sections are read.
        out: the store's path or fsspec URL; None for `default_store_url` under `cache.root`.
        replace: rebuild a store at `out` that was built for other params (otherwise refused).
        repair: first read every written shard (`cache_schema.find_damage`) and recompute the
            damaged ones, in the batches a whole build makes, so the repaired store is
            byte-identical to an undamaged build of its grids in one run; undamaged shards are
            neither recomputed nor written. A store that cannot be written is reported, never changed.
        progress: show progress bars.
    """
    start = time.perf_counter()
    grids = params_grids(params)
    with _executor(params, out) as executor:  # a dask cluster starts loading teachers meanwhile
        manifest = build_manifest(params.data.images, params.data.manifest_hash, progress=progress)
        if tars.is_member(manifest.paths[0]) and not params.cache.student_image_size:
            raise ConfigError(f"{params.source}: data.images {params.data.images} names tar shards, so stage two reads the student's images "
                              f"from the store: set cache.student_image_size (the student's input side, e.g. 224)")
        teacher_identity, spec = executor.teacher()
        _check_draft(params, canonical_grids(params.cache.grids), spec)  # a dense grid's square is resized whole
        identity = identity_sections(teacher_identity, spec, manifest, params.data.min_side, params.teacher.jpeg_draft_side)
        url = out or default_store_url(params.cache.root, identity)
        store = open_or_create(url, identity, manifest.paths, grids, params.cache, replace=replace)
        damage = _unmark_damage(store, manifest, params.cache.student_image_size, progress) if repair else []
        if damage:
            grids = canonical_grids([*grids, *cs.store_grids(store.group)])
        todo = store.missing(grids, params.cache.student_image_size)
        for shard in {d.shard for d in damage if d.array != cs.PATHS} & set(todo):  # a build computes every grid of an image in one forward: so does a repair
            todo[shard] = dataclasses.replace(todo[shard], batch_grids=grids)
        # Shards in an order of this run's own: two writers of one store (a job relaunched while
        # the first still runs, two machines launched together) then rarely reach the same shard
        # at once, and each skips the shards the other has finished (`compute_shards`).
        order = random.Random(os.urandom(8)).sample(sorted(todo), len(todo))
        todo = {shard: todo[shard] for shard in order}
        stats = RunStats(store=url, images=len(manifest), shards_skipped=store.n_shards - len(todo), repaired=[str(d) for d in damage])
        if todo and stats.shards_skipped and progress:  # said before the work, not only in the summary
            rows_done = sum(len(store.shard_rows_range(s)) for s in range(store.n_shards) if s not in todo)
            tqdm.write(f"{url}: resuming: {stats.shards_skipped} of {store.n_shards} shards already done ({rows_done} of {len(manifest)} images), "
                       f"{len(todo)} to compute", file=sys.stderr)
        if todo:
            executor.run(store, manifest, todo, params, stats, progress)
    stats.complete = store.finalize()
    status = store.group[cs.STATUS][:]
    stats.failed = int(np.sum(status == cs.STATUS_FAILED))
    stats.wall_s = time.perf_counter() - start
    return stats


def _unmark_damage(store: CacheStore, manifest: Manifest, params_size: int, progress: bool) -> list[cs.Damage]:
    """Find every damaged shard of the store and unmark it for recomputation (`CacheStore.forget`).

    Returns:
        the damage found.
    Raises:
        InputError: the store cannot be written; the message lists every damaged shard.
    """
    sizes = cs.store_image_sizes(store.group)
    total = store.n * (len(cs.store_grids(store.group)) + len(sizes))
    with tqdm(total=total, desc="check shards", unit="row", disable=not progress) as bar:
        damage = cs.find_damage(store.group, on_rows=bar.update)
    if not damage:
        return []
    lines = [str(d) for d in damage]
    unmarked = {int(d.array.split("/")[1]) for d in damage if d.array.startswith("images/")}
    if any(d.array in (cs.STATUS, cs.FAILURES) or d.shard_wide for d in damage):
        unmarked |= set(sizes)
    other = sorted(unmarked - {params_size})
    if other:  # nothing would recompute them: refused before anything is written
        raise ConfigError(f"{store.url}: the damage ({'; '.join(lines)}) includes student images at {other[0]} px, but cache.student_image_size "
                          f"is {params_size}: rerun with --set cache.student_image_size={other[0]} to repair them")
    try:
        writable = CacheStore(zarr.open_group(store.url, mode="r+"), store.url)
        writable.forget(damage, manifest.paths)
    except PermissionError as exc:
        raise InputError(f"{store.url}: {len(damage)} damaged shards ({'; '.join(lines)}); cannot write there "
                         f"({exc.strerror or exc}): a read-only store is reported, never repaired") from None
    store.group = writable.group
    log.warning("%s: recomputing %d damaged shards: %s", store.url, len(damage), "; ".join(lines))
    return damage


class LocalExecutor:
    """Stage one in this process: decode threads, the teacher, a writer thread."""

    def __init__(self, params: Params):
        self.cfg = params.teacher
        self._teacher: Teacher | None = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self._teacher = None

    def teacher(self) -> tuple[TeacherIdentity, ViewSpec]:
        if self._teacher is None:
            self._teacher = Teacher.load(self.cfg)
        return self._teacher.identity, self._teacher.spec

    def run(self, store: CacheStore, manifest: Manifest, todo: dict[int, ShardWork], params: Params, stats: RunStats, progress: bool) -> None:
        self.teacher()
        teacher = self._teacher
        views_before = teacher.forward_views
        total = sum(len(store.shard_rows_range(s)) for s in todo)
        with tqdm(total=total, desc="teacher cache", unit="img", disable=not progress, smoothing=0.05) as bar:

            def advance(n: int) -> None:
                bar.update(n)
                bar.set_postfix(views_per_s=f"{(teacher.forward_views - views_before) / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)

            compute_shards(store, manifest.root, manifest.paths, teacher, todo, params, stats, advance)
        stats.views_computed += teacher.forward_views - views_before


def _executor(params: Params, out: str | None) -> Executor:
    if params.teacher.executor == "local":
        return LocalExecutor(params)
    target = out or params.cache.root
    if fsspec.utils.get_protocol(target) == "memory":
        raise InputError(f"{params.source}: teacher.executor=dask cannot write to {target}: a memory:// store lives in one process (use a path or a shared URL)")
    from pipeline.teacher.dask_executor import DaskExecutor

    return DaskExecutor(params)


def _check_draft(params: Params, grids: tuple[int, ...], spec: ViewSpec) -> None:
    """A draft-decoded square must still give every cell of the largest grid the teacher's input size."""
    side = params.teacher.jpeg_draft_side
    if side and side < max(grids) * spec.size:
        raise ConfigError(
            f"{params.source}: teacher.jpeg_draft_side={side} would upsample the {max(grids)}x{max(grids)} cells; "
            f"use 0 (off) or at least {max(grids) * spec.size} (largest grid x teacher input {spec.size})"
        )
