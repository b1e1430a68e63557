"""Computing whole shards of the teacher cache: decode, views, teacher, write. Shared by executors.

`compute_shards` is the one code path that turns a shard's images into its stored embeddings.
The local executor calls it once with every shard left to do; the dask executor calls it once
per task with one shard. Batches never cross a shard boundary (a shard's ok rows are taken in
order, `teacher.batch_size` at a time), so a shard's values do not depend on which executor,
task or process computed it: the teacher's forward is not batch-invariant in the last bits
(a view encoded alone differs from the same view encoded in a batch), but both executors form
the very same batches, so their float16 outputs are identical.

Three kinds of work overlap:
- decode threads read each image once (PIL releases the GIL while decoding) and cut its center
  square; on a CPU teacher they also make the views, so the model's thread only runs the model;
  when the cache stores the student's images (`cache.student_image_size`), they resize those too;
- the calling thread batches images, makes the views on the GPU when there is one (uint8 upload,
  crop and resize on the device), and runs the teacher;
- a writer thread writes each finished shard while the next one is computed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import cache_schema as cs
from pipeline.cache.store import CacheStore, ShardResult, ShardWork
from pipeline.clip.dense import check_dense_teacher
from pipeline.clip.model import Teacher
from pipeline.config import Params
from pipeline.core.decode import Decoded, decode_center_square, student_input
from pipeline.core.errors import InputError
from pipeline.core.views import make_views


@dataclass
class RunStats:
    """What one stage-one run did, and where its time went (seconds; thread-seconds for decode/write)."""

    store: str = ""
    images: int = 0
    rows_computed: int = 0
    views_computed: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    # Work that a dask task found already written and marked when it started: an earlier attempt
    # of the same task committed it before its worker died. Not recomputed, and not in the
    # counts above, so views_computed + views_recovered is the views the run's shards lacked.
    shards_recovered: int = 0
    views_recovered: int = 0
    # `--repair`: the damaged shards found and unmarked before the run (each as `cache_schema.Damage` text).
    repaired: list[str] = field(default_factory=list)
    failed: int = 0
    complete: bool = False
    wall_s: float = 0.0
    decode_s: float = 0.0
    decode_wait_s: float = 0.0
    views_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    write_wait_s: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: RunStats) -> None:
        """Add a part's work (a dask task's shard) to this run's totals."""
        for f in fields(self):
            if f.name in ("rows_computed", "views_computed", "shards_written", "shards_recovered", "views_recovered") or (f.name.endswith("_s") and f.name != "wall_s"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.failures.update(other.failures)


@dataclass
class _Item:
    row: int
    decoded: Decoded
    views: torch.Tensor | None  # [V_s, 3, T, T] when made on the decode thread (CPU teacher)
    image: np.ndarray | None  # [3, S, S] uint8 student image, when the shard stores them
    seconds: float


def compute_shards(
    store: CacheStore,
    root: Path,
    paths: Sequence[str] | Mapping[int, str],
    teacher: Teacher,
    todo: Mapping[int, ShardWork],
    params: Params,
    stats: RunStats,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Compute and write every shard of `todo` (shard -> what it lacks), then its progress markers.

    Args:
        store: the store, open for writing.
        root: the data root the paths are relative to.
        paths: row -> image path (the manifest's paths, or only the rows of these shards).
        teacher: the loaded teacher.
        todo: the shards to compute, in order, each with the grids (and student images) it lacks.
        params: `data` (decode limits) and `teacher` (batch size, decode workers) are read.
        stats: counts and time split are added here.
        advance: called with the number of images done, for a progress bar.
    """
    batch_size = params.teacher.batch_size
    views_on_decode_thread = teacher.device.type == "cpu"
    workers = params.teacher.decode_workers or os.cpu_count() or 1
    advance = advance or (lambda n: None)
    # The store says which of its grids are dense (a repair recomputes them whatever params say).
    dense = {g for g in cs.store_grids(store.group) if cs.grid_content(store.group, g) == cs.DENSE}
    if dense & {g for work in todo.values() for g in work.computed}:
        check_dense_teacher(teacher.model.visual, teacher.identity.model, "maskclip", f"{store.url}: dense grids {sorted(dense)} (cache.dense_grids)")  # before any work
    writer = _ShardWriter(store, stats)

    def decode(row: int, work: ShardWork) -> _Item:
        t0 = time.perf_counter()
        decoded = decode_center_square(root / paths[row], min_side=params.data.min_side, max_pixels=params.data.max_pixels, draft_side=params.teacher.jpeg_draft_side)
        views = image = None
        if decoded.square is not None:
            crops = tuple(g for g in work.computed if g not in dense)
            if views_on_decode_thread and crops:
                views = make_views([torch.from_numpy(decoded.square)], crops, teacher.spec)[0]
            if work.image_size:
                image = student_input(decoded.square, work.image_size)
        return _Item(row, decoded, views, image, time.perf_counter() - t0)

    embedder = _Embedder(teacher, writer, stats, {g: cs.dense_side(store.group, g) for g in dense})
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            for shard, work, items in _decoded_shards(pool, decode, store, todo, lookahead=2 * batch_size):
                if not store.lacking(shard, work):  # another writer of this store finished it meanwhile
                    for _ in items:  # its decodes were queued: let them go
                        pass
                    stats.shards_skipped += 1
                    advance(len(store.shard_rows_range(shard)))
                    continue
                rows, grids, size = store.shard_rows_range(shard), work.computed, work.image_size
                stored = store.settled_rows(shard) if work.settled else None
                result = ShardResult(
                    shard=shard,
                    views={g: np.full((len(rows), g * g, store.dim), np.nan, dtype=np.float16) for g in grids},
                    status=np.full(len(rows), cs.STATUS_FAILED, dtype=np.uint8),
                    failures=[""] * len(rows),
                    images=np.zeros((len(rows), 3, size, size), dtype=np.uint8) if size else None,
                    write=work.grids if work.batch_grids else None,
                )
                embedder.start_shard(result)
                batch: list[_Item] = []
                for future in items:
                    t0 = time.perf_counter()
                    item = future.result()
                    stats.decode_wait_s += time.perf_counter() - t0
                    stats.decode_s += item.seconds
                    local = item.row - rows.start
                    if stored is not None and stored[0][local] != cs.STATUS_OK:  # failed when first written: stays so
                        result.failures[local] = stored[1][local]
                        advance(1)
                        continue
                    if stored is not None and item.decoded.square is None:
                        raise InputError(
                            f"{root / paths[item.row]}: {item.decoded.reason}, but it decoded when {store.url} was first written "
                            f"(did the file or data.max_pixels change?); the finished shards are kept"
                        )
                    if item.decoded.square is None:
                        result.failures[local] = item.decoded.reason
                        stats.failures[paths[item.row]] = item.decoded.reason
                        advance(1)
                        continue
                    result.status[local] = cs.STATUS_OK
                    if item.image is not None:
                        result.images[local] = item.image
                    if not grids:  # only the student images were missing: no teacher work
                        advance(1)
                        continue
                    batch.append(item)
                    if len(batch) == batch_size:
                        embedder.launch(batch, grids, result, rows.start)
                        advance(len(batch))
                        batch = []
                if batch:
                    embedder.launch(batch, grids, result, rows.start)
                    advance(len(batch))
                embedder.end_shard(result)
                stats.rows_computed += len(rows)
            embedder.flush()
    finally:
        writer.close()


def _decoded_shards(pool: ThreadPoolExecutor, decode, store: CacheStore, todo: Mapping[int, ShardWork], lookahead: int) -> Iterator[tuple[int, ShardWork, Iterator[Future]]]:
    """Yield (shard, work, futures of its rows) with decoding running `lookahead` rows ahead."""
    jobs = ((shard, work, row) for shard, work in todo.items() for row in store.shard_rows_range(shard))
    pending: deque[tuple[int, Future]] = deque()

    def fill():
        while len(pending) < lookahead:
            job = next(jobs, None)
            if job is None:
                return
            shard, work, row = job
            pending.append((shard, pool.submit(decode, row, work)))

    for shard, work in todo.items():
        def futures(shard=shard):
            for _ in store.shard_rows_range(shard):
                fill()
                s, fut = pending.popleft()
                assert s == shard
                yield fut

        yield shard, work, futures()


class _Embedder:
    """Runs the teacher on batches and hands finished shards to the writer.

    On a GPU the forward of one batch is launched before the previous batch's results are
    fetched (`depth` 1), so decoding and view cutting of the next batch overlap the model;
    on a CPU the forward is synchronous anyway (`depth` 0). A batch's copy back to the host is
    queued right behind its own forward, into pinned memory, and waited for with an event: a
    plain `.cpu()` at fetch time would queue behind the next batch's forward as well and leave
    the GPU idle while the following batch's views are cut.
    """

    def __init__(self, teacher: Teacher, writer: _ShardWriter, stats: RunStats, dense: dict[int, int] | None = None):
        self.teacher, self.writer, self.stats = teacher, writer, stats
        self.dense = dense or {}  # grid -> side: the grids whose views are dense embeddings of the whole square (`Teacher.encode_dense`)
        self.depth = 1 if teacher.device.type == "cuda" else 0
        self.inflight: deque[tuple[_Fetch, list[int], tuple[int, ...], ShardResult]] = deque()
        self.open: dict[int, list] = {}  # shard -> [result, batches in flight, all batches launched]

    def start_shard(self, result: ShardResult) -> None:
        self.open[result.shard] = [result, 0, False]

    def launch(self, batch: list[_Item], grids: tuple[int, ...], result: ShardResult, row0: int) -> None:
        t0 = time.perf_counter()
        crops = tuple(g for g in grids if g not in self.dense)
        squares = [torch.from_numpy(item.decoded.square) for item in batch]
        parts: dict[int, torch.Tensor] = {}  # grid -> [B, g*g, D]
        t1 = t0
        if crops:
            if batch[0].views is not None:
                views = torch.stack([item.views for item in batch])  # [B, V_c, 3, T, T]
            else:
                views = make_views(squares, crops, self.teacher.spec, self.teacher.device)
            t1 = time.perf_counter()
            b, v = views.shape[:2]
            feats = self.teacher.encode(views.flatten(0, 1)).view(b, v, -1)  # [B, V_c, D], async on GPU
            parts.update(zip(crops, feats.split([g * g for g in crops], dim=1)))
        for g in grids:
            if g in self.dense:
                parts[g] = self.teacher.encode_dense(squares, g, self.dense[g])  # resized on the device, like the views
        feats = torch.cat([parts[g] for g in grids], dim=1).to(torch.float16)  # [B, V_s, D], canonical order
        fetch = _Fetch(feats)
        self.stats.views_s += t1 - t0
        self.stats.model_s += time.perf_counter() - t1
        self.inflight.append((fetch, [item.row - row0 for item in batch], grids, result))
        self.open[result.shard][1] += 1
        while len(self.inflight) > self.depth:
            self._collect()

    def end_shard(self, result: ShardResult) -> None:
        self.open[result.shard][2] = True
        self._maybe_write(result.shard)

    def flush(self) -> None:
        while self.inflight:
            self._collect()

    def _collect(self) -> None:
        fetch, local, grids, result = self.inflight.popleft()
        t0 = time.perf_counter()
        values = fetch.wait()  # [B, V_s, D]; waits for this batch's forward only
        self.stats.model_s += time.perf_counter() - t0
        start = 0
        for g in grids:
            result.views[g][local] = values[:, start : start + g * g]  # [B, g*g, D]
            start += g * g
        self.open[result.shard][1] -= 1
        self._maybe_write(result.shard)

    def _maybe_write(self, shard: int) -> None:
        result, in_flight, launched = self.open[shard]
        if launched and in_flight == 0:
            del self.open[shard]
            self.writer.put(result)


class _Fetch:
    """A device tensor on its way to the host: queued now, behind the work that makes it."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(values.device))  # the copy's stream, whatever device is current
        else:
            self.host = values

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class _ShardWriter:
    """Writes finished shards on a thread of its own, two at most in flight; re-raises its errors."""

    def __init__(self, store: CacheStore, stats: RunStats):
        self.store, self.stats = store, stats
        self.queue: queue.Queue[ShardResult | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (result := self.queue.get()) is not None:
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                self.store.write_shard(result)
                self.stats.shards_written += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            self.stats.write_s += time.perf_counter() - t0

    def put(self, result: ShardResult) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.queue.put(result)
        self.stats.write_wait_s += time.perf_counter() - t0

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
