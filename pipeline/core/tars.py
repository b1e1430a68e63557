"""Webdataset tar shards as stage-one inputs: unlabelled web images as img2dataset writes them.

`data.images` names tar shards as a brace pattern (`web/shard-{00000..00099}.tar`, webdataset's
convention), one `.tar` file, or a folder holding `.tar` files (searched recursively). Every
image member (jpg, jpeg, png, webp, bmp, any case) is a row, in shard order and then in the
member order of its shard; sidecar members (`.json`, `.txt`, `.cls`, ...) are not rows. A row's
path is `SHARD::MEMBER` (`shard-00003.tar::000123.jpg`): the shard relative to the data root,
then the member name, whose stem is the webdataset key.

Members are read by offset (`os.pread` on the shard, its member index built from the tar
headers and kept for the 64 shards used last in each process), so the decode threads and dask workers that decode loose files decode
tar members the same way, each row on its own, in any order: resume and repair work per shard
of the store, which need not line up with the tar shards. The standard `tarfile` module reads
the headers; webdataset's own reader streams a shard from its start, which serves a training
loop but not row-addressed, resumable writes, and it would be one more dependency.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from pathlib import Path

from pipeline.core.errors import InputError

SEP = "::"  # between a shard's path and a member's name in a row's path


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def expand_braces(pattern: str) -> list[str]:
    """Webdataset's shard patterns: `{000..123}` (zero padding kept) and `{a,b,c}`, nested left to right.

    Written out here (a dozen lines) rather than taking the braceexpand package as a dependency.

    Raises:
        InputError: a malformed range (`{5..2}`, `{a..b}`).
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        first, last = ranged.groups()
        if int(last) < int(first):
            raise InputError(f"{pattern}: range {{{body}}} runs backwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    elif ".." in body:
        raise InputError(f"{pattern}: {{{body}}} is not a range of numbers (e.g. {{000..099}})")
    else:
        choices = body.split(",")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def is_tar_source(source: str | Path) -> bool:
    """Whether `data.images` names tar shards: a pattern or file ending in .tar, or a folder
    holding .tar files and no loose images (a folder with both is a folder of images)."""
    text = str(source)
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return True
    folder = Path(source)
    if not folder.is_dir():
        return False
    tars = False
    for _, _, names in os.walk(folder, followlinks=True):
        for name in names:
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                return False  # the first loose image settles it: the walk stops here
            tars |= suffix == ".tar"
    return tars


def list_shards(source: str | Path) -> tuple[Path, list[str]]:
    """(data root, shard paths relative to it, in order) of a tar source.

    Raises:
        InputError: a shard a pattern names is missing, or a folder has none.
    """
    text = str(source)
    folder = Path(source)
    if folder.is_dir():
        shards = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tar") if p.is_file())
        if not shards:
            raise InputError(f"{folder}: no .tar shards found")
        return folder, shards
    names = expand_braces(text)
    root = Path(os.path.commonpath([str(Path(n).parent) for n in names])) if "{" in text else folder.parent
    missing = [Path(name).name for name in names if not Path(name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{text}: {len(missing)} of the {len(names)} tar shards it names are missing ({shown})")
    return root, [Path(n).relative_to(root).as_posix() if Path(n).is_relative_to(root) else n for n in names]


def list_members(root: Path, shard: str) -> list[str]:
    """Row paths (`SHARD::MEMBER`) of the image members of one shard, in member order.

    Raises:
        InputError: the shard is not a readable tar (named, with tarfile's reason).
    """
    return [f"{shard}{SEP}{name}" for name in _index(str(root / shard))]


def is_member(path: str | Path) -> bool:
    """Whether `path` names a member of a tar shard (`SHARD.tar::MEMBER`), not a loose file."""
    shard, sep, _ = str(path).partition(SEP)
    return bool(sep) and shard.endswith(".tar")


def read_member(path: str | Path) -> bytes:
    """The bytes of the tar member a row path names (`/data/shard-00001.tar::000123.jpg`).

    Raises:
        OSError: the shard cannot be read, or has no such member (the decoder makes it the
            row's failure reason).
    """
    shard, _, name = str(path).partition(SEP)
    try:
        index = _index(shard)
    except InputError as exc:  # the shard changed since it was listed: this row fails, the run goes on
        raise OSError(str(exc)) from None
    if name not in index:
        raise FileNotFoundError(f"no member {name!r} in {shard}")
    offset, size = index[name]
    fd = os.open(shard, os.O_RDONLY)  # per member: a shard's handle kept open would run a
    try:                               # 10k-shard dataset out of file descriptors
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{shard} ends inside member {name!r} ({len(data)} of {size} bytes)")
    return data


@functools.lru_cache(maxsize=64)  # the shards decoding is at; a 10k-shard listing keeps no 10k indexes
def _index(path: str) -> dict[str, tuple[int, int]]:
    """image member -> (data offset, size) of a shard, read from its tar headers."""
    try:
        with tarfile.open(path, mode="r:") as tar:  # headers only: members are read by offset
            return {
                m.name: (m.offset_data, m.size)
                for m in tar
                if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS and not Path(m.name).name.startswith(".")
            }
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: not a readable tar shard ({type(exc).__name__}: {exc})") from None
