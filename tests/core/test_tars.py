"""Webdataset tar shards as inputs: rows are image members, hashed by the shards' bytes,
decoded by offset, failures recorded per member, the student's images read from the store."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN, run_cli, write_params

import cache_schema as cs
from pipeline.cache.manifest import build_manifest
from pipeline.cache.reader import load_targets
from pipeline.config import load_params
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.tars import expand_braces, read_member
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.run import run_training


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: list[Path]) -> list[str]:
    """Two shards in img2dataset's layout (KEY.jpg, KEY.json, KEY.txt), 4 images each, plus, in the
    second, a truncated JPEG and a text file named .jpg. Returns the image members' row paths."""
    folder.mkdir(parents=True)
    rows = []
    for s in range(2):
        name = f"shard-{s:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(4):
                key = f"{s:05d}{i:04d}"
                add(tar, f"{key}.jpg", images[4 * s + i].read_bytes())
                add(tar, f"{key}.json", json.dumps({"key": key, "url": f"https://example.com/{key}.jpg"}).encode())
                add(tar, f"{key}.txt", b"a caption nobody reads")
                rows.append(f"{name}::{key}.jpg")
            if s == 1:
                add(tar, "broken.jpg", images[0].read_bytes()[:300])
                add(tar, "notes.jpg", b"this member is text, whatever its name says")
                rows += [f"{name}::broken.jpg", f"{name}::notes.jpg"]
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_dir) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("web") / "web"
    images = sorted((demo_dir / "images").glob("*.jpg"))
    return folder, write_shards(folder, images)


def test_a_loose_file_with_the_separator_in_its_name_is_no_member(tmp_path):
    from pipeline.core.tars import is_member, list_shards

    assert is_member("web/shard-00001.tar::000123.jpg") and not is_member("photos/a::b.jpg")
    for name in ("a.tar", "b.tar"):
        (tmp_path / "web" / name).parent.mkdir(exist_ok=True)
        with tarfile.open(tmp_path / "web" / name, "w"):
            pass
    assert list_shards(f"{tmp_path}/web/{{a,b}}.tar") == (tmp_path / "web", ["a.tar", "b.tar"])  # the root is the shards' folder


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    with pytest.raises(InputError, match="runs backwards"):
        expand_braces("s-{5..2}.tar")


def test_the_manifest_lists_image_members_in_shard_order_and_hashes_the_shards(shards, demo_dir, tmp_path):
    folder, rows = shards
    by_folder = build_manifest(folder, "content", progress=False)
    by_pattern = build_manifest(f"{folder}/shard-{{00000..00001}}.tar", "content", progress=False)
    assert list(by_folder.paths) == rows and by_folder.root == folder  # sidecar .json/.txt members are not rows
    assert by_pattern.paths == by_folder.paths and by_pattern.hash == by_folder.hash
    assert read_member(folder / rows[6]) == sorted((demo_dir / "images").glob("*.jpg"))[6].read_bytes()  # by offset, any order
    # One changed byte in one shard changes the hash; so does another order of shards.
    copy = tmp_path / "web"
    copy.mkdir()
    for p in folder.iterdir():
        copy.joinpath(p.name).write_bytes(p.read_bytes())
    assert build_manifest(copy, "content", progress=False).hash == by_folder.hash  # portable: the bytes, not the paths' stat
    data = bytearray((copy / "shard-00001.tar").read_bytes())
    data[-2000] ^= 1
    (copy / "shard-00001.tar").write_bytes(bytes(data))
    assert build_manifest(copy, "content", progress=False).hash != by_folder.hash
    with pytest.raises(InputError, match=r"shard-\{00000..00007\}.tar: 6 of the 8 tar shards it names are missing \(shard-00002.tar, .*, shard-00006.tar and 1 more\)"):
        build_manifest(f"{folder}/shard-{{00000..00007}}.tar", "content", progress=False)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(InputError, match=r"bad.tar: not a readable tar shard"):
        build_manifest(tmp_path / "bad.tar", "content", progress=False)


def test_stage_one_reads_members_by_offset_and_stage_two_trains_from_the_store(shards, demo_dir, tmp_path):
    folder, rows = shards
    pattern = f"{folder}/shard-{{00000..00001}}.tar"
    params = write_params(tmp_path / "params.yaml", pattern, tmp_path / "caches", cache={"student_image_size": 32, "shard_rows": 4, "chunk_rows": 2})
    with pytest.raises(ConfigError, match="names tar shards, so stage two reads the student's images from the store: set cache.student_image_size"):
        run_teacher_cache(load_params(params, ["cache.student_image_size=0"]), str(tmp_path / "no-images.zarr"), progress=False)
    store = tmp_path / "web.zarr"
    stats = run_teacher_cache(load_params(params), str(store), progress=False)
    assert stats.complete and stats.images == 10 and stats.failed == 2
    failures = {f["path"]: f["reason"] for f in json.loads(run_cli("cache", "info", str(store), "--json").stdout)["failures"]}
    assert set(failures) == {rows[8], rows[9]}
    assert failures[rows[8]].startswith("corrupt or truncated image") and failures[rows[9]] == "not an image PIL can identify"
    # The same images as loose files give the same views, bit for bit.
    loose = tmp_path / "loose.zarr"
    run_teacher_cache(load_params(write_params(tmp_path / "loose.yaml", demo_dir / "images", tmp_path / "caches", cache={"student_image_size": 32})), str(loose), progress=False)
    np.testing.assert_array_equal(load_targets(str(store), [1, 2, 3, 4])[:8].view(np.uint16), load_targets(str(loose), [1, 2, 3, 4]).view(np.uint16))
    cs.validate(str(store), deep=True)
    summary = run_training(load_params(params, [*TINY_TRAIN, "train.epochs=1", "train.images=cache"]), str(store), tmp_path / "run", live_dir=None, progress=False)
    assert summary.step == 1 and np.isfinite(summary.losses["distill"])
