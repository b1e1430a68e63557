from pathlib import Path

import pytest

from pipeline.config import CacheConfig, load_params
from pipeline.core.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_sections_are_frozen_dataclasses_with_defaults(tmp_path):
    params = load_params(write(tmp_path, "teacher:\n  model: ViT-B-16\ncache:\n  grids: [1, 3]\n"))
    assert params.teacher.model == "ViT-B-16"
    assert params.teacher.precision == "bf16"  # default kept
    assert params.cache.grids == (1, 3)
    with pytest.raises(AttributeError):
        params.teacher.model = "x"  # frozen


def test_overrides_use_dvc_exp_run_syntax(tmp_path):
    params = load_params(write(tmp_path, "teacher:\n  model: ViT-B-16\n"), ["teacher.model=ViT-L-14", "cache.grids=[1,2]", "teacher.batch_size=8"])
    assert (params.teacher.model, params.cache.grids, params.teacher.batch_size) == ("ViT-L-14", (1, 2), 8)
    # YAML 1.2 floats without a dot (what dvc exp run -S writes), in a file and in --set
    params = load_params(write(tmp_path, "train:\n  min_lr: 1e-6\n"), ["train.base_lr=2e-3"])
    assert (params.train.min_lr, params.train.base_lr) == (1e-6, 2e-3)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("teacher:\n  modle: x\n", [], "params.yaml: unknown key teacher.modle"),
        ("teachers:\n  model: x\n", [], "params.yaml: unknown section 'teachers'"),
        ("teacher:\n  precision: fp64\n", [], "teacher.precision: expected one of fp32, bf16, fp16, pure_bf16, got 'fp64'"),
        ("teacher:\n  batch_size: many\n", [], "teacher.batch_size: expected int, got 'many'"),
        ("train:\n  base_lr: fast\n", [], "train.base_lr: expected float, got 'fast'"),
        ("cache:\n  grids: 4\n", [], "cache.grids: expected a list"),
        ("teacher:\n  batch_size: true\n", [], "teacher.batch_size: expected int"),
        ("teacher: {}\n", ["teacher=1"], "expected SECTION.KEY=VALUE"),
        ("teacher: {}\n", ["teacher.nope=1"], "unknown key teacher.nope"),
        ("[1, 2]\n", [], "expected a mapping of sections"),
        ("", [], "params.yaml: the params file is empty"),
        ("teacher:\n  model: a\nteacher:\n  model: b\n", [], "key 'teacher' appears twice (3:1)"),
        ("teacher:\n  model: a\n  model: b\n", [], "key 'model' appears twice (3:3)"),
        ("teacher: {}\n", ["cache.grids=[1,3"], "--set 'cache.grids=[1,3': the value is not valid YAML"),
        # values of the right type outside their range
        ("teacher:\n  batch_size: 0\n", [], "params.yaml: teacher.batch_size: expected at least 1, got 0"),
        ("teacher: {}\n", ["student.mask_ratio=1.0"], "student.mask_ratio: expected at least 0 and below 1, got 1.0"),
        ("teacher: {}\n", ["loss.grids=[]"], "loss.grids: expected at least one value, got []"),
        ("teacher: {}\n", ["loss.grids=[1,0]"], "loss.grids: each value must be at least 1 and at most 64, got 0"),
        ("teacher: {}\n", ["cache.codec_level=99"], "cache.codec_level: blosc-zstd takes at least 0 and at most 9, got 99"),
        ("teacher: {}\n", ["cache.codec=zstd", "cache.codec_level=22"], None),
        ("teacher: {}\n", ["cache.chunk_rows=64", "cache.shard_rows=96"], "--set: cache.shard_rows (96) must be a multiple of cache.chunk_rows (64)"),
        ("cache:\n  shard_rows: 96\n", [], "params.yaml: cache.shard_rows (96) must be a multiple of cache.chunk_rows (64)"),
        ("teacher: {}\n", ["teacher.batch_size=0"], "--set: teacher.batch_size: expected at least 1, got 0"),  # blamed on what set it
        ("teacher: {}\n", ["cache.chunk_rows=96"], "--set: cache.shard_rows (1024) must be a multiple of cache.chunk_rows (96)"),  # either key
        ("teacher: {}\n", ["teacher.batch_size=x"], "--set: teacher.batch_size: expected int"),
        ("teacher: {}\n", ["eval.window=64", "eval.stride=65"], "eval.stride (65) must not exceed eval.window (64)"),
        ("teacher: {}\n", ["eval.bg_rule=probability", "eval.bg_threshold.demo=5"], "--set: eval.bg_threshold.demo: a probability threshold lies in [0, 1], got 5.0"),
        ("teacher: {}\n", ["eval.bg_rule=cosine", "eval.bg_threshold.demo=-0.2"], None),
        ("teacher: {}\n", ["train.micro_batch=0"], "train.micro_batch: expected at least 1, got 0"),
        ("teacher: {}\n", ["train.base_lr=-1"], "train.base_lr: expected at least 0, got -1.0"),
        ("teacher: {}\n", ["eval.stride=0"], "eval.stride: expected at least 1, got 0"),
        ("teacher: {}\n", ["loss.region_grids=[]", "train.epochs=1"], None),
        ("teacher: {}\n", ["cache.codec=zstd", "cache.codec_level=-5"], None),  # zstd's fast levels
        ("base: &b {epochs: 3, seed: 1}\n", [], "unknown section 'base'"),  # anchors parse; the section is still unknown
        ("train:\n  <<: {epochs: 3, seed: 1}\n  seed: 2\n", [], None),  # a merge key, one of its keys overridden
        ("train:\n  ? [a, b]\n  : 1\n", [], "params.yaml: not valid YAML"),  # an unhashable key: YAML's own error
    ],
)
def test_bad_keys_and_types_are_one_line_errors_naming_key_and_file(tmp_path, text, overrides, message):
    if message is None:  # the edge of a range, accepted
        load_params(write(tmp_path, text), overrides)
        return
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, text), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the params file \(\[Errno 21\] Is a directory"):
        load_params(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"teacher:\n  model: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin1.yaml: cannot read the params file .'utf-8' codec can't decode"):
        load_params(tmp_path / "latin1.yaml")


def test_repo_params_yaml_loads():
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert isinstance(params.cache, CacheConfig)


def test_the_papers_setup_is_a_complete_params_file_equal_to_the_code_defaults_but_its_data_paths():
    """paper/params.yaml (`dvc repro paper/dvc.yaml`) holds every key of every section, and every
    value is the code's default except where the data live; params.yaml is the demo's."""
    import dataclasses

    import yaml

    from pipeline.config import Params
    from pipeline.config.sections import SECTIONS

    path = Path(__file__).resolve().parents[2] / "paper" / "params.yaml"
    paper, defaults = load_params(path), Params()
    raw = yaml.safe_load(path.read_text())
    for name, section in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(section)}, name  # complete: every key written out
    data_paths = {"data": {"images"}, "cache": {"root"}, "eval": {"datasets"}}
    for name in SECTIONS:
        ours, default = getattr(paper, name), getattr(defaults, name)
        paths = {k: getattr(default, k) for k in data_paths.get(name, ())}
        assert dataclasses.replace(ours, **paths) == default, name
    assert paper.teacher.model == "ViT-L-14" and paper.teacher.pretrained == "openai"
    assert paper.cache.grids == (1, 2, 3, 4) and paper.cache.dense_grids == ()
    assert paper.student.variant == "zeroseg_vit_b16" and paper.train.epochs == 80 and paper.train.batch_size == 4096
    assert set(paper.eval.datasets) == {"voc", "context", "coco_object"} and paper.eval.bg_rule == "probability"
