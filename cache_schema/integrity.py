"""The teacher cache's integrity: every written shard read back, each damaged one listed.

Metadata can be right while data is not (a shard file truncated, overwritten, deleted or flipped
on a shared disk or object store). `zeroseg cache validate --deep` reports what `find_damage`
lists, and `zeroseg teacher-cache --repair` recomputes exactly those shards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zarr

from cache_schema import (
    FAILURES,
    PATHS,
    STATUS,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    images_array,
    images_progress_array,
    open_store,
    progress_array,
    store_grids,
    store_image_sizes,
    views_array,
)

@dataclass(frozen=True)
class Damage:
    """One shard of one array whose bytes are not what its writer wrote.

    `shard` counts the writer's units (`layout.shard_rows` rows; the whole store when it is
    smaller), the unit a repair recomputes (for `paths`, its chunks of 65,536 rows, rewritten
    from the manifest); `first` and `last` are its rows (inclusive).
    """

    array: str
    shard: int
    first: int
    last: int
    reason: str
    # The damage may lie in `status` as well as in `array` (views that disagree with their rows'
    # status, in a store without chunk checksums): a repair recomputes the whole shard.
    shard_wide: bool = False

    def __str__(self) -> str:
        return f"{self.array} shard {self.shard} (rows {self.first}-{self.last}): {self.reason}"


CHECKSUM_MISMATCH = "checksum mismatch"


def read_error(exc: BaseException) -> str:
    """Why a chunk could not be read, in a few words: `CHECKSUM_MISMATCH`, or the codec's error."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return CHECKSUM_MISMATCH if "checksum" in text.lower() else f"{type(exc).__name__}: {text}"


def chunk_checksums(array: zarr.Array) -> bool:
    """Whether every chunk of `array` carries a crc32c of its encoded bytes (inside a shard, each
    inner chunk does; the shard index always has one)."""
    codecs = list(array.metadata.codecs)
    inner = getattr(codecs[0], "codecs", None) if codecs else None  # the sharding codec's chunk pipeline
    return any(type(c).__name__ == "Crc32cCodec" for c in (inner if inner is not None else codecs))


def settle_reads(timeout: float = 30.0) -> None:
    """Wait (up to `timeout` s) for the reads a failed zarr read left running on zarr's event loop.

    zarr decodes a shard's inner chunks concurrently (asyncio.gather): when one fails, its error
    reaches the caller while its siblings still run, and a process that exits right after (as
    `zeroseg cache validate` does, with its report) prints "Task was destroyed but it is
    pending!" for each on stderr. Waiting for them keeps stderr to the report.
    """

    try:  # zarr 3's own loop; not a public module, hence the guard
        from zarr.core.sync import sync
    except ImportError:  # another zarr layout: nothing of its loop to wait for
        return

    async def others_done() -> None:
        me = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not me and not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    sync(others_done())


