"""Typed, strict configuration: each params.yaml section is a frozen dataclass.

Written by hand (about a hundred lines) rather than with OmegaConf or dacite because the
contract asks for three things those give only in part: frozen dataclasses, `Literal`
choices, and one-line errors that name both the key and the file (`params.yaml: teacher.precision:
expected one of fp32, bf16, fp16, got 'fp64'`). Overrides use the syntax of `dvc exp run -S`
(`--set teacher.model=ViT-B-16 --set cache.grids=[1,3]`), values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the training images are and how their manifest is hashed."""

    images: str = "data/demo/images"  # a folder (searched recursively), a text file of paths, or tar shards (pipeline/tars.py)
    # content: sha256 of every file's bytes (portable across machines, memoized locally);
    # stat: path + size + mtime (instant, but differs on every copy of the dataset).
    manifest_hash: Literal["content", "stat"] = "content"
    max_pixels: int = 178_956_970  # larger images are refused as decompression bombs (PIL's limit)
    min_side: int = 16  # smaller center squares are refused; must be >= the largest grid
    # The built-in synthetic scenes (`zeroseg demo-data`), used when `images` points at them.
    demo_train: int = 512
    demo_eval: int = 64
    demo_size: int = 128
    demo_seed: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    """The CLIP teacher of stage one: any open_clip model."""

    model: str = "ViT-L-14"  # open_clip model name, or a path to an open_clip model-config JSON
    pretrained: str = "openai"  # pretrained tag, local checkpoint file, or "" (random init)
    # bf16, fp16: autocast in that dtype on the teacher's device; pure_bf16: the image tower's weights
    # and activations in bf16 on any device (open_clip's name). Part of the cache identity.
    precision: Literal["fp32", "bf16", "fp16", "pure_bf16"] = "bf16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64  # images per teacher batch; each image gives V views
    executor: Literal["local", "dask"] = "local"
    dask_address: str = ""  # a dask scheduler address; "": start a local cluster
    dask_workers: int = 2  # workers of that local cluster (one per GPU when there are GPUs)
    decode_workers: int = 0  # threads decoding images; 0: one per CPU core
    # 0: off. Otherwise large JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as the
    # center square keeps this side; at least largest grid x input size (896 for 4x4 at 224).
    # Part of the cache identity when on.
    jpeg_draft_side: int = 0
    views_per_forward: int = 0  # views per teacher forward; 0: 64 on CPU (cache-friendly), 4096 on GPU
    compile: bool = False  # torch.compile the image encoder (not part of the identity: same values within float rounding)
    seed: int = 0  # seeds random initialisation when pretrained is ""
    weights_dir: str = ""  # where open_clip keeps downloaded weights ("": its default)


@dataclass(frozen=True)
class CacheConfig:
    """Layout of the teacher cache (not part of its identity)."""

    root: str = "caches"  # a directory or an fsspec URL
    grids: tuple[int, ...] = (1, 2, 3, 4)
    chunk_rows: int = 64  # images per chunk: the unit of a training-time read
    shard_rows: int = 1024  # images per shard: the unit of a write and of resume
    codec: Literal["zstd", "blosc-zstd", "none"] = "blosc-zstd"  # chosen by bench/codec_bench.py
    codec_level: int = 3
    # 0: off. Else stage one also stores every image's center square resized to this side (set it
    # to the student's input size), uint8, lossless, so stage two reads it instead of decoding.
    student_image_size: int = 0


