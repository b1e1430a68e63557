"""The CLIP teacher: any open_clip model, its identity, and a batched image encoder.

A teacher is named by `teacher.model` (an open_clip model name, a path to an open_clip model
config JSON, or `local-dir:PATH`) and `teacher.pretrained` (a pretrained tag such as `openai`,
a local checkpoint file, an open_clip local-dir folder, or "" for a seeded random init). The
model configs in `pipeline/clip/model_configs/` are registered with open_clip at import, so
`zeroseg-test-vit` and `zeroseg-demo-rn` work like built-in names.

The identity (model config hash, pretrained source, sha256 of the loaded weights, precision,
preprocessing) is what the cache's fingerprint is made of: swap any of them and the cache is
a different cache.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import open_clip
import torch

import cache_schema as cs
from pipeline.clip.dense import dense_grid, dense_grid_side
from pipeline.config import TeacherConfig
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.views import ViewSpec, make_views

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"


open_clip.add_model_config(SHIPPED_CONFIGS)


# Autocast dtypes, on whatever device the teacher runs. pure_bf16 is open_clip's name for weights
# and activations in bf16 throughout: no autocast casts, and nn.MultiheadAttention takes its
# fused inference path, which autocast turns off. Only the image tower is cast.
_AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "pure_bf16": torch.float32}


@dataclass(frozen=True)
class TeacherIdentity:
    """Who the teacher is, as recorded in (and validated against) the cache."""

    library: str
    library_version: str
    model: str
    model_config_sha256: str
    pretrained: str  # the open_clip tag, "" (random init) or cs.LOCAL_WEIGHTS
    weights_sha256: str
    precision: str
    embed_dim: int

    def fingerprint_fields(self) -> dict:
        """The fields that define the embeddings (the library's version is recorded, not keyed)."""
        d = asdict(self)
        d.pop("library_version")
        return d


def teacher_files(cfg: TeacherConfig, beside: str | Path) -> dict:
    """Where `cfg`'s model config and weights are, for a checkpoint written at `beside`.

    Each of `teacher.model` and `teacher.pretrained` that names a file or folder here is recorded
    as an absolute path and as a path relative to the checkpoint's folder, so that a model copied
    together with its teacher (or used on the machine it was trained on, from any folder) finds
    it again. Tags and built-in model names are recorded as they are.
    """
    out: dict[str, str] = {"model": cfg.model, "pretrained": cfg.pretrained}
    home = Path(beside).resolve().parent
    for key in ("model", "pretrained"):
        value = getattr(cfg, key)
        local = value[len("local-dir:"):] if value.startswith("local-dir:") else value
        if local and Path(local).exists():
            where = Path(local).resolve()
            out[f"{key}_absolute"] = str(where)
            out[f"{key}_relative"] = os.path.relpath(where, home)
    return out


def teacher_candidates(files: dict, checkpoint: str | Path) -> list[tuple[str, str]]:
    """(model, pretrained) pairs to try for a checkpoint's recorded `teacher_files`, in order:
    beside the checkpoint (a copied model folder), where it was at training, as recorded."""
    home = Path(checkpoint).resolve().parent

    def places(key: str) -> list[str]:
        value = files.get(key, "")
        prefix = "local-dir:" if value.startswith("local-dir:") else ""
        found = [prefix + str(home / files[f"{key}_relative"])] if files.get(f"{key}_relative") else []
        found += [prefix + files[f"{key}_absolute"]] if files.get(f"{key}_absolute") else []
        return [*found, value]

    pairs = [(m, p) for m in places("model") for p in places("pretrained")]
    return list(dict.fromkeys(pairs))


class Teacher:
    """A loaded open_clip model that turns normalized views into projected embeddings."""

    def __init__(self, model: torch.nn.Module, identity: TeacherIdentity, spec: ViewSpec, device: torch.device, precision: str, views_per_forward: int = 0, compile: bool = False, open_clip_name: str = ""):
        self.model = model.eval().requires_grad_(False)
        # The name open_clip built it under (a config's stem, or local-dir:PATH): its tokenizer's.
        self.open_clip_name = open_clip_name or identity.model
        # The dtype views enter the image tower in (bf16 for pure_bf16, whose tower is cast).
        self.view_dtype = torch.bfloat16 if precision == "pure_bf16" else torch.float32
        if precision == "pure_bf16":
            self.model.visual.to(torch.bfloat16)
        # torch.compile'd encode_image (teacher.compile); the model itself stays a plain module.
        self._encode_image = torch.compile(self.model.encode_image) if compile else self.model.encode_image
        # Measured on a 2-core CPU with ViT-S-32: 60 views/s at 64 views per forward, 47 at 480.
        self.views_per_forward = views_per_forward or (64 if device.type == "cpu" else 4096)
        self.identity = identity
        self.spec = spec
        self.device = device
        self.precision = precision
        self.forward_views = 0  # views encoded so far: lets tests and logs count the real work

    @classmethod
    def load(cls, cfg: TeacherConfig) -> Teacher:
        device = resolve_device(cfg.device)
        model, model_name, local = _create_model(cfg)
        model_cfg = open_clip.get_model_config(model_name) if not model_name.startswith("local-dir:") else None
        if model_cfg is None and model_name.startswith("local-dir:"):
            model_cfg = json.loads((Path(model_name[len("local-dir:"):]) / "open_clip_config.json").read_text())
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp["size"] if isinstance(pp["size"], int) else int(pp["size"][0])
        spec = ViewSpec(
            size=size,
            interpolation=pp.get("interpolation", "bicubic"),
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
            resize_mode=pp.get("resize_mode", "shortest"),
        )
        embed_dim = int(getattr(model.visual, "output_dim", 0) or model_cfg["embed_dim"])
        identity = TeacherIdentity(
            library="open_clip",
            library_version=open_clip.__version__,
            # Likewise a model config's path is not the model: its name and config hash are.
            model=identity_model_name(cfg.model),
            model_config_sha256=_json_sha256(model_cfg),
            # Where a checkpoint lies is not who the teacher is (weights_sha256 says that): the
            # same checkpoint at another path, on another team's machine, is the same teacher.
            pretrained=cs.LOCAL_WEIGHTS if local else cfg.pretrained,
            weights_sha256=state_dict_sha256(model),
            precision=cfg.precision,
            embed_dim=embed_dim,
        )
        return cls(model.to(device), identity, spec, device, cfg.precision, cfg.views_per_forward, cfg.compile, open_clip_name=model_name)

    @torch.inference_mode()
    def encode(self, views: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, not normalized.

        Args:
            views: [N, 3, size, size] normalized pixels.
        Returns:
            [N, D] float32.
        """
        dtype = _AUTOCAST[self.precision]
        out = []
        for chunk in views.split(self.views_per_forward):
            chunk = chunk.to(self.device, self.view_dtype, non_blocking=True)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                out.append(self._encode_image(chunk).float())  # [n, D]
        self.forward_views += views.shape[0]
        return torch.cat(out)  # [N, D]

    @torch.inference_mode()
    def encode_dense(self, squares: Sequence[torch.Tensor], grid: int, side: int = 0) -> torch.Tensor:
        """B uint8 [S_b, S_b, 3] center squares -> [B, grid * grid, D] float32: a dense grid's views
        (`pipeline.clip.dense.dense_grid` of each square resized whole, as a view is, to `side`,
        0: `dense_grid_side`)."""
        side = side or dense_grid_side(self.model.visual, self.spec.size, grid)
        x = make_views(squares, (1,), replace(self.spec, size=side), self.device)[:, 0]  # [B, 3, side, side]
        dtype = _AUTOCAST[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = dense_grid(self.model.visual, x.to(self.view_dtype), grid, self.spec.size).float()
        self.forward_views += len(squares) * grid * grid
        return out


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity_model_name(model: str) -> str:
    """`teacher.model` as the cache identity records it: without any path.

    A model-config JSON is known by its file's stem (the name open_clip registers it under) and a
    `local-dir:` model as "local-dir"; `model_config_sha256` and `weights_sha256` say which, so
    one config or checkpoint at two teams' paths is one teacher.
    """
    if model.startswith("local-dir:"):
        return "local-dir"
    if model.endswith(".json"):
        return Path(model).stem
    return model


def _json_sha256(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_hub_weights_reachable(name: str, tag: str, cache_dir: str | None) -> None:
    """Fail at once, with what to do, when a tag's weights are neither cached nor downloadable.

    Offline, huggingface_hub retries for about a minute and prints dozens of warnings before
    open_clip gives up. The weights in the local hub cache, or a reachable hub, pass.
    """
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return  # URL-only weights: open_clip's own download reports its error
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    repo, filename = os.path.split(hub)
    names = [f for f in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin") if f]
    if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in names):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
            return
        except OSError:
            pass
    why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
    raise InputError(
        f"teacher.pretrained: the {tag!r} weights of {name} ({repo}) are not in the local Hugging Face cache and {why}: "
        "download them once where there is a network (or copy the hub cache here), or set teacher.pretrained to a local checkpoint file"
    )


def _check_local_dir_model(name: str, folder: Path) -> None:
    """Refuse a teacher.model other than the one an open_clip local-dir folder holds.

    The folder's own open_clip_config.json builds the model, so a different teacher.model would
    be ignored, yet recorded as the teacher in the cache's identity.
    """
    config = folder / "open_clip_config.json"
    try:
        held = json.loads(config.read_text())["model_cfg"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"teacher.pretrained: {folder} is a folder but not an open_clip local-dir ({config}: {type(exc).__name__}: {exc})") from None
    named = held if name.startswith("local-dir:") else open_clip.get_model_config(name)
    if named != held:
        differs = sorted(k for k in set(named) | set(held) if named.get(k) != held.get(k))
        raise InputError(f"teacher.model: {name} is not the model in {folder} (its open_clip_config.json differs in {', '.join(differs)}); "
                         "set teacher.model to the folder's model")


def weights_are_local(name: str, pretrained: str) -> bool:
    """Whether open_clip takes `name`'s weights from a local file or folder.

    In open_clip's order: a pretrained tag of the model first, then a path, so a file that happens
    to be named like a tag is not used (and the identity must not call the weights local).
    A `local-dir:` model name brings its own weights.
    """
    if name.startswith("local-dir:"):
        return True
    return bool(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(name) and Path(pretrained).exists()


def _create_model(cfg: TeacherConfig) -> tuple[torch.nn.Module, str, bool]:
    """(model, open_clip name, whether the weights came from a local file or folder)."""
    name = cfg.model
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"teacher.model: model config {path} not found")
        open_clip.add_model_config(path)
        name = path.stem
    pretrained = cfg.pretrained or None
    if not name.startswith("local-dir:") and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (open_clip.list_models() lists the names)"
        raise InputError(f"teacher.model: {cfg.model!r} is not an open_clip model name, model config JSON or local-dir: path{hint}")
    tags = [] if name.startswith("local-dir:") else open_clip.list_pretrained_tags_by_model(name)
    local = weights_are_local(name, pretrained or "")
    if pretrained and not local and pretrained not in tags:
        raise InputError(f"teacher.pretrained: {pretrained!r} is neither a file nor a pretrained tag of {name} (tags: {', '.join(tags) or 'none'})")
    if pretrained and not local:
        _check_hub_weights_reachable(name, pretrained, cfg.weights_dir or None)
    if local and Path(pretrained).is_dir():
        _check_local_dir_model(name, Path(pretrained))
        name, pretrained = f"local-dir:{pretrained}", None
    torch.manual_seed(cfg.seed)  # a random init ("" pretrained) is reproducible, so is its weights hash
    try:
        with quiet_root_logger():
            model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cfg.weights_dir or None)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"teacher: could not load {cfg.model} with pretrained={cfg.pretrained!r}: {str(exc).splitlines()[0]}") from None
    return model, name, local


@contextlib.contextmanager
def quiet_root_logger():
    """Silence the root logger for one open_clip call: it warns there about a random init
    ("No pretrained weights loaded"), which is what a seeded teacher or a demo teacher wants."""
    logging.getLogger().disabled = True
    try:
        yield
    finally:
        logging.getLogger().disabled = False
