"""Files and folders a user names: image folders and list files, small text files, output folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.core.errors import InputError

# A list-file entry that Path(entry).as_posix() returns unchanged: no empty, "." or trailing part.
_PLAIN = re.compile(r"/?(?:(?!\.(?:/|$))[^/\\]+/)*(?!\.$)[^/\\]+")


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def read_text_file(path: Path) -> str:
    """A small text file's contents (UTF-8; a BOM is dropped).

    Raises:
        InputError: the file is not UTF-8, naming it and the first bad byte.
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})") from None


CREATED: list[Path] = []  # folders output_folder made in this process, outermost first per call


def output_folder(path: str | Path, option: str) -> Path:
    """Create the folder an option names for outputs (checked before any work is done).

    The folders it creates are remembered (`CREATED`), so that a command that then fails can
    take back the ones it left empty (`remove_empty_created`).

    Raises:
        InputError: the path, or a folder on it, is a file.
    """
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{option} {path}: not a folder") from None
    CREATED.extend(missing)
    return path


def remove_empty_created() -> None:
    """Remove the folders `output_folder` created that are still empty (innermost first)."""
    for folder in reversed(CREATED):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            pass
    CREATED.clear()


def list_images(source: str | Path) -> tuple[Path, list[str]]:
    """The data root and the ordered relative paths of a folder or a list file.

    Folders are searched recursively, through symbolic links, except a link into a folder the
    walk is already inside (a cycle: it would list the same images again at every depth). Two
    links to one folder still list it twice, as they always have (manifests stay as they were).
    """
    source = Path(source)
    if source.is_dir():
        found = []
        inside = {str(source): frozenset({os.path.realpath(source)})}  # walked folder -> real folders above it, itself included
        for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
            above = inside.pop(dirpath)
            kept = []
            for d in dirnames:
                real = os.path.realpath(os.path.join(dirpath, d))
                if not d.startswith(".") and real not in above:
                    inside[os.path.join(dirpath, d)] = above | {real}
                    kept.append(d)
            dirnames[:] = kept
            for name in filenames:
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    found.append(Path(dirpath, name).relative_to(source).as_posix())
        if not found:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"{source}: no images found (searched recursively for {exts})")
        return source, sorted(found)
    if source.is_file():
        paths, seen = [], {}
        for lineno, line in enumerate(read_text_file(source).splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not _PLAIN.fullmatch(entry):  # pathlib's normal form; for most entries the entry itself (22 us saved a line)
                entry = Path(entry).as_posix()
            if entry in seen:
                raise InputError(f"{source}:{lineno}: duplicate entry {entry!r} (first on line {seen[entry]})")
            seen[entry] = lineno
            paths.append(entry)
        if not paths:
            raise InputError(f"{source}: the list of images is empty")
        return source.parent, paths
    raise InputError(f"{source}: no such folder or list file of images")
