"""A new user's path: build a cache, train on it, use the model from elsewhere (issue 17)."""

from __future__ import annotations

import shutil

import pytest

import cache_schema as cs
from pipeline.cache.identity import find_store
from pipeline.config import load_params
from pipeline.core.errors import InputError
from pipeline.teacher.run import run_teacher_cache
from pipeline.training.run import run_training
from tests.conftest import params_for, write_params

TINY_TRAIN = [
    "student.variant=zeroseg_micro", "train.batch_size=8", "train.micro_batch=4", "train.num_workers=0",
    "train.warmup_epochs=0", "train.epochs=1", "train.shuffle_buffer=8",
]


def test_train_without_cache_finds_the_store_teacher_cache_wrote_for_the_same_params(built_cache, demo_dir, tmp_path):
    store, params = built_cache
    # the DVC stage's store (cache.root/teacher.zarr) is found by its fingerprint
    assert find_store(load_params(params), progress=False) == str(store)

    # teacher-cache without --out writes cache.root/MODEL-FINGERPRINT.zarr; train finds that one
    mine = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches")
    stats = run_teacher_cache(load_params(mine), progress=False)
    assert stats.store.startswith(str(tmp_path / "caches" / "zeroseg-test-vit-"))
    assert find_store(load_params(mine), progress=False) == stats.store
    summary = run_training(load_params(mine, TINY_TRAIN), None, tmp_path / "run", progress=False)
    assert summary.step == 1