@dataclass(frozen=True)
class StudentConfig:
    """The student network: a named variant (pipeline/student/config.py) plus overrides."""

    variant: str = "zeroseg_tiny"  # zeroseg_vit_b16 (paper) | zeroseg_vit_s16 | zeroseg_tiny | zeroseg_micro
    mask_ratio: float = 0.6  # fraction of patches removed in training (paper's best)
    init_from: str = ""  # optional timm / MAE ViT checkpoint file for the encoder
    hard_assignment: bool = True  # Gumbel + straight-through hard assignment in training
    gumbel_tau: float = 1.0
    learnable_assign_temperature: bool = False  # stabilizer, off in the paper's recipe


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their weights (applied in one place: pipeline/train.py)."""

    grids: tuple[int, ...] = (1, 2, 3, 4)  # cached grids used as targets (ablations: [1], [1, 3], ...)
    distill: float = 1.0  # z to every view
    segment_match: float = 1.0  # each segment to its nearest local view
    bidirectional_matching: bool = False  # also each local view to its nearest segment
    view_match: float = 1.0  # weight of that reverse term
    region_match: float = 0.0  # stabilizer: each segment to the views of the cells it covers
    region_grids: tuple[int, ...] = ()  # the grids whose cells region matching uses; (): all of loss.grids
    reconstruction: float = 1.0  # MAE pixel loss on masked patches
    norm_pix: bool = True
    infomax: float = 0.0  # information maximization on assignments (stabilizer)
    infomax_usage: Literal["image", "batch"] = "image"  # spread tokens over groups per image, or over the batch
    # The space embeddings are compared in (pipeline/student/target_space.py): unit vectors (none),
    # minus the teacher's dataset mean over one rms (center), or standardised per dimension.
    target_norm: Literal["none", "center", "standardize"] = "none"
    target_stats_rows: int = 4096  # cache rows (whole chunks, spread over the cache) the statistics come from
    contrastive: float = 0.0  # each segment's region target against the other images' in the batch (InfoNCE)
    contrastive_tau: float = 0.1
    # Each segment to the teacher's embedding of its own masked crop, the teacher run in stage
    # two (pipeline/student/segment_crops.py): a target that follows the segment, not the grid.
    segment_crop: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimization (paper appendix A.1) and the run's mechanics."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on CUDA; CPU runs in fp32
    epochs: int = 80
    warmup_epochs: float = 20.0
    batch_size: int = 4096  # effective batch per optimizer step, all devices together
    micro_batch: int = 256  # per device per forward; gradient accumulation makes up the rest
    base_lr: float = 1.5e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    compile: bool = False  # torch.compile the model
    num_workers: int = 4  # DataLoader workers per device (forkserver start method)
    shuffle_buffer: int = 2048  # samples held for shuffling across cache chunks
    # Where the student's images come from: the cache's images/S array (cache.student_image_size),
    # decoding the source files, or auto (the cache's when it has them complete at the student's size).
    images: Literal["auto", "cache", "decode"] = "auto"
    seed: int = 0
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps; 0: each epoch only
    log_every: int = 10  # optimizer steps between metric logs
    max_steps: int = 0  # stop after N optimizer steps (smoke runs); 0: the full schedule


@dataclass(frozen=True)
class EvalConfig:
    """Zero-shot evaluation: datasets, background rule, prompts, resolution, baselines."""

    datasets: dict[str, str] = field(default_factory=lambda: {"demo": "data/demo"})  # name -> root folder
    # probability: threshold the softmax of cosine x logit scale (GroupViT); cosine: threshold the raw
    # cosine; class: `bg_words` join the vocabulary and a pixel is background where one of them wins.
    bg_rule: Literal["probability", "cosine", "class"] = "probability"
    bg_words: tuple[str, ...] = ("background",)  # the background's names under bg_rule: class
    # Per dataset; the paper's: 0.95 VOC, 0.05 Context, 0.35 COCO-Object (on probabilities).
    bg_threshold: dict[str, float] = field(default_factory=lambda: {"voc": 0.95, "context": 0.05, "coco_object": 0.35, "demo": 0.5})
    templates: Literal["single", "imagenet"] = "imagenet"  # "a photo of a {}." or open_clip's 80 ImageNet prompts
    short_side: int = 448  # images are resized to this short side
    window: int = 448  # sliding window side (pixels of the resized image)
    stride: int = 224
    topk_classes: int = 0  # keep only the image's top-k classes (by the global embedding); 0: all
    max_images: int = 0  # per dataset; 0: all
    baselines: tuple[str, ...] = ("training_free",)  # evaluated by the same harness beside the student
    # none | center: subtract the teacher's dataset mean (from the student's checkpoint) from every
    # method's image-side embeddings, as unit vectors, before the cosine with the class embeddings.
    calibration: Literal["none", "center"] = "none"
    # How the student's windows become a segmentation (pipeline/inference.py): zeroseg (the more
    # confident window wins a pixel; plain softmax per segment; square windows) or groupvit
    # (GroupViT's evaluation exactly: mmseg slide inference averaging window logits, group
    # scores through the image's top-5 classes, background capped by the window's best score,
    # windows clipped to the image, position table interpolated bicubically).
    protocol: Literal["zeroseg", "groupvit"] = "groupvit"
    pictures: int = 8  # overlays of the first N images of each dataset
    device: str = "auto"


class Range(typing.NamedTuple):
    """Allowed values of a number: at least `low`, at most `high` (or below it, when `open_high`)."""

    low: float | None = None
    high: float | None = None
    open_high: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        parts = [f"at least {self.low:g}"] if self.low is not None else []
        if self.high is not None:
            parts.append(f"{'below' if self.open_high else 'at most'} {self.high:g}")
        return " and ".join(parts)


# Checked when params load, so that a bad value stops the command at once with its key named,
# instead of deep inside a run (a zero batch divides by zero; a mask ratio of 1 keeps no patch).
# For tuples every item is checked, and the tuple must not be empty.
RANGES: dict[str, Range] = {
    "data.max_pixels": Range(1), "data.min_side": Range(1),
    "data.demo_train": Range(0), "data.demo_eval": Range(0), "data.demo_size": Range(32),
    "teacher.batch_size": Range(1), "teacher.dask_workers": Range(1), "teacher.decode_workers": Range(0),
    "teacher.jpeg_draft_side": Range(0), "teacher.views_per_forward": Range(0),
    "cache.grids": Range(1, 64), "cache.chunk_rows": Range(1), "cache.shard_rows": Range(1), "cache.student_image_size": Range(0),
    "student.mask_ratio": Range(0.0, 1.0, open_high=True), "student.gumbel_tau": Range(1e-6),
    "loss.grids": Range(1, 64), "loss.region_grids": Range(1, 64),
    "loss.distill": Range(0.0), "loss.segment_match": Range(0.0), "loss.view_match": Range(0.0), "loss.region_match": Range(0.0),
    "loss.reconstruction": Range(0.0), "loss.infomax": Range(0.0), "loss.target_stats_rows": Range(1),
    "loss.contrastive": Range(0.0), "loss.contrastive_tau": Range(1e-3), "loss.segment_crop": Range(0.0),
    "train.epochs": Range(1), "train.warmup_epochs": Range(0.0), "train.batch_size": Range(1), "train.micro_batch": Range(1),
    "train.base_lr": Range(0.0), "train.min_lr": Range(0.0), "train.weight_decay": Range(0.0),
    "train.beta1": Range(0.0, 1.0, open_high=True), "train.beta2": Range(0.0, 1.0, open_high=True), "train.grad_clip": Range(0.0),
    "train.num_workers": Range(0), "train.shuffle_buffer": Range(0), "train.checkpoint_every": Range(0),
    "train.log_every": Range(1), "train.max_steps": Range(0),
    "eval.short_side": Range(1), "eval.window": Range(1), "eval.stride": Range(1), "eval.topk_classes": Range(0),
    "eval.max_images": Range(0), "eval.pictures": Range(0),
}
# Compression levels each codec takes (Blosc: 0-9; zstd: up to 22, 0 its default, below 0 its fast levels).
CODEC_LEVELS = {"blosc-zstd": Range(0, 9), "zstd": Range(-131072, 22), "none": Range()}
# The tuples that may be empty: no region_grids means all of loss.grids.
MAY_BE_EMPTY = {"loss.region_grids"}


def _check_ranges(params: Params) -> None:
    origin = params.origin
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        if isinstance(value, tuple):
            if not value and key not in MAY_BE_EMPTY:
                raise ConfigError(f"{origin(key)}: {key}: expected at least one value, got []")
            bad = [v for v in value if not allowed.admits(v)]
            if bad:
                raise ConfigError(f"{origin(key)}: {key}: each value must be {allowed}, got {bad[0]!r}")
        elif not allowed.admits(value):
            raise ConfigError(f"{origin(key)}: {key}: expected {allowed}, got {value!r}")
    cache = params.cache
    if not CODEC_LEVELS[cache.codec].admits(cache.codec_level):
        raise ConfigError(f"{origin('cache.codec', 'cache.codec_level')}: cache.codec_level: {cache.codec} takes {CODEC_LEVELS[cache.codec]}, got {cache.codec_level}")
    if cache.shard_rows % cache.chunk_rows:
        raise ConfigError(f"{origin('cache.shard_rows', 'cache.chunk_rows')}: cache.shard_rows ({cache.shard_rows}) must be a multiple of cache.chunk_rows ({cache.chunk_rows})")
    e = params.eval
    if e.stride > e.window:  # windows would leave unclassified strips, silently background
        raise ConfigError(f"{origin('eval.stride', 'eval.window')}: eval.stride ({e.stride}) must not exceed eval.window ({e.window})")
    for name, value in e.bg_threshold.items():  # one table serves both threshold rules
        problem = threshold_problem(e.bg_rule, value)
        if problem:
            raise ConfigError(f"{origin('eval.bg_threshold', 'eval.bg_rule')}: eval.bg_threshold.{name}: {problem}, got {value!r}")


def threshold_problem(rule: str, value: float) -> str | None:
    """Why `value` cannot be a background threshold under `rule` (None if it can):
    probabilities lie in [0, 1], cosines in [-1, 1]."""
    low = 0.0 if rule == "probability" else -1.0
    return None if low <= value <= 1.0 else f"a {rule} threshold lies in [{low:g}, 1]"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "teacher": TeacherConfig,
    "cache": CacheConfig,
    "student": StudentConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass(frozen=True)
class Params:
    """All sections of a params file; sections absent from the file take their defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = "<defaults>"  # the file these came from, for error messages
    overridden: frozenset[str] = frozenset()  # SECTION.KEY given by --set

    def origin(self, *keys: str) -> str:
        """Where the values of `keys` came from, for error messages: --set (if any of them came
        from it) or the params file."""
        return "--set" if self.overridden.intersection(keys) else self.source


