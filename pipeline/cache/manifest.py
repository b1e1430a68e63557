"""The image manifest: which images, in which order, and a hash that names that exact set.

Order is deterministic: a folder is walked recursively and sorted by relative POSIX path; a text
file of paths keeps its own order. The manifest hash covers every path and every file's content:

- `content` (default): sha256 of each file's bytes. Portable (a team that copies the dataset gets
  the same hash, so shared caches validate), and memoized in a local SQLite table keyed by
  (path, size, mtime, inode), so only new or changed files are read again. The first pass over
  ImageNet-1k reads ~140 GB, a few minutes on local disks; stage one decodes every byte anyway.
- `stat`: path + size + mtime only. Instant, but it changes on every copy of the dataset, so a
  cache built from it validates only against the very same files.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.core import tars
from pipeline.core.errors import InputError
from pipeline.core.files import list_images

MISSING = "missing"


@dataclass(frozen=True)
class Manifest:
    """An ordered list of images under one data root.

    Attributes:
        root: the data root; `paths` are relative to it (absolute list entries stay absolute).
        paths: POSIX paths in manifest order.
        hash: sha256 naming the list and the content of every file.
        hash_mode: "content" or "stat".
        source: the folder or list file it was read from.
    """

    root: Path
    paths: tuple[str, ...]
    hash: str
    hash_mode: str
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, index: int) -> Path:
        return self.root / self.paths[index]


def build_manifest(source: str | Path, hash_mode: str = "content", workers: int = 0, progress: bool = True) -> Manifest:
    """List the images of `source` and hash the list and their content.

    Args:
        source: a folder (searched recursively; jpg, jpeg, png, webp, bmp, any case) or a text
            file with one path per line (relative paths are relative to the file's folder).
        hash_mode: "content" or "stat" (see the module docstring).
        workers: hashing threads; 0 picks one per core (sha256 releases the GIL).
    """
    if hash_mode not in ("content", "stat"):
        raise InputError(f"unknown manifest hash mode {hash_mode!r} (content or stat)")
    if tars.is_tar_source(source):
        return _tar_manifest(source, hash_mode, workers, progress)
    root, paths = list_images(source)
    digests = _digests(root, paths, hash_mode, workers, progress, f"hashing {source}")
    h = hashlib.sha256(f"zeroseg-manifest-v1 {hash_mode}\n".encode())
    for path, digest in zip(paths, digests):
        h.update(f"{path}\t{digest}\n".encode())
    return Manifest(root=root, paths=tuple(paths), hash=h.hexdigest(), hash_mode=hash_mode, source=str(source))


def _tar_manifest(source: str | Path, hash_mode: str, workers: int, progress: bool) -> Manifest:
    """The manifest of webdataset tar shards: rows are image members (`SHARD::MEMBER`), and the
    hash covers every shard's bytes (or size and mtime) and every row's path."""
    root, shards = tars.list_shards(source)
    paths = [row for shard in tqdm(shards, desc=f"listing {source}", unit="shard", disable=not progress or len(shards) < 100)
             for row in tars.list_members(root, shard)]
    if not paths:
        raise InputError(f"{source}: no image members in its {len(shards)} tar shards (jpg, jpeg, png, webp, bmp)")
    digests = _digests(root, shards, hash_mode, workers, progress, f"hashing {source}")
    h = hashlib.sha256(f"zeroseg-manifest-v1 tar {hash_mode}\n".encode())
    for shard, digest in zip(shards, digests):
        h.update(f"{shard}\t{digest}\n".encode())
    for path in paths:
        h.update(f"{path}\n".encode())
    return Manifest(root=root, paths=tuple(paths), hash=h.hexdigest(), hash_mode=hash_mode, source=str(source))


def _digests(root: Path, paths: list[str], hash_mode: str, workers: int, progress: bool, desc: str) -> list[str]:
    """Each file's digest (`content`: sha256, memoized; `stat`: size and mtime), in order."""
    digest_fn = _content_digests if hash_mode == "content" else _stat_digests
    memo = _HashMemo.open_default() if hash_mode == "content" else None
    workers = workers or min(8, os.cpu_count() or 1)
    # Tasks of 256 files: one future per file costs more than a stat (bench/scale_bench.py: 74 us
    # a file at 10k files, 20 in batches) and would hold a million futures for ImageNet.
    batches = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    digests: list[str] = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=desc, unit="file", disable=not progress or len(paths) < 1000) as bar:
        for done in pool.map(lambda batch: digest_fn([root / p for p in batch], memo), batches):
            digests.extend(done)
            bar.update(len(done))
    if memo is not None:
        memo.close()
    return digests


def _stats(paths: list[Path]) -> list[os.stat_result | None]:
    """Each file's stat, None for one that cannot be stat'ed."""
    out: list[os.stat_result | None] = []
    for path in paths:
        try:
            out.append(path.stat())
        except OSError:
            out.append(None)
    return out


def _stat_digests(paths: list[Path], memo: None = None) -> list[str]:
    """size:mtime of each file (MISSING for one that cannot be stat'ed)."""
    return [MISSING if st is None else f"{st.st_size}:{st.st_mtime_ns}" for st in _stats(paths)]


def _content_digests(paths: list[Path], memo: _HashMemo | None = None) -> list[str]:
    """sha256 of each file's bytes (MISSING for one that cannot be read); the memo is asked for
    the whole batch in one query, so a memoized pass costs about a stat per file."""
    # abspath, not realpath: resolving links cost 36 of a memoized pass's 41 us a file
    # (bench/scale_bench.py); (size, mtime, inode) already pin the file's bytes.
    keys = [None if st is None else (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino) for path, st in zip(paths, _stats(paths))]
    known = memo.get_many([k for k in keys if k is not None]) if memo is not None else {}
    out = []
    for path, key in zip(paths, keys):
        if key is None:
            out.append(MISSING)
        elif key in known:
            out.append(known[key])
        else:
            out.append(_hash_file(path, key, memo))
    return out


def _hash_file(path: Path, key: tuple, memo: _HashMemo | None) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return MISSING
    digest = h.hexdigest()
    if memo is not None:
        memo.put(key, digest)
    return digest


class _HashMemo:
    """Content hashes of files already seen, keyed by (path, size, mtime_ns, inode), like DVC's state db."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT, size INT, mtime INT, inode INT, sha256 TEXT,"
            " PRIMARY KEY (path, size, mtime, inode))"
        )
        self._lock = threading.Lock()
        self._pending: list[tuple] = []

    @classmethod
    def open_default(cls) -> _HashMemo | None:
        base = os.environ.get("ZEROSEG_STATE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroseg"
        try:
            return cls(Path(base) / "file-hashes.sqlite")
        except (OSError, sqlite3.Error):
            return None  # a read-only home: hash without memo

    def get_many(self, keys: list[tuple]) -> dict[tuple, str]:
        """key -> sha256 for the keys the memo holds (one query per call)."""
        if not keys:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT path, size, mtime, inode, sha256 FROM files WHERE path IN ({','.join('?' * len(keys))})", [k[0] for k in keys]
            ).fetchall()
        wanted = set(keys)
        return {key: digest for *fields, digest in rows if (key := tuple(fields)) in wanted}

    def put(self, key: tuple, digest: str) -> None:
        with self._lock:
            self._pending.append((*key, digest))
            if len(self._pending) >= 1000:
                self._flush()

    def _flush(self) -> None:
        try:
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", self._pending)
            self._db.commit()
        except sqlite3.Error:
            pass  # the memo is an optimisation; losing it costs a re-read, never a wrong hash
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._flush()
        self._db.close()
