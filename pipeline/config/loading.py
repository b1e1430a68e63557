"""Reading params: a YAML file and `--set` overrides into the frozen sections of `sections.py`.

Every key and type is checked (a key given twice in one mapping is refused; merge keys work),
then every field's admitted values and the rules that span fields; each failure is one line
naming the key and where it came from (the file or --set).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.sections import CODEC_LEVELS, SECTIONS, Params
from pipeline.core.errors import ConfigError


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
        if parts[0] not in SECTIONS:  # named here: the file never had this section
            raise ConfigError(f"--set {item!r}: unknown section {parts[0]!r} (known: {', '.join(SECTIONS)}){_suggest(parts[0], SECTIONS)}")
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
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(SECTIONS)}){_suggest(name, SECTIONS)}")
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


# Keys of earlier versions whose options were measured not to help and removed (docs/findings.md).
REMOVED_KEYS = frozenset({
    "loss.target_norm", "loss.contrastive", "loss.contrastive_tau", "loss.segment_crop", "loss.token_relation", "loss.token_prototypes",
    "loss.segment_prototypes", "loss.prototypes", "loss.prototype_tau", "loss.segment_anchors", "loss.infomax_usage", "loss.token_distill",
    "student.learnable_assign_temperature", "eval.calibration", "eval.protocol",
})


def _build(cls: type, values: Any, section: str, source: str, overridden: set[str] = frozenset()) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = "--set" if f"{section}.{key}" in overridden else source
        if key not in known:
            if f"{section}.{key}" in REMOVED_KEYS:
                raise ConfigError(f"{where}: {section}.{key} was removed: it was measured not to help (docs/findings.md; it runs at git tag lab-2026-12)")
            raise ConfigError(f"{where}: unknown key {section}.{key} (known: {', '.join(sorted(known))}){_suggest(key, known)}")
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


def _check_ranges(params: Params) -> None:
    origin = params.origin
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "range" in f.metadata:
                _check_range(f"{section}.{f.name}", getattr(getattr(params, section), f.name), f.metadata, origin)

    cache = params.cache
    if not CODEC_LEVELS[cache.codec].admits(cache.codec_level):
        raise ConfigError(f"{origin('cache.codec', 'cache.codec_level')}: cache.codec_level: {cache.codec} takes {CODEC_LEVELS[cache.codec]}, got {cache.codec_level}")
    if cache.shard_rows % cache.chunk_rows:
        raise ConfigError(f"{origin('cache.shard_rows', 'cache.chunk_rows')}: cache.shard_rows ({cache.shard_rows}) must be a multiple of cache.chunk_rows ({cache.chunk_rows})")
    e = params.eval
    if e.stride > e.window:  # windows would leave unclassified strips, silently background
        raise ConfigError(f"{origin('eval.stride', 'eval.window')}: eval.stride ({e.stride}) must not exceed eval.window ({e.window})")
    for key in ("bg_threshold", "student_bg_threshold"):
        for name, value in getattr(e, key).items():  # one table serves both threshold rules
            problem = threshold_problem(e.bg_rule, value)
            if problem:
                raise ConfigError(f"{origin(f'eval.{key}', 'eval.bg_rule')}: eval.{key}.{name}: {problem}, got {value!r}")


def threshold_problem(rule: str, value: float) -> str | None:
    """Why `value` cannot be a background threshold under `rule` (None if it can):
    probabilities lie in [0, 1], cosines in [-1, 1]."""
    low = 0.0 if rule == "probability" else -1.0
    return None if low <= value <= 1.0 else f"a {rule} threshold lies in [{low:g}, 1]"


def _check_range(key: str, value: Any, meta: Mapping[str, Any], origin: Any) -> None:
    allowed = meta["range"]
    if isinstance(value, tuple):
        if not value and not meta["may_be_empty"]:
            raise ConfigError(f"{origin(key)}: {key}: expected at least one value, got []")
        bad = [v for v in value if not allowed.admits(v)]
        if bad:
            raise ConfigError(f"{origin(key)}: {key}: each value must be {allowed}, got {bad[0]!r}")
    elif not allowed.admits(value):
        raise ConfigError(f"{origin(key)}: {key}: expected {allowed}, got {value!r}")


def _suggest(name: str, known) -> str:
    """'; did you mean X?' for a near miss of one of `known` ('' when none is near)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
