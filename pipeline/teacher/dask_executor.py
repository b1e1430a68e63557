"""Stage one on dask.distributed: one task per shard, the teacher loaded once per worker process.

`teacher.executor: dask` runs the shards that the store's progress markers say are missing as
dask tasks, on the scheduler at `teacher.dask_address`, or on a cluster started for the run
(`teacher.dask_workers` worker processes: dask-cuda's LocalCUDACluster, one worker per GPU, when
the teacher runs on CUDA; a LocalCluster sharing the CPU cores otherwise).

- A task (`shard_task`) opens the store itself, decodes its shard's images, makes the views, runs
  the teacher and writes the whole shard, then its progress markers, with the same code as the
  local executor (`pipeline.teacher.shards.compute_shards`), so the bytes are the same.
- The teacher is loaded once per worker process (`worker_teacher`, a per-process cache keyed by
  the teacher config) and checked against the run's identity before every shard.
- Failed tasks are retried (`retries`); a task on a worker that dies is rescheduled by dask. A
  killed worker loses only its unfinished shard: finished shards are written and marked.
- Progress is reported by the client, a tqdm bar over `as_completed`.

Worker processes are spawned (dask's default), never forked: zarr's and fsspec's event loops
are not fork-safe. Workers must see `data.images` at the same path, and the store at the same
path or URL, as the client; credentials come from the workers' own environment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import cache_schema as cs
from pipeline.cache.manifest import Manifest
from pipeline.cache.store import CacheStore, ShardWork
from pipeline.clip.model import Teacher, TeacherIdentity
from pipeline.config import Params, TeacherConfig
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.views import ViewSpec
from pipeline.teacher.shards import RunStats, compute_shards

log = logging.getLogger(__name__)


TASK_RETRIES = 3  # a shard task that raises is rerun this many times before the run fails


WAIT_FOR_WORKERS_S = 120  # how long a run waits for the first worker of a cluster to join


_TEACHER: dict[TeacherConfig, Teacher] = {}  # this process's teacher (one at most)


_TEACHER_LOCK = threading.Lock()


def worker_teacher(cfg: TeacherConfig) -> Teacher:
    """This process's teacher for `cfg`: loaded by the first task, reused by every later one.

    A process keeps one teacher: a run with another teacher config replaces it, so a long-lived
    cluster serving several runs does not accumulate models.

    Args:
        cfg: the teacher section (hashable: a frozen dataclass of plain values).
    """
    with _TEACHER_LOCK:
        teacher = _TEACHER.get(cfg)
        if teacher is None:
            _TEACHER.clear()
            teacher = _TEACHER[cfg] = Teacher.load(cfg)
        return teacher


def describe_teacher(cfg: TeacherConfig) -> tuple[TeacherIdentity, ViewSpec, str]:
    """(identity, view spec, host) of this worker's teacher, loading it: the warm-up task."""
    teacher = worker_teacher(cfg)
    return teacher.identity, teacher.spec, socket.gethostname()


def shard_task(url: str, fingerprint: str, shard: int, work: ShardWork, root: str, paths: dict[int, str], params: Params, teacher_fields: dict) -> RunStats:
    """One dask task: compute shard `shard` of the store at `url` and write it (data, then marker).

    Args:
        url: the store (path or URL), opened here, in the worker's process.
        fingerprint: the store's expected fingerprint (a replaced store is refused).
        shard, work: the shard and what it lacks (grids, student images).
        root, paths: the data root and row -> path of this shard's rows.
        params: the run's params (`data`, `teacher`).
        teacher_fields: the run's teacher identity; the worker's teacher must have the same.
    Returns:
        this shard's counts and time split.
    """
    teacher = worker_teacher(params.teacher)
    mine = teacher.identity.fingerprint_fields()
    if mine != teacher_fields:
        differ = ", ".join(k for k in sorted(mine) if mine[k] != teacher_fields.get(k))
        raise InputError(f"dask worker on {socket.gethostname()}: its teacher differs from the run's in {differ} (same weights on every worker?)")
    store = CacheStore.open(url, fingerprint)
    stats = RunStats(store=url)
    lacking = store.lacking(shard, work)
    recovered = [g for g in work.grids if g not in lacking.grids]
    if recovered:  # an earlier attempt of this task marked these grids before its worker died
        ok = int(np.sum(store.settled_rows(shard)[0] == cs.STATUS_OK))
        stats.views_recovered = ok * sum(g * g for g in recovered)
    if not lacking:  # the whole shard: dask lost the earlier attempt's result, not its work
        stats.shards_recovered = 1
        return stats
    work = lacking
    views_before = teacher.forward_views
    compute_shards(store, Path(root), paths, teacher, {shard: work}, params, stats)
    stats.views_computed = teacher.forward_views - views_before
    return stats