def find_damage(store: str | zarr.Group, grids: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None,
                on_rows: Callable[[int], None] | None = None) -> list[Damage]:
    """Read every written shard of the per-row, views and images arrays; list every damaged one.

    Metadata can be right while data is not (a shard file truncated, overwritten, deleted or
    flipped on a shared disk or object store). Per shard whose progress marker says written:
    every array must decode (stores written with chunk checksums, `chunk_checksums`, also
    refuse a flipped bit that still decodes); ok rows hold finite views, failed rows all-NaN
    ones; no row of a written shard is pending; a failed row has a reason; and an images shard
    with ok rows is not all zeros (what a deleted shard reads as). Shards not yet written are
    not damage: a resumed run computes them.

    Args:
        grids, sizes: the views grids and image sides to read (default: all the store has).
        on_rows: called with the number of views or images rows read (a progress bar).

    Returns:
        every damaged (array, shard), per-row arrays first, then in array and shard order.
    """
    group = open_store(store)
    grids = store_grids(group) if grids is None else tuple(g for g in grids if g in store_grids(group))  # missing ones: validate says so
    sizes = store_image_sizes(group) if sizes is None else tuple(s for s in sizes if s in store_image_sizes(group))
    n = int(group.attrs["manifest"]["n"])
    step = min(int(group.attrs["layout"]["shard_rows"]), max(1, n))
    arrays = [views_array(g) for g in grids] + [images_array(s) for s in sizes]
    markers = [progress_array(g) for g in grids] + [images_progress_array(s) for s in sizes]
    written = {a: group[m][:] == 1 for a, m in zip(arrays, markers)}  # array -> [n_shards] bool
    any_written = np.any(list(written.values()), axis=0) if written else np.zeros(-(-n // step), bool)
    damage: list[Damage] = []

    def read(name: str, shard: int, rows: slice) -> np.ndarray | None:
        try:
            return group[name][rows]
        except Exception as exc:  # noqa: BLE001 - each codec raises its own error type
            settle_reads()
            why = read_error(exc)
            damage.append(Damage(name, shard, rows.start, rows.stop - 1,
                                 f"{why} (its bytes changed after writing)" if why == CHECKSUM_MISMATCH else f"does not decode ({why})"))
            return None

    status = np.full(n, STATUS_PENDING, np.uint8)  # [N]; rows of an undecodable chunk stay pending
    for shard in np.flatnonzero(any_written):
        rows = slice(int(shard) * step, min(n, (int(shard) + 1) * step))
        values = read(STATUS, int(shard), rows)
        if values is None:
            continue
        status[rows] = values
        pending = int(np.sum(values == STATUS_PENDING))
        if pending:
            damage.append(Damage(STATUS, int(shard), rows.start, rows.stop - 1, f"{pending} rows pending in a written shard (chunk missing or overwritten)"))
        reasons = read(FAILURES, int(shard), rows)
        if reasons is not None:
            blank = int(np.sum((values == STATUS_FAILED) & np.array([not str(r) for r in reasons], dtype=bool)))
            if blank:
                damage.append(Damage(FAILURES, int(shard), rows.start, rows.stop - 1, f"{blank} failed rows without a reason (chunk missing or overwritten)"))
    paths = group[PATHS]
    for chunk, start in enumerate(range(0, n, paths.chunks[0])):  # a chunk at a time (ImageNet's paths are ~300 MB as strings)
        rows = slice(start, min(n, start + paths.chunks[0]))
        try:
            blank = int(np.sum(paths[rows] == ""))
        except Exception as exc:  # noqa: BLE001 - each codec raises its own error type
            settle_reads()
            damage.append(Damage(PATHS, chunk, rows.start, rows.stop - 1, f"does not decode ({type(exc).__name__})"))
            continue
        if blank:  # a manifest has no empty path: a chunk never written (its writer stopped while creating the store)
            damage.append(Damage(PATHS, chunk, rows.start, rows.stop - 1, f"{blank} empty paths (chunk missing)"))
    for name in arrays:
        for shard in np.flatnonzero(written[name]):
            rows = slice(int(shard) * step, min(n, (int(shard) + 1) * step))
            block = read(name, int(shard), rows)
            if on_rows:
                on_rows(rows.stop - rows.start)
            if block is None:
                continue
            ok, failed = status[rows] == STATUS_OK, status[rows] == STATUS_FAILED
            flat = block.reshape(block.shape[0], -1)  # [rows, V*D] or [rows, 3*S*S]
            if name.startswith("views/"):
                bad = np.flatnonzero((ok & ~np.isfinite(flat).all(axis=1)) | (failed & ~np.isnan(flat).all(axis=1)))
                if bad.size:
                    damage.append(Damage(name, int(shard), rows.start, rows.stop - 1,
                                         f"row {rows.start + int(bad[0])} disagrees with its status ({bad.size} such rows)",
                                         shard_wide=not chunk_checksums(group[STATUS])))
            elif ok.any() and not flat[ok].any():
                damage.append(Damage(name, int(shard), rows.start, rows.stop - 1, "every ok row is all zeros (shard missing)"))
    return damage


