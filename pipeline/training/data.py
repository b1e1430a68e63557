"""Stage-two data: each ok cache row paired with its image, read chunk-wise and shuffled.

Random single-row reads from a sharded zarr array cost about a millisecond each, so the
dataset reads whole chunks (`cache.chunk_rows` rows of every grid at once) and shuffles across
chunks with a buffer of rows, as webdataset does with shards. Chunks are dealt to
(rank, worker) streams once, by index, so each rank reads only its own rows and every stream
has a fixed length; only the order within a stream changes per epoch (seeded by seed, epoch,
rank, worker). That makes the sample order a pure function of those numbers, which is what
lets `--resume` skip the samples already trained on without decoding them.

Images get the center square the teacher saw, resized to the student's input size with
antialiased bicubic, and travel as uint8; normalization happens on the device. When stage one
stored those very pixels in the cache (`images/S`, `cache.student_image_size`), they are read
from it, chunk by chunk with the targets, instead of decoding the source files: same bytes,
no JPEG decoding in stage two (`train.images`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

import cache_schema as cs
from pipeline.cache.reader import load_targets, view_arrays
from pipeline.core.decode import decode_center_square, student_input
from pipeline.core.errors import InputError
from pipeline.core.views import mirrored_views


def student_image(path: str | Path, size: int, *, max_pixels: int = 178_956_970, draft_side: int = 0) -> torch.Tensor:
    """[3, size, size] uint8: the image's center square (as the teacher saw it: `draft_side` is the cache's) at `size`."""
    decoded = decode_center_square(path, max_pixels=max_pixels, draft_side=draft_side)
    if decoded.square is None:
        raise InputError(f"{path}: {decoded.reason} (the cache had it as ok: did the dataset change?)")
    return torch.from_numpy(student_input(decoded.square, size))


class ParentEnviron:
    """DataLoader `worker_init_fn`: give each worker the environment its loader was made in.

    Forkserver workers are forked from a server that starts with the first DataLoader of the
    process and keeps the environment of that moment. Credentials or endpoints set later (AWS_*,
    GOOGLE_*, a notebook's second run against a remote cache) would not reach the workers, and
    their reads of the store would fail while the main process's succeed.
    """

    def __init__(self) -> None:
        self.environ = dict(os.environ)

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.environ)


@dataclass(frozen=True)
class Stream:
    """The chunks one (rank, worker) reads, as (start, stop) row ranges, and its ok-row count."""

    chunks: tuple[tuple[int, int], ...]
    rows: int


def image_source(group: zarr.Group, store: str, size: int, choice: str) -> str:
    """"cache" or "decode": where `CachePairs` gets the student's images from (see `train.images`).

    Raises:
        InputError: `choice` is "cache" and the store has no complete `images/{size}`.
    """
    sizes = cs.store_image_sizes(group)
    stored = size in sizes and bool(group[cs.images_array(size)].attrs.get("complete", False))
    if choice == "decode" or (choice == "auto" and not stored):
        return "decode"
    if not stored:
        what = f"an incomplete images/{size}" if size in sizes else f"no images/{size} (has: {', '.join(map(str, sizes)) or 'none'})"
        raise InputError(f"{store}: train.images=cache but the store has {what}; run stage one with cache.student_image_size={size}, or use train.images=auto")
    return "cache"


class CachePairs(IterableDataset):
    """(image uint8 [3, S, S], targets float16 [V, D], row) for every ok row of a teacher cache.

    Args:
        store: cache path or URL (validated by the caller).
        data_root: folder the cache's `paths` are relative to.
        grids: target grids, in canonical order in the returned [V, D].
        img_size: the student's input side.
        rank, world: this process's share of the chunks (distributed training).
        seed: base of the per-epoch shuffles.
        shuffle_buffer: rows held for shuffling across chunks.
        images: "cache" (read the store's `images/{img_size}`), "decode" (decode the source
            files), or "auto" (the store's when it has them complete at `img_size`).
        hflip: mirror each row left-right with probability 1/2 (`train.hflip`), its targets'
            cells with it; which rows is seeded as the order is, so a resume mirrors the same ones.
    """

    def __init__(self, store: str, data_root: str | Path, grids: tuple[int, ...], img_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 2048, max_pixels: int = 178_956_970, images: str = "auto", hflip: bool = False):
        super().__init__()
        group = cs.open_store(store)
        self.image_source = image_source(group, store, img_size, images)
        # Decode as stage one did (draft scale included), so both sources give the same pixels.
        self.draft_side = int(group.attrs["preprocessing"].get("jpeg_draft_side", 0))
        self.store, self.data_root = store, str(data_root)
        self.grids, self.img_size = tuple(sorted(set(grids))), img_size
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.max_pixels = max(1, shuffle_buffer), max_pixels
        self.mirror = np.asarray(mirrored_views(self.grids)) if hflip else None  # [V] view permutation
        self.chunk_rows = int(group.attrs["layout"]["chunk_rows"])
        self.shard_rows = int(group.attrs["layout"]["shard_rows"])
        self.status = group[cs.STATUS][:]  # [N] uint8
        # [N] str, only when images are decoded: ImageNet's 1.28M paths are ~300 MB of Python
        # strings, pickled to every DataLoader worker (bench/scale_bench.py, reader_start).
        self.paths = group[cs.PATHS][:].astype(object) if self.image_source == "decode" else None
        n = len(self.status)
        all_chunks = [(a, min(n, a + self.chunk_rows)) for a in range(0, n, self.chunk_rows)]
        self.chunks = [c for c in all_chunks if np.any(self.status[c[0] : c[1]] == cs.STATUS_OK)][rank::world]
        # (epoch, skip_batches, micro_batch) in shared memory: persistent DataLoader workers keep
        # their copy of the dataset across epochs, and read the new epoch from here.
        self._epoch_state = torch.tensor([0, 0, 1], dtype=torch.int64).share_memory_()
        # The arrays read, opened lazily in each worker (zarr's event loop is not fork-safe) and
        # then kept: each lookup in the group reads metadata, one more request per chunk remotely.
        self._views: list | None = None
        self._images = None

    def __len__(self) -> int:
        return sum(s.rows for s in self.streams(1))

    def streams(self, num_workers: int) -> list[Stream]:
        """This rank's chunks dealt to `num_workers` streams by index (fixed across epochs)."""
        out = []
        for w in range(max(1, num_workers)):
            chunks = tuple(self.chunks[w :: max(1, num_workers)])
            out.append(Stream(chunks, int(sum(np.sum(self.status[a:b] == cs.STATUS_OK) for a, b in chunks))))
        return out

    def batches_per_epoch(self, micro_batch: int, num_workers: int) -> int:
        """Full micro-batches this rank's DataLoader yields per epoch (each worker drops its last partial one)."""
        return sum(s.rows // micro_batch for s in self.streams(num_workers))

    def set_epoch(self, epoch: int, *, skip_batches: int = 0, micro_batch: int = 1) -> None:
        """Choose the epoch's order, and how many of its first micro-batches to skip (resume).

        Call before creating the epoch's DataLoader iterator; workers read it when it starts.
        """
        self._epoch_state[:] = torch.tensor([epoch, skip_batches, micro_batch])

    @property
    def epoch(self) -> int:
        return int(self._epoch_state[0])

    @property
    def skip_batches(self) -> int:
        return int(self._epoch_state[1])

    @property
    def micro_batch(self) -> int:
        return int(self._epoch_state[2])

    def _skipped_rows(self, worker: int, num_workers: int) -> int:
        """Rows worker `worker` produced within the first `skip_batches` batches of the loader.

        The DataLoader takes batches from its workers round-robin, passing over exhausted ones.
        """
        counts = [s.rows // self.micro_batch for s in self.streams(num_workers)]
        order = [w for rnd in range(max(counts, default=0)) for w in range(num_workers) if counts[w] > rnd]
        return order[: self.skip_batches].count(worker) * self.micro_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stream = self.streams(num_workers)[worker]
        if self._views is None:
            group = cs.open_store(self.store)
            self._views = view_arrays(group, self.grids)
            self._images = group[cs.images_array(self.img_size)] if self.image_source == "cache" else None
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        # Its own stream, drawn for every row skipped or not: the order, and with it a run
        # without hflip, stays as it was, and a resume mirrors the rows it would have.
        coins = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        skip = self._skipped_rows(worker, num_workers)
        for row, targets, image in self._shuffled_rows(stream, rng):
            mirror = self.mirror is not None and coins.random() < 0.5
            if skip > 0:
                skip -= 1
                continue
            if image is None:
                image = student_image(Path(self.data_root) / str(self.paths[row]), self.img_size, max_pixels=self.max_pixels, draft_side=self.draft_side)
            else:
                image = torch.from_numpy(image)
            if mirror:
                image, targets = image.flip(-1), targets[self.mirror]
            yield image, torch.from_numpy(targets), row

    def _shuffled_rows(self, stream: Stream, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(row, targets [V, D], stored image [3, S, S] or None) over the stream's ok rows.

        Chunks come in random order and rows are mixed in a buffer. Rows are copied out of their
        chunk, so the buffer holds only its own rows, not every chunk one of them came from.
        """
        buffer: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        for index in rng.permutation(len(stream.chunks)):
            a, b = stream.chunks[index]
            arrays = [*self._views, *([self._images] if self._images is not None else [])]
            with _decoding(self.store, arrays, a, b, self.shard_rows):
                targets = load_targets(self._views, rows=slice(a, b))  # [b-a, V, D] one read per grid
                images = self._images[a:b] if self._images is not None else None  # [b-a, 3, S, S]
            _require_views(self.store, targets, self.status[a:b] == cs.STATUS_OK, a, self.shard_rows)
            buffer.extend(
                (a + i, targets[i].copy(), None if images is None else images[i].copy()) for i in np.flatnonzero(self.status[a:b] == cs.STATUS_OK)
            )
            while len(buffer) >= self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


@contextlib.contextmanager
def _decoding(store: str, arrays: list, a: int, b: int, shard_rows: int):
    """Rows a..b-1 of `arrays` are read inside: a chunk that does not decode (a checksum
    mismatch, a truncated shard) is one line naming the array, the rows and the shard."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - each codec raises its own error type
        cs.settle_reads()
        name = "the cache"
        for array in arrays:  # which array: read each alone (the error path only)
            try:
                array[a:b]
            except Exception:  # noqa: BLE001
                cs.settle_reads()
                name = array.path
                break
        raise InputError(f"{store}: {name} rows {a}-{b - 1} (shard {a // shard_rows}) do not decode ({cs.read_error(exc)}); "
                         f"zeroseg cache validate --deep lists the damage, zeroseg teacher-cache --repair recomputes it") from None


def _require_views(store: str, targets: np.ndarray, ok: np.ndarray, a: int, shard_rows: int) -> None:
    """Ok rows hold views: an all-NaN view there is a shard deleted after it was written (read as
    the fill value). Other non-finite values are the teacher's own; the loss guard stops on them.

    Args:
        targets: [rows, V, D] as read; ok: [rows] bool.
    """
    bad = np.flatnonzero(ok & np.isnan(targets).all(axis=-1).any(axis=-1))
    if bad.size:
        raise InputError(f"{store}: row {a + int(bad[0])} (shard {(a + int(bad[0])) // shard_rows}) is ok but its teacher views are missing "
                         f"({bad.size} such rows); zeroseg cache validate --deep lists the damage, zeroseg teacher-cache --repair recomputes it")


def teacher_sample(store: str, grids: tuple[int, ...], max_rows: int) -> torch.Tensor:
    """A sample of the cache's teacher views, [n, V, D] for the views of `grids`, as cached.

    `loss.anchor_prior` is taken from it. The sample is whole chunks spread evenly over the store (a chunk is the unit of a read: scattered
    rows would each cost one), enough of them for `max_rows` rows, so it is the same on every
    run and every rank, and costs one pass over `max_rows` rows whatever the cache's size.
    """
    group = cs.open_store(store)
    status = group[cs.STATUS][:]  # [N]
    chunk = int(group.attrs["layout"]["chunk_rows"])
    starts = list(range(0, len(status), chunk))
    take = min(len(starts), max(1, -(-max_rows // chunk)))
    picked = [starts[i] for i in np.linspace(0, len(starts) - 1, take).round().astype(int)]
    arrays = view_arrays(group, grids)
    parts = []
    for a in sorted(set(picked)):
        rows = slice(a, min(len(status), a + chunk))
        ok = status[rows] == cs.STATUS_OK
        if ok.any():
            with _decoding(store, arrays, rows.start, rows.stop, int(group.attrs["layout"]["shard_rows"])):
                parts.append(load_targets(arrays, rows=rows)[ok])  # [n_ok, V, D]
    if not parts:
        raise InputError(f"{store}: no ok rows to take a sample of the teacher's views from")
    return torch.from_numpy(np.concatenate(parts))  # [n, V, D]