def test_train_refuses_a_store_built_from_other_images(built_cache, demo_dir, tmp_path):
    store, params = built_cache
    other = tmp_path / "other"
    shutil.copytree(demo_dir / "images", other)
    (sorted(other.iterdir())[0]).unlink()  # the user's own images: here, one fewer
    wrong = load_params(params, [*TINY_TRAIN, f"data.images={other}"])
    with pytest.raises(InputError, match=r"refusing to train on .*teacher.zarr: it was built from other images than data.images .*other \(store: 8 images.* 7 images"):
        run_training(wrong, str(store), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match=r"no teacher cache under .* for these params .*7 images of .*other.*1 store\(s\) there were built for other teachers or images: run `zeroseg teacher-cache`"):
        run_training(wrong, None, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_segment_leaves_annotation_folders_out_and_takes_globs(demo_dir, caplog):
    from pipeline.evaluation.segment import expand_images

    names = lambda found: sorted(name.as_posix() for _, name in found)  # noqa: E731
    images = names(expand_images([demo_dir / "eval"]))  # a VOC-style split: JPEGImages/ + SegmentationClass/
    assert len(images) == 4 and all(n.startswith("JPEGImages/") for n in images)
    assert "left out 4 files in annotation folders" in caplog.text and "SegmentationClass (4)" in caplog.text
    assert len(expand_images([demo_dir / "eval" / "SegmentationClass"])) == 4  # named as an input: segmented
    assert names(expand_images([demo_dir / "eval"], include_globs=["*0001*"])) == [n for n in images if "0001" in n]
    assert names(expand_images([demo_dir / "eval"], exclude_globs=["*0001*"])) == [n for n in images if "0001" not in n]
    with pytest.raises(InputError, match="outside annotation folders, matching --include/--exclude"):
        expand_images([demo_dir / "eval"], include_globs=["*.webp"])


def _teacher_with_weights_file(folder):
    """The tiny test teacher's weights saved as a local checkpoint file (what a user ships)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("zeroseg-test-vit")
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "teacher.pt")
    return folder / "teacher.pt"


def test_a_trained_model_is_used_from_anywhere_with_its_checkpoint_alone(demo_dir, tmp_path, monkeypatch):
    from tests.conftest import run_cli

    project = tmp_path / "project"
    _teacher_with_weights_file(project / "assets")
    monkeypatch.chdir(project)  # relative paths, as in the demo's params.yaml
    params = write_params(project / "params.yaml", demo_dir / "images", "caches", teacher={"pretrained": "assets/teacher.pt"},
                          eval={"bg_rule": "class", "window": 32, "stride": 32, "short_side": 64})
    run_teacher_cache(load_params(params), progress=False)
    run_training(load_params(params, TINY_TRAIN), None, project / "models" / "student", progress=False)

    # from another folder, no params file there: the checkpoint's own params and teacher record
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = sorted((demo_dir / "eval" / "JPEGImages").glob("*.jpg"))[0]
    args = ["segment", str(image), "--classes", "circle,square", "--out", "out", "-q"]
    proc = run_cli(*args, "--checkpoint", str(project / "models" / "student" / "checkpoint.pt"), cwd=elsewhere)
    assert (elsewhere / "out" / f"{image.stem}_overlay.png").is_file(), proc.stderr

    # the model folder and its teacher copied together to another machine: found beside it
    moved = tmp_path / "moved"
    shutil.copytree(project / "models", moved / "models")
    shutil.copytree(project / "assets", moved / "assets")
    shutil.rmtree(project)
    proc = run_cli(*args, "--checkpoint", str(moved / "models" / "student" / "checkpoint.pt"), cwd=elsewhere)
    assert proc.returncode == 0

    # without its teacher: one line naming the teacher it needs
    shutil.rmtree(moved / "assets")
    proc = run_cli(*args, "--checkpoint", str(moved / "models" / "student" / "checkpoint.pt"), cwd=elsewhere, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"needs its teacher zeroseg-test-vit (pretrained {cs.LOCAL_WEIGHTS!r}" in proc.stderr
    assert "set teacher.model and teacher.pretrained to where it is" in proc.stderr


def test_dvc_rewriting_params_yaml_leaves_it_as_it_is(tmp_path):
    """`dvc exp run -S` writes params.yaml back through DVC's YAML writer: it must change nothing
    but the value set (flow lists, quotes and comments as DVC writes them)."""
    from dvc.utils.serialize import modify_yaml

    from tests.conftest import REPO

    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    with modify_yaml(copy) as doc:
        doc["train"]["seed"] = doc["train"]["seed"]
    assert copy.read_text() == (REPO / "params.yaml").read_text()


def test_an_interrupted_train_says_whether_it_kept_a_checkpoint(built_cache, tmp_path):
    from pipeline.cli import interrupted
    from pipeline.training.state import SAVED

    store, params = built_cache
    SAVED.clear()  # a process that has written no checkpoint yet
    assert "before the first checkpoint" in interrupted(["train", "-q"]) and "kept" not in interrupted(["train"])
    run_training(load_params(params, TINY_TRAIN), str(store), tmp_path / "run", progress=False)
    said = interrupted(["train", "--out", str(tmp_path / "run")])
    assert f"the checkpoint of step 1 is kept ({tmp_path / 'run' / 'checkpoint.pt'})" in said and "--resume" in said


def test_a_failed_command_leaves_no_empty_output_folders(demo_dir, tmp_path, capsys):
    from pipeline.cli import main

    params = write_params(tmp_path / "params.yaml", demo_dir / "images", tmp_path / "caches", eval={"datasets": {"demo": str(demo_dir)}})
    out = tmp_path / "new"
    args = ["--params", str(params), "--checkpoint", str(tmp_path / "missing.pt"), "-q",
            "--metrics-dir", str(out / "metrics"), "--details-dir", str(out / "detail"), "--pictures", str(out / "pictures")]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", *args])
    assert exit_.value.code == 2 and "missing.pt" in capsys.readouterr().err
    assert not out.exists()  # made for the outputs, then taken back
    keep = tmp_path / "kept"
    (keep / "metrics").mkdir(parents=True)
    (keep / "metrics" / "old.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["evaluate", *args[:5], "--metrics-dir", str(keep / "metrics"), "--details-dir", str(keep / "detail"), "--pictures", str(keep / "p")])
    assert sorted(p.name for p in keep.iterdir()) == ["metrics"]  # a folder that was there stays


def test_cache_validate_applies_set_overrides_to_the_default_params(built_cache, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    store, params = built_cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # no params.yaml here: the overrides have nothing to apply to
        main(["cache", "validate", str(store), "--set", "teacher.seed=1"])
    assert exit_.value.code == 2 and "pass --params FILE too" in capsys.readouterr().err
    shutil.copy(params, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_:  # another random init: not the teacher the store was built with
        main(["cache", "validate", str(store), "--set", "teacher.seed=1"])
    assert exit_.value.code != 0 and "weights_sha256" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "validate", str(store), "--set", "teacher.seed=0"])
    assert exit_.value.code == 0 and "valid" in capsys.readouterr().out


def test_demo_teacher_refuses_to_write_over_a_teacher_before_training(tmp_path, capsys):
    from pipeline.cli import main

    held = tmp_path / "teacher"
    held.mkdir()
    (held / "open_clip_model.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit) as exit_:
        main(["demo-teacher", "--out", str(held), "--steps", "100000"])  # refused at once, not after the steps
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out {held} already holds open_clip_model.safetensors" in err and "--overwrite" in err
    assert (held / "open_clip_model.safetensors").read_bytes() == b"weights"


def test_teacher_names_get_a_suggestion_and_offline_hub_weights_fail_at_once(tmp_path, monkeypatch):
    from pipeline.clip.model import Teacher
    from pipeline.config import TeacherConfig

    with pytest.raises(InputError, match="'ViT-B-3' is not an open_clip model name.*did you mean ViT-B-32"):
        Teacher.load(TeacherConfig(model="ViT-B-3", pretrained="", device="cpu"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(InputError, match=r"the 'openai' weights of ViT-B-32 .* not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*local checkpoint file"):
        Teacher.load(TeacherConfig(model="ViT-B-32", pretrained="openai", device="cpu"))


def test_teacher_cache_and_segment_share_one_rule_for_unreadable_images(demo_dir, tmp_path, capsys):
    from pipeline.cli import main

    images = tmp_path / "images"
    shutil.copytree(demo_dir / "images", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    params = write_params(tmp_path / "params.yaml", images, tmp_path / "caches")
    args = ["teacher-cache", "--params", str(params), "-q"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    assert exit_.value.code == 0 and "the store has 1 failed rows" in out.out  # recorded, reported, not fatal
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--strict"])  # the same store, all done: still 1 unreadable image
    assert exit_.value.code == 1 and "1 images could not be read (--strict)" in capsys.readouterr().err


def test_every_store_array_names_its_dimensions_and_status_its_codes(built_cache):
    import zarr

    group = zarr.open_group(built_cache[0], mode="r")
    for name in ("status", "paths", "failures"):
        assert group[name].metadata.dimension_names == ("image",), name
    for g in (1, 2, 3, 4):
        assert group[cs.progress_array(g)].metadata.dimension_names == ("shard",)
        assert group[cs.views_array(g)].metadata.dimension_names == ("image", "view", "feature")
    assert group["status"].attrs["codes"] == {"0": "pending", "1": "ok", "2": "failed"}


def test_a_checkpoint_of_another_model_definition_is_not_continued(built_cache, tmp_path, caplog):
    """After a change of the code that defines the model (say a norm's eps), the DVC stage's
    --auto-resume must train afresh, not continue weights made for the old definition."""
    from pipeline.core.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.student import ZeroSegStudent, student_arch
    from pipeline.training.state import model_signature

    store, params = built_cache
    p = load_params(params, [*TINY_TRAIN, "train.epochs=2"])
    run_training(p, str(store), tmp_path / "run", progress=False)
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    micro = ZeroSegStudent(arch=student_arch("zeroseg_micro"), out_dim=32)
    assert ckpt["compat"]["model"] == model_signature(micro)
    micro.seg_head.norm.eps = 1e-6  # the same weights' shapes, another definition
    assert model_signature(micro) != ckpt["compat"]["model"]

    ckpt["compat"]["model"] = model_signature(micro)  # as if written by that other code
    save_checkpoint(ckpt_path, ckpt)
    with pytest.raises(InputError, match="made with other model; cannot resume"):
        run_training(p, str(store), tmp_path / "run", resume="must", progress=False)
    summary = run_training(p, str(store), tmp_path / "run", resume="auto", progress=False)
    assert summary.resumed_from is None and summary.step == 2 and "was made with other model: starting afresh" in caplog.text

    # a checkpoint written before the signature existed is taken as it is, with a warning
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["compat"]["model"]
    save_checkpoint(ckpt_path, ckpt)
    summary = run_training(p, str(store), tmp_path / "run", resume="auto", progress=False)
    assert summary.resumed_from == 2 and "predates the check of the model's definition" in caplog.text


def test_the_readmes_python_example_runs_as_written_and_is_zeroseg_segments_code_path(built_cache, demo_dir, tmp_path, monkeypatch):
    """The README's Python block, run verbatim in a project whose files sit where the demo's do:
    a path, a PIL image and an array give the same mask, and `zeroseg segment` writes that mask."""
    import re

    import numpy as np
    from PIL import Image

    from pipeline.evaluation.segmenter import Segmenter
    from tests.conftest import REPO, run_cli

    store, params_path = built_cache
    project = tmp_path / "project"
    run_training(params_for(built_cache, "train.epochs=1"), str(store), project / "models" / "student", progress=False)
    split = project / "data" / "demo_test" / "eval" / "JPEGImages"
    split.mkdir(parents=True)
    for image in sorted((demo_dir / "eval" / "JPEGImages").glob("*.jpg")):
        shutil.copy(image, split / image.name)
    shutil.copy(params_path, project / "params.yaml")
    monkeypatch.chdir(project)
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 6
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    assert (project / "overlay.png").is_file()

    seg = Segmenter.load("models/student/checkpoint.pt")
    path = split / "eval_000000.jpg"
    by_path = seg(path, ["circle", "square", "star"])
    assert by_path.mask.shape == np.asarray(Image.open(path)).shape[:2] and by_path.classes == ["circle", "square", "star"]
    assert set(np.unique(by_path.mask)) <= {0, 1, 2, 3}
    assert by_path.present == [by_path.classes[k - 1] for k in sorted(set(np.unique(by_path.mask)) - {0}, key=lambda k: -(by_path.mask == k).sum())]
    np.testing.assert_array_equal(seg(Image.open(path), "circle, square, star").mask, by_path.mask)  # a PIL image, the words as --classes takes them
    np.testing.assert_array_equal(seg(np.asarray(Image.open(path).convert("RGB")), ["circle", "square", "star"]).mask, by_path.mask)  # an array
    run_cli("segment", str(path), "--classes", "circle,square,star", "--out", "out", "-q", cwd=project)
    np.testing.assert_array_equal(np.asarray(Image.open(project / "out" / "eval_000000_mask.png")), by_path.mask)  # the command's mask, the same
    with pytest.raises(Exception, match="expected an \\[H, W, 3\\] uint8 array"):
        seg(np.zeros((4, 4, 4), np.uint8), ["circle"])
