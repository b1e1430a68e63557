"""Sharing teacher caches across teams: through a DVC remote, and from a read-only shared location."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import dvc, run_cli

import cache_schema as cs
import pipeline
from pipeline.cache.identity import default_store_url, identity_from_params
from pipeline.config import load_params
from pipeline.core.errors import InputError
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.data import CachePairs
from pipeline.training.run import data_root

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: (size, mtime in ns, sha256). Equal snapshots: nothing was written."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_team_b_pulls_team_as_cache_and_recomputes_nothing(project, tmp_path_factory):  # noqa: F811
    team_a, remote = project, tmp_path_factory.mktemp("dvc-remote")
    dvc(team_a, "remote", "add", "-d", "shared", str(remote))
    built = dvc(team_a, "repro", "teacher_cache")
    assert "6 images processed (564 views" in built  # team A ran the teacher: 30 crops and the 8x8 dense grid per image
    subprocess.run([*GIT, "add", "-A"], cwd=team_a, check=True)
    subprocess.run([*GIT, "commit", "-qm", "teacher cache"], cwd=team_a, check=True)
    dvc(team_a, "push")

    team_b = tmp_path_factory.mktemp("team-b") / "repo"
    subprocess.run(["git", "clone", "-q", str(team_a), str(team_b)], check=True)
    dvc(team_b, "pull", "--with-deps", "teacher_cache")  # the stage's outputs and its inputs
    store = team_b / "caches" / "teacher.zarr"
    pulled = snapshot(store)
    content = lambda snap: {name: (size, sha) for name, (size, _, sha) in snap.items()}  # noqa: E731
    assert content(pulled) == content(snapshot(team_a / "caches" / "teacher.zarr"))
    out = dvc(team_b, "repro", "teacher_cache")
    assert "Stage 'teacher_cache' didn't change, skipping" in out and "images processed" not in out
    # Even forced to run, the stage finds every shard of the pulled store done: no teacher forward.
    forced = dvc(team_b, "repro", "--force", "--single-item", "teacher_cache")
    assert "0 images processed (0 views" in forced and "0 shards written, 2 already done" in forced
    assert snapshot(store) == pulled
    assert "up to date" in dvc(team_b, "status", "--with-deps", "teacher_cache")
    assert subprocess.run(["git", "diff", "--quiet", "dvc.lock"], cwd=team_b).returncode == 0


def test_a_read_only_shared_cache_is_validated_then_used_without_writes(built_cache, demo_dir, tmp_path):
    local, params_file = built_cache
    shared = tmp_path / "shared"
    params = load_params(params_file, [f"cache.root={shared}"])
    identity = identity_from_params(params, progress=False)
    url = default_store_url(str(shared), identity)
    shutil.copytree(local, url)  # built elsewhere, published to the shared location
    subprocess.run(["chmod", "-R", "a-w", str(shared)], check=True)
    before = snapshot(shared)
    try:
        # Provenance: who built it, with which teacher, when, so a team can tell it is the one it wants.
        info = json.loads(run_cli("cache", "info", url, "--json").stdout)
        built_by = info["provenance"]
        assert built_by["tool"] == "zeroseg" and built_by["tool_version"] == pipeline.__version__ and built_by["host"] == socket.gethostname()
        age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(built_by["created"])
        assert datetime.timedelta(0) <= age < datetime.timedelta(hours=2)
        text = run_cli("cache", "info", url).stdout
        assert f"built by     zeroseg {pipeline.__version__} on {socket.gethostname()} ({built_by['user']}) at {built_by['created']}" in text
        assert "teacher      open_clip zeroseg-test-vit pretrained=(random init) precision=fp32 D=32" in text
        assert f"weights      sha256 {identity['teacher']['weights_sha256']}" in text

        # The team's params match: validation passes, stage one finds the store and has nothing to do.
        assert cs.validate(url, identity, (1, 2, 3, 4))["fingerprint"] == cs.fingerprint(identity)
        stats = run_teacher_cache(params, progress=False)
        assert stats.store == url and stats.complete and stats.views_computed == 0 and stats.shards_skipped == 2
        rows = sorted(row for _, _, row in CachePairs(url, data_root(params.data.images), (1, 2, 3, 4), 32))
        assert rows == list(range(8))

        # Another team: other weights, and a copy of the dataset with one image changed.
        theirs_dir = tmp_path / "their_images"
        shutil.copytree(demo_dir / "images", theirs_dir)
        (theirs_dir / "scene_000003.jpg").write_bytes((demo_dir / "images" / "scene_000004.jpg").read_bytes())
        theirs = load_params(params_file, [f"cache.root={shared}", "teacher.seed=3", f"data.images={theirs_dir}"])
        with pytest.raises(cs.CacheSchemaError) as refused:
            cs.validate(url, identity_from_params(theirs, progress=False), (1, 2, 3, 4))
        assert "teacher.weights_sha256: store has" in str(refused.value) and "manifest.hash: store has" in str(refused.value)
        check = run_cli("cache", "validate", url, "--params", str(params_file), "--set", "teacher.seed=3", check=False)
        assert check.returncode == 2 and len(check.stderr.strip().splitlines()) == 1
        assert "teacher.weights_sha256: store has" in check.stderr and "manifest" not in check.stderr
        if os.geteuid() != 0:  # root writes through chmod; anyone else is refused in one line
            with pytest.raises(InputError, match="cannot write there"):
                run_teacher_cache(theirs, progress=False)
        assert snapshot(shared) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(shared)], check=True)


def test_one_checkpoint_at_two_paths_is_one_teacher_and_old_path_keyed_stores_are_re_keyed(demo_dir, tmp_path, caplog, monkeypatch):
    from conftest import REPO, write_params

    team_a, team_b = tmp_path / "a" / "teacher", tmp_path / "b" / "elsewhere"
    for folder in (team_a, team_b):
        shutil.copytree(REPO / "assets" / "demo-teacher", folder)
    params = {who: write_params(tmp_path / f"{who}.yaml", demo_dir / "images", tmp_path / "caches",
                                teacher={"model": "zeroseg-demo-rn", "pretrained": str(folder), "precision": "fp32"}, cache={"grids": [1, 2]})
              for who, folder in (("a", team_a), ("b", team_b))}
    ids = {who: identity_from_params(load_params(p), progress=False) for who, p in params.items()}
    assert ids["a"] == ids["b"] and ids["a"]["teacher"]["pretrained"] == cs.LOCAL_WEIGHTS
    store = tmp_path / "shared.zarr"
    run_teacher_cache(load_params(params["a"]), str(store), progress=False)
    run_cli("cache", "validate", str(store), "--params", str(params["b"]))  # team B's path, same weights: valid

    # A store written before paths left the identity: its teacher section names the path.
    import zarr

    group = zarr.open_group(store, mode="r+")
    old_teacher = {**group.attrs["teacher"], "pretrained": str(team_a)}
    old = {**{k: group.attrs[k] for k in cs.IDENTITY_FIELDS}, "teacher": old_teacher}
    group.attrs.update(teacher=old_teacher, fingerprint=cs.fingerprint(old))
    # On a location it cannot write, it is used as it is (as root, chmod cannot make one here).
    import pipeline.cache.store as cache_store

    writable = cache_store.zarr.open_group

    def read_only(url, mode="r", **kw):
        if mode != "r":
            raise PermissionError(13, "Permission denied", str(url))
        return writable(url, mode=mode, **kw)

    monkeypatch.setattr(cache_store.zarr, "open_group", read_only)
    with caplog.at_level("WARNING", logger="pipeline.cache"):
        used = run_teacher_cache(load_params(params["b"]), str(store), progress=False)
    monkeypatch.undo()
    assert used.views_computed == 0 and "the same weights and config: used as it is (read-only, so not re-keyed)" in caplog.text
    assert zarr.open_group(store, mode="r").attrs["teacher"]["pretrained"] == str(team_a)
    with caplog.at_level("WARNING", logger="pipeline.cache"):
        again = run_teacher_cache(load_params(params["b"]), str(store), progress=False)
    assert again.views_computed == 0 and "re-keyed by its teacher's weights and config instead of their paths" in caplog.text
    assert cs.validate(str(store), ids["b"], (1, 2))["fingerprint"] == cs.fingerprint(ids["b"])
    # other weights are another teacher: never re-keyed
    group.attrs.update(teacher={**old_teacher, "weights_sha256": "0" * 64}, fingerprint="stale")
    with pytest.raises(InputError, match="holds a cache built for other params"):
        run_teacher_cache(load_params(params["b"]), str(store), progress=False)


def test_one_model_config_at_two_paths_is_one_teacher_and_old_config_keyed_stores_are_re_keyed(demo_dir, tmp_path, caplog):
    from conftest import REPO, write_params

    configs = [tmp_path / team / "zeroseg-test-vit.json" for team in ("a", "b")]
    for config in configs:
        config.parent.mkdir()
        shutil.copy(REPO / "pipeline" / "clip" / "model_configs" / "zeroseg-test-vit.json", config)
    params = [write_params(tmp_path / f"{c.parent.name}.yaml", demo_dir / "images", tmp_path / "caches", teacher={"model": str(c)}, cache={"grids": [1]})
              for c in configs]
    by_name = write_params(tmp_path / "name.yaml", demo_dir / "images", tmp_path / "caches", cache={"grids": [1]})  # teacher.model: zeroseg-test-vit
    ids = [identity_from_params(load_params(p), progress=False) for p in (*params, by_name)]
    assert ids[0] == ids[1] == ids[2] and ids[0]["teacher"]["model"] == "zeroseg-test-vit"
    store = tmp_path / "shared.zarr"
    run_teacher_cache(load_params(params[0]), str(store), progress=False)
    import zarr

    group = zarr.open_group(store, mode="r+")  # as written before: the config's path in the identity
    old_teacher = {**group.attrs["teacher"], "model": str(configs[0])}
    group.attrs.update(teacher=old_teacher, fingerprint=cs.fingerprint({**{k: group.attrs[k] for k in cs.IDENTITY_FIELDS}, "teacher": old_teacher}))
    with caplog.at_level("WARNING", logger="pipeline.cache"):
        again = run_teacher_cache(load_params(params[1]), str(store), progress=False)
    assert again.views_computed == 0 and f"instead of their paths ({configs[0]})" in caplog.text
    assert cs.validate(str(store), ids[1], (1,))["teacher"]["model"] == "zeroseg-test-vit"


def test_only_path_keyed_stores_are_re_keyed_never_tag_keyed_ones():
    from pipeline.cache.policy import _keyed_by_paths

    sections = {"preprocessing": {"size": 224}, "manifest": {"hash": "m", "n": 3}}
    teacher = {"library": "open_clip", "model": "ViT-B-32", "weights_sha256": "w", "precision": "bf16", "embed_dim": 512}
    now = {**sections, "teacher": {**teacher, "pretrained": cs.LOCAL_WEIGHTS}}

    def stored(**changes):
        return {"schema": cs.SCHEMA_NAME, **sections, "teacher": {**teacher, **changes}}

    assert _keyed_by_paths(stored(pretrained="/ckpt/vit-b-32.pt"), now)
    assert not _keyed_by_paths(stored(pretrained="openai"), now)  # a tag: its users share that key
    assert not _keyed_by_paths(stored(pretrained=""), now)  # a random init is another teacher
    assert not _keyed_by_paths(stored(pretrained="/ckpt/vit-b-32.pt", weights_sha256="x"), now)
    assert not _keyed_by_paths({**stored(pretrained="/ckpt/vit-b-32.pt"), "manifest": {"hash": "other", "n": 3}}, now)
    assert not _keyed_by_paths(stored(pretrained=cs.LOCAL_WEIGHTS), now)  # the same key: nothing to re-key
    # a model config's or local-dir model's path
    assert _keyed_by_paths(stored(model="/cfgs/ViT-B-32.json", pretrained="/ckpt/vit-b-32.pt"), now)
    random_init = {**sections, "teacher": {**teacher, "pretrained": ""}}
    assert _keyed_by_paths(stored(model="/cfgs/ViT-B-32.json", pretrained=""), random_init)
    assert not _keyed_by_paths(stored(model="/cfgs/ViT-B-16.json", pretrained=""), random_init)
    assert _keyed_by_paths(stored(model="local-dir:/teachers/b32", pretrained=cs.LOCAL_WEIGHTS), {**now, "teacher": {**now["teacher"], "model": "local-dir"}})


def test_a_tag_wins_over_a_file_of_the_same_name_as_in_open_clip(tmp_path, monkeypatch):
    from pipeline.clip.model import weights_are_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").write_text("not a checkpoint")
    (tmp_path / "mine.pt").write_text("a checkpoint")
    assert not weights_are_local("ViT-B-32", "openai")  # open_clip downloads the tag, not this file
    assert weights_are_local("ViT-B-32", "mine.pt")
    assert not weights_are_local("ViT-B-32", "")
