"""A cache's bytes over its life: chunk checksums, every damaged shard found, exactly those
repaired to the bytes of an undamaged build, stage two refusing damage, two writers at once."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO, TINY_TRAIN, run_cli, write_params

import cache_schema as cs
from pipeline.cache import codecs as cache_codecs
from pipeline.cache.info import describe
from pipeline.config import load_params
from pipeline.core.errors import ConfigError, InputError
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.run import run_training


@pytest.fixture(scope="module")
def imaged(tmp_path_factory, demo_dir) -> tuple[Path, Path]:
    """(store, params) of a complete 8-row cache, 2 shards of 4 rows, with 32-px student images."""
    tmp = tmp_path_factory.mktemp("imaged")
    params = write_params(tmp / "params.yaml", demo_dir / "images", tmp / "caches", cache={"student_image_size": 32, "shard_rows": 4, "chunk_rows": 2})
    store = tmp / "teacher.zarr"
    run_teacher_cache(load_params(params), str(store), progress=False)
    return store, params


def files(root: Path) -> dict[str, str]:
    """Every file of a store: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def flip(data: bytes, at: int = 20) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def damage_four_ways(store: Path) -> list[str]:
    """A flipped bit, a truncated shard, a deleted shard and a flipped per-row chunk; the report expected."""
    views22 = store / "views/2x2/c/1/0/0"
    views22.write_bytes(flip(views22.read_bytes()))  # still decodes as blosc: only the checksum sees it
    views33 = store / "views/3x3/c/0/0/0"
    views33.write_bytes(views33.read_bytes()[: views33.stat().st_size // 2])
    (store / "images/32/c/1/0/0/0").unlink()
    status = store / "status/c/0"
    status.write_bytes(flip(status.read_bytes(), at=5))
    return [
        "status shard 0 (rows 0-3): checksum mismatch (its bytes changed after writing)",
        "views/2x2 shard 1 (rows 4-7): checksum mismatch (its bytes changed after writing)",
        "views/3x3 shard 0 (rows 0-3): checksum mismatch (its bytes changed after writing)",
        "images/32 shard 1 (rows 4-7): every ok row is all zeros (shard missing)",
    ]


def test_new_stores_checksum_every_chunk_and_older_ones_are_said_to_lack_them(imaged, demo_dir, tmp_path, monkeypatch):
    store, params = imaged
    group = zarr.open_group(store, mode="r")
    for name in ["status", "failures", "paths", "views/1x1", "views/4x4", "images/32"]:
        assert cs.chunk_checksums(group[name]), name
    info = describe(str(store))
    assert set(info["chunk_checksums"].values()) == {True} and len(info["chunk_checksums"]) == 8
    assert "checksums    crc32c on every chunk" in run_cli("cache", "info", str(store)).stdout
    # A store written before chunk checksums (the codecs of that time) is read as it is, and said so.
    monkeypatch.setattr(cache_codecs, "checksum", lambda: zarr.codecs.ZstdCodec(level=0))
    old = tmp_path / "old.zarr"
    run_teacher_cache(load_params(params), str(old), progress=False)
    assert not any(describe(str(old))["chunk_checksums"].values())
    assert cs.find_damage(str(old)) == []
    assert "checksums    none (written before chunk checksums" in run_cli("cache", "info", str(old)).stdout
    # Without checksums, views that disagree with their status may be a flipped status byte as well:
    # the repair recomputes the whole shard, and the store is again what it was.
    built = files(old)
    views = zarr.open_group(old, mode="r+")["views/2x2"]
    values = views[:]
    values[5] = np.nan
    views[:] = values
    (damage,) = cs.find_damage(str(old))
    assert str(damage) == "views/2x2 shard 1 (rows 4-7): row 5 disagrees with its status (1 such rows)" and damage.shard_wide
    stats = run_teacher_cache(load_params(params), str(old), repair=True, progress=False)
    assert stats.views_computed == 4 * 30 and files(old) == built


def test_deep_validation_names_every_damaged_shard_and_repair_restores_exactly_those(imaged, tmp_path):
    store, params = imaged
    built = files(store)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    expected = damage_four_ways(copy)
    assert [str(d) for d in cs.find_damage(str(copy))] == expected
    report = run_cli("cache", "validate", str(copy), "--deep", "-q", check=False)
    assert report.returncode == 2 and report.stdout.splitlines() == [f"damaged: {line}" for line in expected]
    assert report.stderr.strip() == f"zeroseg: error: {copy}: 4 damaged shards (listed above); zeroseg teacher-cache --repair recomputes exactly these"
    before = {k: v for k, v in files(copy).items()}
    repaired = run_cli("teacher-cache", "--params", str(params), "--out", str(copy), "--repair", "-q")
    assert [line for line in repaired.stdout.splitlines() if line.startswith("repaired: ")] == [f"repaired: {line}" for line in expected]
    # Two shards recomputed (every grid, as a build computes them: 4 rows x 30 views each), two written.
    assert "8 images processed (240 views" in repaired.stdout and "2 shards written, 0 already done" in repaired.stdout
    after = files(copy)
    assert after == built  # byte for byte the undamaged build
    untouched = [k for k in built if "/c/" in k and before.get(k) == built[k]]
    assert "views/1x1/c/0/0/0" in untouched and "views/4x4/c/1/0/0" in untouched
    cs.validate(str(copy), deep=True)
    again = run_cli("teacher-cache", "--params", str(params), "--out", str(copy), "--repair", "-q")
    assert "0 images processed" in again.stdout and "repaired:" not in again.stdout
    # The paths are the manifest's: a damaged chunk of them is rewritten from it, no teacher runs.
    paths = copy / "paths/c/0"
    paths.write_bytes(flip(paths.read_bytes(), at=8))
    assert [str(d) for d in cs.find_damage(str(copy))] == ["paths shard 0 (rows 0-7): does not decode (ValueError)"]
    stats = run_teacher_cache(load_params(params), str(copy), repair=True, progress=False)
    assert stats.views_computed == 0 and files(copy) == built
    paths.unlink()  # a chunk its writer never wrote (stopped while creating the store): every path reads as ""
    assert [str(d) for d in cs.find_damage(str(copy))] == ["paths shard 0 (rows 0-7): 8 empty paths (chunk missing)"]
    run_teacher_cache(load_params(params), str(copy), repair=True, progress=False)
    assert files(copy) == built
    # Damaged images of a size the params do not ask for: nothing would recompute them, so refused before any write.
    images = copy / "images/32/c/0/0/0/0"
    images.write_bytes(flip(images.read_bytes()))
    before = files(copy)
    with pytest.raises(ConfigError, match=r"student images at 32 px, but cache.student_image_size is 0: rerun with --set cache.student_image_size=32"):
        run_teacher_cache(load_params(params, ["cache.student_image_size=0"]), str(copy), repair=True, progress=False)
    assert files(copy) == before


def test_a_read_only_store_is_reported_and_never_written(imaged, tmp_path, monkeypatch):
    store, params = imaged
    copy = tmp_path / "shared.zarr"
    shutil.copytree(store, copy)
    expected = damage_four_ways(copy)
    before = files(copy)
    writable = zarr.open_group

    def read_only(url, mode="r", **kw):  # as root, chmod cannot make a location read-only here
        if mode != "r":
            raise PermissionError(13, "Permission denied", str(url))
        return writable(url, mode=mode, **kw)

    monkeypatch.setattr(zarr, "open_group", read_only)
    with pytest.raises(InputError, match="4 damaged shards") as info:
        run_teacher_cache(load_params(params), str(copy), repair=True, progress=False)
    message = str(info.value)
    assert all(line in message for line in expected) and "cannot write there (Permission denied): a read-only store is reported, never repaired" in message
    assert "\n" not in message and files(copy) == before


def test_training_refuses_a_damaged_shard_in_one_line_and_keeps_the_last_checkpoint(imaged, tmp_path):
    store, params = imaged
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    train = load_params(params, [*TINY_TRAIN, "train.epochs=1", "train.num_workers=1", "train.images=cache"])
    run = tmp_path / "run"
    run_training(train, str(copy), run, live_dir=None, progress=False)
    kept = (run / "checkpoint.pt").read_bytes()
    views = copy / "views/1x1/c/1/0/0"
    views.write_bytes(flip(views.read_bytes()))
    with pytest.raises(InputError) as info:
        run_training(train, str(copy), run, live_dir=None, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{copy}: views/1x1 rows ") and "(shard 1) do not decode (checksum mismatch)" in message
    assert "zeroseg teacher-cache --repair" in message
    assert (run / "checkpoint.pt").read_bytes() == kept
    # A deleted shard reads as its fill value (NaN): refused too, before any loss sees it.
    views.unlink()
    with pytest.raises(InputError, match=r"row [4-7] \(shard 1\) is ok but its teacher views are missing"):
        run_training(train, str(copy), run, live_dir=None, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == kept


def test_damage_in_s3_objects_is_found_and_repaired_to_identical_bytes(s3, imaged):  # noqa: F811
    import s3fs

    store, params = imaged
    fs = s3fs.S3FileSystem()
    url = f"{s3}/integrity/teacher.zarr"
    fs.put(str(store), url.removeprefix("s3://"), recursive=True)
    key = url.removeprefix("s3://")
    built = {p: fs.cat_file(p) for p in fs.find(key)}
    fs.pipe_file(f"{key}/views/4x4/c/0/0/0", flip(built[f"{key}/views/4x4/c/0/0/0"]))
    fs.rm_file(f"{key}/views/1x1/c/1/0/0")
    damage = [str(d) for d in cs.find_damage(url)]
    assert damage == ["views/1x1 shard 1 (rows 4-7): row 4 disagrees with its status (4 such rows)",
                      "views/4x4 shard 0 (rows 0-3): checksum mismatch (its bytes changed after writing)"]
    stats = run_teacher_cache(load_params(params), url, repair=True, progress=False)
    assert stats.repaired == damage and stats.shards_written == 2 and stats.complete
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in fs.find(key)} == built


def two_writers(params: Path, out: str) -> list[subprocess.CompletedProcess]:
    """`zeroseg teacher-cache` twice at once on one store, as two machines launched together would."""
    command = [sys.executable, "-m", "pipeline.cli", "teacher-cache", "--params", str(params), "--out", out, "-q"]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for proc in done:
        assert proc.returncode == 0, proc.stderr
        assert "INCOMPLETE" not in proc.stdout
    return done


def shards_written(proc: subprocess.CompletedProcess) -> int:
    return int(re.search(r"(\d+) shards written", proc.stdout).group(1))


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> tuple[Path, Path]:
    """(params, a one-writer build) of 24 slow-decoding images in 12 shards: two writers overlap."""
    from helpers import write_slow_images

    tmp = tmp_path_factory.mktemp("slow")
    write_slow_images(tmp / "imgs")
    params = write_params(tmp / "params.yaml", tmp / "imgs", tmp / "caches", teacher={"batch_size": 2, "decode_workers": 1},
                          cache={"shard_rows": 2, "chunk_rows": 2, "student_image_size": 32})
    single = tmp / "single.zarr"
    run_teacher_cache(load_params(params), str(single), progress=False)
    return params, single


@pytest.mark.slow
def test_two_writers_at_once_end_with_the_one_writers_bytes(slow, tmp_path):
    params, single = slow
    out = tmp_path / "both.zarr"
    both = two_writers(params, str(out))
    # Each took the shards in its own order and skipped what the other had finished.
    assert 12 <= sum(map(shards_written, both)) < 24
    cs.validate(str(out), deep=True)
    assert files(out) == files(single) | {"zarr.json": files(out)["zarr.json"]}  # the group's provenance says when it was created
    strip = lambda group: {k: v for k, v in group.attrs.items() if k != "provenance"}  # noqa: E731
    assert strip(zarr.open_group(out, mode="r")) == strip(zarr.open_group(single, mode="r"))


@pytest.mark.slow
def test_two_writers_at_once_on_s3(s3, slow):  # noqa: F811
    from pipeline.cache.reader import load_targets

    params, single = slow
    url = f"{s3}/two/teacher.zarr"
    both = two_writers(params, url)
    assert 12 <= sum(map(shards_written, both)) < 24
    cs.validate(url, deep=True)
    np.testing.assert_array_equal(load_targets(url, [1, 2, 3, 4]).view(np.uint16), load_targets(str(single), [1, 2, 3, 4]).view(np.uint16))
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["images/32"][:], zarr.open_group(single, mode="r")["images/32"][:])


def test_a_store_another_writer_is_still_creating_is_joined_not_refused(built_cache, tmp_path):
    """Two writers launched together: the second may look while the first has made the folder
    but not yet finished the group's metadata. It waits for it and joins the store; a folder
    holding anything else is still refused at once."""
    import json
    import os
    import threading
    import time

    from pipeline.cache.policy import open_or_create

    store, params_path = built_cache
    cfg = load_params(params_path).cache
    built = zarr.open_group(store, mode="r")
    identity = {k: built.attrs[k] for k in cs.IDENTITY_FIELDS}
    paths = [str(p) for p in built[cs.PATHS][:]]
    target = tmp_path / "creating.zarr"
    target.mkdir()
    created = json.loads((store / "zarr.json").read_text())  # the group as a writer creates it: nothing done yet
    created["attributes"].update(complete=False, grids=[], image_sizes=[])
    metadata = json.dumps(created).encode()
    partial = target / "zarr.0123abcd.partial"  # zarr's local store writes a temporary file, then renames it
    partial.write_bytes(metadata[: len(metadata) // 2])  # the first writer, midway through it

    def finish() -> None:
        time.sleep(0.5)
        partial.write_bytes(metadata)
        os.replace(partial, target / "zarr.json")

    other = threading.Thread(target=finish)
    other.start()
    joined = open_or_create(str(target), identity, paths, (1, 2, 3, 4), cfg)
    other.join()
    assert joined.group.attrs["fingerprint"] == built.attrs["fingerprint"] == cs.fingerprint(identity)
    assert list(joined.group[cs.PATHS][:]) == paths  # the row arrays the first writer had not added yet
    # The same moment seen from creation: the folder looked absent, and by the time this writer
    # creates the group the other's temporary file is there (zarr refuses with FileExistsError).
    from pipeline.cache.store import CacheStore

    second = tmp_path / "creating2.zarr"
    second.mkdir()
    partial = second / "zarr.4567cdef.partial"
    partial.write_bytes(metadata[: len(metadata) // 2])
    other = threading.Thread(target=lambda: (time.sleep(0.5), partial.write_bytes(metadata), os.replace(partial, second / "zarr.json")))
    other.start()
    created = CacheStore._create(str(second), identity, cs.fingerprint(identity), paths, cfg)
    other.join()
    assert created.group.attrs["fingerprint"] == built.attrs["fingerprint"] and list(created.group[cs.PATHS][:]) == paths
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a zeroseg teacher cache"):
        open_or_create(str(foreign), identity, paths, (1, 2, 3, 4), cfg)
