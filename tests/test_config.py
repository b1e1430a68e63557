from pathlib import Path

import pytest

from pipeline.config import CacheConfig, load_params
from pipeline.errors import ConfigError


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


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("teacher:\n  modle: x\n", [], "params.yaml: unknown key teacher.modle"),
        ("teachers:\n  model: x\n", [], "params.yaml: unknown section 'teachers'"),
        ("teacher:\n  precision: fp64\n", [], "teacher.precision: expected one of fp32, bf16, fp16, pure_bf16, got 'fp64'"),
        ("teacher:\n  batch_size: many\n", [], "teacher.batch_size: expected int, got 'many'"),
        ("cache:\n  grids: 4\n", [], "cache.grids: expected a list"),
        ("teacher:\n  batch_size: true\n", [], "teacher.batch_size: expected int"),
        ("", ["teacher=1"], "expected SECTION.KEY=VALUE"),
        ("", ["teacher.nope=1"], "unknown key teacher.nope"),
        ("[1, 2]\n", [], "expected a mapping of sections"),
    ],
)
def test_bad_keys_and_types_are_one_line_errors_naming_key_and_file(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, text), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_repo_params_yaml_loads():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert isinstance(params.cache, CacheConfig)