class DaskExecutor:
    """Runs a stage-one run's shards as dask tasks (used as a context manager around the run)."""

    def __init__(self, params: Params):
        self.cfg = params.teacher
        self.cluster = None
        self.client = None
        self.identity: TeacherIdentity | None = None
        self._warmup: list = []
        self._log_level = logging.NOTSET

    def __enter__(self) -> DaskExecutor:
        import distributed  # noqa: F401 - configures its loggers on import, before we quiet them

        # The scheduler and nannies of a local cluster log every connection at INFO: keep warnings.
        distributed_log = logging.getLogger("distributed")
        self._log_level = distributed_log.level
        distributed_log.setLevel(max(logging.WARNING, self._log_level))
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
        logging.getLogger("distributed").setLevel(self._log_level)

    def _start(self) -> None:
        from distributed import Client

        if self.cfg.dask_address:
            try:
                self.client = Client(self.cfg.dask_address)  # waits distributed.comm.timeouts.connect
            except (OSError, TimeoutError) as exc:
                raise InputError(f"teacher.dask_address: cannot reach a dask scheduler at {self.cfg.dask_address} ({exc})") from None
        else:
            self.cluster, self.cfg = _local_cluster(self.cfg)
            self.client = Client(self.cluster)
        try:
            self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            raise InputError(f"dask scheduler {self.client.scheduler.address}: no worker joined within {WAIT_FOR_WORKERS_S} s") from None
        # Every worker loads its teacher now, while the client hashes the manifest.
        self._warmup = [
            self.client.submit(describe_teacher, self.cfg, workers=[w], allow_other_workers=True, pure=False, key=f"zeroseg-load-teacher-{uuid.uuid4().hex[:8]}")
            for w in self.client.scheduler_info()["workers"]
        ]

    def teacher(self) -> tuple[TeacherIdentity, ViewSpec]:
        """The workers' teacher (identity, spec); every worker that answered must agree."""
        described = self.client.gather(self._warmup)
        identity, spec, host = described[0]
        for other, _, other_host in described[1:]:
            if other.fingerprint_fields() != identity.fingerprint_fields():
                raise InputError(f"dask workers disagree on the teacher: {host} has weights {identity.weights_sha256[:12]}, {other_host} has {other.weights_sha256[:12]}")
        self.identity = identity
        return identity, spec

    def run(self, store: CacheStore, manifest: Manifest, todo: dict[int, ShardWork], params: Params, stats: RunStats, progress: bool) -> None:
        from distributed import KilledWorker, as_completed

        if self.identity is None:
            self.teacher()
        task_params = dataclasses.replace(params, teacher=self.cfg)
        fields, fingerprint, run = self.identity.fingerprint_fields(), store.group.attrs["fingerprint"], uuid.uuid4().hex[:8]
        root = os.path.abspath(manifest.root)  # workers elsewhere need paths that do not depend on a cwd
        url = store.url if "://" in store.url else os.path.abspath(store.url)
        rows = {}
        for shard, work in todo.items():
            shard_rows = store.shard_rows_range(shard)
            future = self.client.submit(
                shard_task, url, fingerprint, shard, work, root, {r: manifest.paths[r] for r in shard_rows}, task_params, fields,
                key=f"zeroseg-shard-{shard}-{run}", retries=TASK_RETRIES, pure=False,
            )
            rows[future] = len(shard_rows)
        workers = len(self.client.scheduler_info()["workers"])
        bar = tqdm(total=sum(rows.values()), desc=f"teacher cache ({workers} dask workers)", unit="img", disable=not progress, smoothing=0.05)
        try:
            for future in as_completed(list(rows)):
                try:
                    stats.add(future.result())
                except KilledWorker:
                    raise InputError(f"{store.url}: {future.key}: every worker that ran it died (out of memory?); finished shards are kept, rerun to resume") from None
                # Released at once: a result still wanted when its worker dies would be recomputed.
                future.release()
                bar.update(rows.pop(future))
                bar.set_postfix(views_per_s=f"{stats.views_computed / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
        finally:
            self.client.cancel(list(rows))  # after an error the other shards stop; finished ones are kept
            bar.close()


def _local_cluster(cfg: TeacherConfig) -> tuple[object, TeacherConfig]:
    """(cluster, teacher config for its workers) of `teacher.dask_workers` worker processes on this machine.

    The workers split the cores: each gets cores / workers decode threads (unless
    `teacher.decode_workers` says otherwise) and as many torch threads.
    """
    import dask
    from distributed import LocalCluster

    if dask.config.get("distributed.worker.multiprocessing-method") == "fork":
        raise InputError("dask config distributed.worker.multiprocessing-method is fork; zarr's event loop is not fork-safe: use spawn (dask's default) or forkserver")
    share = max(1, (os.cpu_count() or 1) // cfg.dask_workers)
    cfg = dataclasses.replace(cfg, decode_workers=cfg.decode_workers or share)
    options = {"silence_logs": logging.ERROR, "threads_per_worker": 1}
    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise InputError("teacher.executor=dask on CUDA starts one worker per GPU with dask-cuda: pip install dask-cuda, or set teacher.dask_address to a cluster of your own") from None
        n = min(cfg.dask_workers, torch.cuda.device_count())
        if n < cfg.dask_workers:
            log.warning("teacher.dask_workers=%d but %d GPUs: starting %d workers", cfg.dask_workers, n, n)
    # Worker processes get their share of the cores for torch (dask's nanny would pin them to 1
    # thread) and glibc's default malloc: dask's MALLOC_TRIM_THRESHOLD_ also fixes the mmap
    # threshold, so every activation tensor is mmap'd and faulted in (ViT-S-32 forwards 40% slower).
    environ = {name: share for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    trim = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # set here by any earlier nanny; inherited at spawn
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            if cuda:  # each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), as device "cuda"
                return LocalCUDACluster(n_workers=n, **options), dataclasses.replace(cfg, device="cuda")
            return LocalCluster(n_workers=cfg.dask_workers, processes=True, **options), dataclasses.replace(cfg, device="cpu")
    finally:
        if trim is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = trim
