"""Typed, strict configuration: each params.yaml section is a frozen dataclass.

Written by hand rather than with OmegaConf, dacite or pydantic because the contract asks for
what those give only in part, or only with a dependency: frozen dataclasses, `Literal`
choices, each field's admitted values beside it (`bounded`), and one-line errors that name
both the key and the file (`params.yaml: teacher.precision: expected one of fp32, bf16, fp16,
got 'fp64'`). Overrides use the syntax of `dvc exp run -S` (`--set teacher.model=ViT-B-16
--set cache.grids=[1,3]`), values parsed as YAML.
"""

from pipeline.config.loading import load_params, section_dict, threshold_problem
from pipeline.config.sections import (
    SECTIONS,
    CacheConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    Params,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS", "CacheConfig", "DataConfig", "EvalConfig", "LossConfig", "Params", "StudentConfig", "TeacherConfig",
    "TrainConfig", "load_params", "section_dict", "threshold_problem",
]
