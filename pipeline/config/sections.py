"""The params contract: one frozen dataclass per params.yaml section, each field with its default,
its comment and the values it admits (`bounded`).

`zeroseg params` and docs/cli.md list the same keys; `loading.py` reads them from YAML and `--set`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal


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


def bounded(default: Any, *, at_least: float | None = None, at_most: float | None = None, below: float | None = None,
            may_be_empty: bool = False) -> Any:
    """A field's default and the values it admits (each item's, for a tuple), checked when params load.

    A bad value then stops the command at once with its key named, instead of deep inside a run
    (a zero batch divides by zero; a mask ratio of 1 keeps no patch). A tuple must not be empty
    unless `may_be_empty`.
    """
    high = below if below is not None else at_most
    return field(default=default, metadata={"range": Range(at_least, high, open_high=below is not None), "may_be_empty": may_be_empty})


@dataclass(frozen=True)
class DataConfig:
    """Where the training images are and how their manifest is hashed."""

    images: str = "data/demo/images"  # a folder (searched recursively), a text file of paths, or tar shards (pipeline/core/tars.py)
    # content: sha256 of every file's bytes (portable across machines, memoized locally);
    # stat: path + size + mtime (instant, but differs on every copy of the dataset).
    manifest_hash: Literal["content", "stat"] = "content"
    max_pixels: int = bounded(178_956_970, at_least=1)  # larger images are refused as decompression bombs (PIL's limit)
    min_side: int = bounded(16, at_least=1)  # smaller center squares are refused; must be >= the largest grid
    # The built-in synthetic scenes (`zeroseg demo-data --split S`), used when `images` points at them:
    # each split is drawn from a random stream of its own (`pipeline/demo/data.py`, `SPLITS`).
    demo_train: int = bounded(512, at_least=0)  # training scenes (no masks)
    demo_val: int = bounded(128, at_least=0)  # the validation split: every default is chosen on it
    demo_test: int = bounded(256, at_least=0)  # the held-out split: read by the evaluate stage alone
    demo_size: int = bounded(128, at_least=32)
    demo_seed: int = 0  # the training scenes' stream; the validation and held-out splits take demo_seed + 1 and + 2


@dataclass(frozen=True)
class TeacherConfig:
    """The CLIP teacher of stage one: any open_clip model."""

    model: str = "ViT-L-14"  # open_clip model name, or a path to an open_clip model-config JSON
    pretrained: str = "openai"  # pretrained tag, local checkpoint file, or "" (random init)
    # bf16, fp16: autocast in that dtype on the teacher's device; pure_bf16: the image tower's weights
    # and activations in bf16 on any device (open_clip's name). Part of the cache identity.
    precision: Literal["fp32", "bf16", "fp16", "pure_bf16"] = "bf16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = bounded(64, at_least=1)  # images per teacher batch; each image gives V views
    executor: Literal["local", "dask"] = "local"
    dask_address: str = ""  # a dask scheduler address; "": start a local cluster
    dask_workers: int = bounded(2, at_least=1)  # workers of that local cluster (one per GPU when there are GPUs)
    decode_workers: int = bounded(0, at_least=0)  # threads decoding images; 0: one per CPU core
    # 0: off. Otherwise large JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as the
    # center square keeps this side; at least largest grid x input size (896 for 4x4 at 224).
    # Part of the cache identity when on.
    jpeg_draft_side: int = bounded(0, at_least=0)
    views_per_forward: int = bounded(0, at_least=0)  # views per teacher forward; 0: 64 on CPU (cache-friendly), 4096 on GPU
    compile: bool = False  # torch.compile the image encoder (not part of the identity: same values within float rounding)
    seed: int = 0  # seeds random initialisation when pretrained is ""
    weights_dir: str = ""  # where open_clip keeps downloaded weights ("": its default)


@dataclass(frozen=True)
class CacheConfig:
    """Layout of the teacher cache (not part of its identity)."""

    root: str = "caches"  # a directory or an fsspec URL
    grids: tuple[int, ...] = bounded((1, 2, 3, 4), at_least=1, at_most=64)
    chunk_rows: int = bounded(64, at_least=1)  # images per chunk: the unit of a training-time read
    shard_rows: int = bounded(1024, at_least=1)  # images per shard: the unit of a write and of resume
    codec: Literal["zstd", "blosc-zstd", "none"] = "blosc-zstd"  # chosen by bench/codec_bench.py
    codec_level: int = 3
    # 0: off. Else stage one also stores every image's center square resized to this side (set it
    # to the student's input size), uint8, lossless, so stage two reads it instead of decoding.
    student_image_size: int = bounded(0, at_least=0)
    # Grids whose `views/GxG` hold the teacher's dense (MaskCLIP) embeddings of the whole center
    # square averaged over each cell, instead of each cell's crop (pipeline/clip/dense.py): a
    # target that follows every patch, for one forward per image. Not also in `grids`.
    dense_grids: tuple[int, ...] = bounded((), at_least=1, at_most=64, may_be_empty=True)
    # The side the whole center square is resized to for the dense grids (0: the teacher's own, one
    # 32-px location per cell for a ResNet); the map is then averaged onto each grid's cells. The
    # scale at which the teacher's dense embeddings name best (docs/demo.md); changing it recomputes
    # the dense grids only.
    dense_side: int = bounded(0, at_least=0)


@dataclass(frozen=True)
class StudentConfig:
    """The student network: a named variant (pipeline/student/config.py) plus overrides."""

    variant: str = "zeroseg_vit_b16"  # zeroseg_vit_b16 (the paper's) | zeroseg_vit_s16 | zeroseg_tiny | zeroseg_tiny_g8 | zeroseg_micro
    mask_ratio: float = bounded(0.6, at_least=0.0, below=1.0)  # fraction of patches removed in training (paper's best)
    init_from: str = ""  # optional timm / MAE ViT checkpoint file for the encoder
    hard_assignment: bool = True  # Gumbel + straight-through hard assignment in training
    gumbel_tau: float = bounded(1.0, at_least=1e-06)


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their weights (applied in one place: pipeline/student/objective.py)."""

    grids: tuple[int, ...] = bounded((1, 2, 3, 4), at_least=1, at_most=64)  # cached grids used as targets (ablations: [1], [1, 3], ...)
    distill: float = bounded(1.0, at_least=0.0)  # z to every view
    segment_match: float = bounded(1.0, at_least=0.0)  # each segment to its nearest local view
    bidirectional_matching: bool = False  # also each local view to its nearest segment
    view_match: float = bounded(1.0, at_least=0.0)  # weight of that reverse term
    region_match: float = bounded(0.0, at_least=0.0)  # stabilizer: each segment to the views of the cells it covers
    region_grids: tuple[int, ...] = bounded((), at_least=1, at_most=64, may_be_empty=True)  # the grids whose cells region matching uses; (): all of loss.grids
    reconstruction: float = bounded(1.0, at_least=0.0)  # MAE pixel loss on masked patches
    norm_pix: bool = True
    infomax: float = bounded(0.0, at_least=0.0)  # information maximization on assignments (stabilizer)
    target_stats_rows: int = bounded(4096, at_least=1)  # cache rows (whole chunks, spread over the cache) loss.anchor_prior is taken from
    # Each visible patch token, through the segment projection, to the teacher's views of the cells
    # it lies in (`loss.region_grids`): a dense target that asks the encoder for what each patch shows.
    # The same target, ranked: each visible token's softmax over fixed anchors (the teacher's text
    # embeddings of `anchor_vocabulary`, pipeline/student/anchors.py) must match its target's.
    token_anchors: float = bounded(0.0, at_least=0.0)
    anchor_vocabulary: str = "imagenet"  # imagenet (open_clip's 1,000 class names) | @FILE (one name per line) | "a, b, c"
    anchor_tau: float = bounded(0.05, at_least=0.001)  # temperature of both softmaxes over the anchors
    # The targets' prior over the words: none, or balance (each word's mean cosine over the cache
    # sample's views that a non-background word wins is taken out of the targets' cosines, so a
    # word the teacher favours everywhere stops winning by default; eval.bg_words are left as they are).
    anchor_prior: Literal["none", "balance"] = "none"
    # The crop views' weight in the token terms' targets (beside the region grids' cells): 0, the
    # cells alone.
    token_crop_weight: float = bounded(0.0, at_least=0.0)
    # The same KL over the object words alone (the anchors but eval.bg_words), the target's
    # background mass spread evenly over them: where the teacher sees background, the token ranks
    # no object word above another, so a threshold on its best object-word probability (GroupViT's
    # probability rule) finds the objects. 0: off.
    token_background: float = bounded(0.0, at_least=0.0)
    # Wordless anchors: each visible token's softmax over `view_anchor_count` k-means directions of
    # the cache sample's views (the region grids') must match its target's, at `view_anchor_tau`; so
    # a word outside the vocabulary is ranked where the teacher's views would rank it. 0: off.
    view_anchors: float = bounded(0.0, at_least=0.0)
    view_anchor_count: int = bounded(32, at_least=2)
    view_anchor_tau: float = bounded(0.05, at_least=0.001)


