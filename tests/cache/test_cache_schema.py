import copy
import shutil

import pytest
import zarr
from conftest import run_cli

import cache_schema as cs
from pipeline.cache.identity import identity_from_params
from pipeline.config import load_params


@pytest.fixture(scope="module")
def expected(built_cache):
    _, params = built_cache
    return identity_from_params(load_params(params), progress=False)


def test_store_validates_against_its_own_params(built_cache, expected):
    store, _ = built_cache
    attrs = cs.validate(store, expected, grids=(1, 2, 3, 4))
    assert attrs["fingerprint"] == cs.fingerprint(expected)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("teacher", "model", "ViT-B-16", "teacher.model: store has \"zeroseg-test-vit\", expected \"ViT-B-16\""),
        ("teacher", "weights_sha256", "0" * 64, "teacher.weights_sha256: store has"),
        ("teacher", "precision", "bf16", "teacher.precision"),
        ("preprocessing", "mean", [0.5, 0.5, 0.5], "preprocessing.mean"),
        ("preprocessing", "interpolation", "bilinear", "preprocessing.interpolation"),
        ("manifest", "hash", "f" * 64, "manifest.hash"),
        ("manifest", "n", 9, "manifest.n: store has 8, expected 9"),
    ],
)
def test_validate_names_the_field_that_differs(built_cache, expected, section, key, value, message):
    store, _ = built_cache
    other = copy.deepcopy(expected)
    other[section][key] = value
    with pytest.raises(cs.CacheSchemaError) as info:
        cs.validate(store, other)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_catches_missing_grids(built_cache):
    store, _ = built_cache
    with pytest.raises(cs.CacheSchemaError, match="views: store lacks grids 5x5"):
        cs.validate(store, grids=(1, 5))


@pytest.fixture
def store_copy(built_cache, tmp_path):
    store, _ = built_cache
    dst = tmp_path / "copy.zarr"
    shutil.copytree(store, dst)
    return dst


def test_validate_catches_version_tampering_and_incomplete_stores(store_copy):
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["schema_version"] = 2
    with pytest.raises(cs.CacheSchemaError, match="version: store has 2, this code reads 1"):
        cs.validate(store_copy)
    group.attrs["schema_version"] = 1
    teacher = dict(group.attrs["teacher"], pretrained="openai")
    group.attrs["teacher"] = teacher
    with pytest.raises(cs.CacheSchemaError, match="fingerprint: does not match"):
        cs.validate(store_copy)


def test_validate_catches_an_unfinished_store(store_copy):
    group = zarr.open_group(store_copy, mode="r+")
    group["views/3x3"].attrs["complete"] = False
    group.attrs["complete"] = False
    with pytest.raises(cs.CacheSchemaError, match="views/3x3: incomplete"):
        cs.validate(store_copy)
    cs.validate(store_copy, grids=(1, 2))  # the grids a reader needs are complete


def test_cli_validate_exit_codes(built_cache, store_copy, tmp_path):
    store, params = built_cache
    ok = run_cli("cache", "validate", str(store), "--params", str(params))
    assert "valid (8 images" in ok.stdout
    bad = run_cli("cache", "validate", str(store), "--params", str(params), "--set", "teacher.seed=5", check=False)
    assert bad.returncode == 2 and "teacher.weights_sha256: store has" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("cache", "validate", str(tmp_path / "nothing.zarr"), check=False)
    assert missing.returncode == 2 and "not a zarr group" in missing.stderr


def test_deep_validation_reads_every_row_and_finds_damaged_data(store_copy):
    read = []
    cs.validate(store_copy, deep=True, on_rows=read.append)
    assert sum(read) == 4 * 8  # every row of the four views arrays
    group = zarr.open_group(store_copy, mode="r+")
    views = group["views/2x2"]
    values = views[:]  # [8, 4, D]; 4 rows per shard
    values[5, 2, 7] = float("nan")  # an ok row with a hole: metadata still says valid
    views[:] = values
    cs.validate(store_copy)
    with pytest.raises(cs.CacheSchemaError, match=r"views/2x2 shard 1 \(rows 4-7\): row 5 disagrees with its status \(1 such rows\)"):
        cs.validate(store_copy, deep=True)
    shard = next(p for p in (store_copy / "views" / "3x3" / "c").rglob("*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated shard file
    cs.validate(store_copy, grids=(3,))
    damaged = run_cli("cache", "validate", str(store_copy), "--deep", "-q", check=False)
    assert damaged.returncode == 2 and "damaged: views/3x3 shard " in damaged.stdout and "damaged: views/2x2 shard 1" in damaged.stdout
    assert damaged.stderr.strip().endswith("2 damaged shards (listed above); zeroseg teacher-cache --repair recomputes exactly these")
    assert "Traceback" not in damaged.stderr