def load_params(path: str | Path | None = "params.yaml", overrides: typing.Sequence[str] = (), *, base: Mapping[str, Any] | None = None, base_source: str = "") -> Params:
    """Read a params file, apply `KEY=VALUE` overrides, and check every key and type.

    Args:
        path: the YAML file; None for built-in defaults only (or `base`).
        overrides: strings like `teacher.model=ViT-B-16` or `cache.grids=[1,3]`.
        base: with `path` None, sections to start from instead of the file (a checkpoint's
            recorded params), named `base_source` in errors.
    Raises:
        ConfigError: one line naming the file and the offending key.
    """
    source = str(path) if path is not None else base_source or "<defaults>"
    raw: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items() if k in SECTIONS} if path is None else {}
    overridden: set[str] = set()
    if path is not None:
        try:
            raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)
        except FileNotFoundError:
            raise ConfigError(f"{source}: params file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read the params file ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if raw is None:
            raise ConfigError(f"{source}: the params file is empty")
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE (or SECTION.KEY.NAME=VALUE for a mapping)")
        raw.setdefault(parts[0], {})
        if not isinstance(raw[parts[0]], dict):
            raise ConfigError(f"{source}: section {parts[0]!r} must be a mapping")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        overridden.add(f"{parts[0]}.{parts[1]}")
        if len(parts) == 3:  # one entry of a mapping-valued key, the rest kept
            current = raw[parts[0]].get(parts[1])
            if current is None:
                cls = SECTIONS.get(parts[0])
                default = next((f for f in dataclasses.fields(cls) if f.name == parts[1]), None) if cls else None
                current = default.default_factory() if default is not None and default.default_factory is not dataclasses.MISSING else {}
            raw[parts[0]][parts[1]] = {**dict(current), parts[2]: value}
        else:
            raw[parts[0]][parts[1]] = value
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(SECTIONS)})")
        sections[name] = _build(SECTIONS[name], values or {}, name, source, overridden)
    params = Params(**sections, source=source, overridden=frozenset(overridden))
    _check_ranges(params)
    return params


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by later keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                break  # the base class says why such a key is refused
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice ({key_node.start_mark.line + 1}:{key_node.start_mark.column + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def section_dict(cfg: Any) -> dict[str, Any]:
    """A section as plain JSON-able values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _build(cls: type, values: Any, section: str, source: str, overridden: set[str] = frozenset()) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = "--set" if f"{section}.{key}" in overridden else source
        if key not in known:
            raise ConfigError(f"{where}: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", where)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key, source) for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key, source)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 2e-3 as a string; YAML 1.2, which `dvc exp run -S` writes, as a float.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key}: expected {hint.__name__}, got {value!r}")
    return value