@dataclass(frozen=True)
class TrainConfig:
    """Optimization (paper appendix A.1) and the run's mechanics."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on CUDA; CPU runs in fp32
    epochs: int = bounded(80, at_least=1)
    warmup_epochs: float = bounded(20.0, at_least=0.0)
    batch_size: int = bounded(4096, at_least=1)  # effective batch per optimizer step, all devices together
    micro_batch: int = bounded(256, at_least=1)  # per device per forward; gradient accumulation makes up the rest
    base_lr: float = bounded(1.5e-4, at_least=0.0)  # lr = base_lr * batch_size / 256
    min_lr: float = bounded(0.0, at_least=0.0)
    weight_decay: float = bounded(0.05, at_least=0.0)
    beta1: float = bounded(0.9, at_least=0.0, below=1.0)
    beta2: float = bounded(0.95, at_least=0.0, below=1.0)
    grad_clip: float = bounded(0.0, at_least=0.0)  # max gradient norm; 0 disables
    compile: bool = False  # torch.compile the model
    num_workers: int = bounded(4, at_least=0)  # DataLoader workers per device (forkserver start method)
    shuffle_buffer: int = bounded(2048, at_least=0)  # samples held for shuffling across cache chunks
    # Mirror each image left-right with probability 1/2, its cached views' cells with it (each cell's
    # embedding taken as its mirror's). The paper trains on the center crop alone; on the demo's
    # 3,000 scenes it is measured to help (docs/training.md "Mirrored scenes").
    hflip: bool = False
    # Where the student's images come from: the cache's images/S array (cache.student_image_size),
    # decoding the source files, or auto (the cache's when it has them complete at the student's size).
    images: Literal["auto", "cache", "decode"] = "auto"
    seed: int = 0
    checkpoint_every: int = bounded(0, at_least=0)  # also checkpoint every N optimizer steps; 0: each epoch only
    log_every: int = bounded(10, at_least=1)  # optimizer steps between metric logs
    max_steps: int = bounded(0, at_least=0)  # stop after N optimizer steps (smoke runs); 0: the full schedule


@dataclass(frozen=True)
class EvalConfig:
    """Zero-shot evaluation: datasets, background rule, prompts, resolution, baselines."""

    datasets: dict[str, str] = field(default_factory=lambda: {"demo": "data/demo_test"})  # name -> root folder
    # probability: threshold the softmax of cosine x logit scale (GroupViT); cosine: threshold the raw
    # cosine; class: `bg_words` join the vocabulary and a pixel is background where one of them wins.
    bg_rule: Literal["probability", "cosine", "class"] = "probability"
    bg_words: tuple[str, ...] = ("background",)  # the background's names under bg_rule: class
    # Per dataset; the paper's: 0.95 VOC, 0.05 Context, 0.35 COCO-Object (on probabilities).
    bg_threshold: dict[str, float] = field(default_factory=lambda: {"voc": 0.95, "context": 0.05, "coco_object": 0.35, "demo": 0.5})
    templates: Literal["single", "imagenet"] = "imagenet"  # "a photo of a {}." or open_clip's 80 ImageNet prompts
    short_side: int = bounded(448, at_least=1)  # images are resized to this short side
    window: int = bounded(448, at_least=1)  # sliding window side (pixels of the resized image)
    stride: int = bounded(224, at_least=1)
    # The dense-CLIP baselines' short side (0: short_side): a ViT teacher's windows slide over the
    # image at this side (at least its input size), a ResNet teacher sees the whole image at it.
    dense_short_side: int = bounded(0, at_least=0)
    # The dense baselines' multi-scale inference: the image at round(dense_short_side x ratio) for
    # each ratio, the scores resized to the image and averaged (mmseg's img_ratios); (1.0,): one scale.
    dense_ratios: tuple[float, ...] = bounded((1.0,), at_least=0.1, at_most=4.0)
    # The grid baseline's grids: the teacher classifies each of their cells (the cache's local views).
    grid_grids: tuple[int, ...] = bounded((2, 3, 4), at_least=1, at_most=64)
    # The student's short side (0: short_side): its windows slide over the image resized to this
    # side, so it can be evaluated at the scale it was trained at (the demo trains on whole 128-px
    # scenes at 64 px; docs/demo.md). Its labels are resized to the image like every method's.
    student_short_side: int = bounded(0, at_least=0)
    # What names a student segment: segment (its group embedding, the paper's) or tokens (the
    # assignment-weighted mean of its patch tokens through the segment projection).
    student_naming: Literal["segment", "tokens"] = "segment"
    # With tokens: 0 (each segment pools its own window's tokens) or N, the short side at which the
    # student's tokens see the whole image and name its window segments (its training scale; the
    # demo: 64; docs/evaluation.md "The student's naming").
    token_short_side: int = bounded(0, at_least=0)
    # With token_short_side N: the tokens at each round(N x ratio) px, their class scores resized to
    # the image and averaged (multi-scale inference, as mmseg's img_ratios); (1.0,): N alone.
    token_ratios: tuple[float, ...] = bounded((1.0,), at_least=0.1, at_most=4.0)
    # The student's own calibration under the threshold rules (probability, cosine): its softmax
    # scale (0: the teacher's logit scale; a student trained with loss.token_anchors ranks words at
    # 1 / loss.anchor_tau) and its threshold per dataset (missing: bg_threshold's). Each method is
    # thresholded where its own scores separate objects from background (chosen on a validation split).
    student_logit_scale: float = bounded(0.0, at_least=0.0)
    student_bg_threshold: dict[str, float] = field(default_factory=dict)
    topk_classes: int = bounded(0, at_least=0)  # keep only the image's top-k classes (by the global embedding); 0: all
    max_images: int = bounded(0, at_least=0)  # per dataset; 0: all
    baselines: tuple[str, ...] = ("training_free", "maskclip", "sclip", "naclip")  # evaluated by the same harness beside the student
    pictures: int = bounded(8, at_least=0)  # overlays of the first N images of each dataset
    device: str = "auto"


# Compression levels each codec takes (Blosc: 0-9; zstd: up to 22, 0 its default, below 0 its fast levels).
CODEC_LEVELS = {"blosc-zstd": Range(0, 9), "zstd": Range(-131072, 22), "none": Range()}


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
