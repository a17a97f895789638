"""Load a YAML config into a frozen `Config`, turning every problem into a message a person can act on."""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dolphin_train.config.schema import Config, DatasetConfig, SpecialTokens, documented_fields
from dolphin_train.errors import ConfigError

log = logging.getLogger(__name__)

# Nested mappings whose keys are checked against a schema (other dict-valued keys are free-form).
_NESTED_MODELS: dict[str, type[BaseModel]] = {"datasets": DatasetConfig, "special_tokens": SpecialTokens}


class _DuplicateTrackingLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of silently keeping the last one."""

    duplicates: list[tuple[str, Any, Any, int]]


def _construct_mapping(loader: _DuplicateTrackingLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        k = loader.construct_object(key_node, deep=deep)
        v = loader.construct_object(value_node, deep=deep)
        if k in seen:
            loader.duplicates.append((k, seen[k], v, key_node.start_mark.line + 1))
        seen[k] = v
    return seen


_DuplicateTrackingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file safely. Repeated keys with equal values are tolerated (the Dolphin 2.9 config
    repeats `logging_steps: 1`); repeated keys with different values are an error, since which one wins
    would be a guess."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    text = path.read_text(encoding="utf-8")
    loader = _DuplicateTrackingLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(path)) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping of keys to values, got {type(data).__name__}"], str(path))
    problems = []
    for k, first, second, line in loader.duplicates:
        if first == second:
            log.info("%s: key %r is repeated (line %d) with the same value", path, k, line)
        else:
            problems.append(f"{k}: set twice with different values ({first!r}, then {second!r} on line {line})")
    if problems:
        raise ConfigError(problems, source=str(path))
    return data


def parse_override_value(text: str) -> Any:
    """`--learning_rate 1e-5` → 1e-05: values are read as YAML scalars, so numbers, booleans and
    lists (`--tokens '[a, b]'`) work as they would in the file."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _coerce_yaml11_float(value)


def _coerce_yaml11_float(value: Any) -> Any:
    # YAML 1.1 reads `2e-5` (no dot) as a string; pydantic coerces it for float fields, but overrides of
    # free-form keys should see the number too.
    if isinstance(value, str):
        try:
            return float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            return value
    return value


def _drop_nulls(value: Any, model: type[BaseModel] | None = Config) -> Any:
    """axolotl configs write `key:` (null) to mean "not set": a known key that is null is treated as absent,
    so the default applies. An unknown key stays, null or not, and fails as unknown: never silently accepted."""
    if isinstance(value, dict):
        known = documented_fields(model) if model is not None else {}  # free-form mappings: every key "known"
        return {
            k: _drop_nulls(v, _NESTED_MODELS.get(k) if model is Config else None)
            for k, v in value.items()
            if v is not None or (model is not None and k not in known)
        }
    if isinstance(value, list):
        return [_drop_nulls(v, model) for v in value]
    return value


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The schema model that owns the mapping at `loc` (for suggesting key names)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, str) and part in _NESTED_MODELS and model is Config:
            model = _NESTED_MODELS[part]
    return model


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# pydantic names the member of a union that failed inside the location (`micro_batch_size.constrained-int`):
# not a key, so left out of what the user reads.
_UNION_MEMBERS = re.compile(r"^(function-|literal\[|constrained-|int$|float$|bool$|str$|list\[|dict\[|json-or-python)")


def _merged_union_errors(problems: list[str]) -> list[str]:
    """A value that matches no member of a union (`micro_batch_size: 0` for `int >= 1 | "auto"`) gives one
    error per member: one line per key instead, its reasons joined with "or"."""
    merged: dict[str, list[str]] = {}
    for problem in problems:
        head, sep, reason = problem.partition(" is not allowed: ")
        merged.setdefault(head if sep else problem, []).append(reason)
    return [f"{head} is not allowed: {' or '.join(dict.fromkeys(r for r in reasons))}" if reasons[0] else head
            for head, reasons in merged.items()]  # fmt: skip


def _describe_error(err: Mapping[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_MEMBERS.match(p)))
    where = _format_loc(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        name = loc[-1]
        known = documented_fields(_model_at(loc[:-1]))
        return f"{where}: unknown key{suggest(name, known)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    hint = ""
    if kind == "literal_error" and isinstance(value, str):
        expected = [
            s.strip().strip("'") for s in err.get("ctx", {}).get("expected", "").replace(" or ", ",").split(",")
        ]
        hint = suggest(value, [e for e in expected if e])
    if not where:  # model-level check: the message names its keys
        return msg
    return f"{where}: {value!r} is not allowed: {msg}{hint}"


def _unsupported_settings(cfg: Config) -> list[str]:
    """Known keys whose non-default values are not implemented yet: never silently ignored."""
    problems = []
    for name, info in Config.model_fields.items():
        extra = info.json_schema_extra or {}
        if extra.get("unsupported") and getattr(cfg, name) != info.default:
            alternative = extra.get("alternative")
            status = f"is not supported; instead: {alternative}" if alternative else "is not supported yet"
            problems.append(f"{info.alias or name}: {getattr(cfg, name)!r} {status}")
    return problems


def validate_mapping(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    cleaned = _drop_nulls(dict(data))
    try:
        cfg = Config.model_validate(cleaned)
    except ValidationError as exc:
        problems = _merged_union_errors([_describe_error(e) for e in exc.errors()])
        raise ConfigError(problems, source=source) from None
    problems = _unsupported_settings(cfg) + _position_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _position_problems(cfg: Config) -> list[str]:
    """A `sequence_len` past the positions the model was trained for, when base_model is a local directory
    (a hub id is checked when the model loads): an error before any work, unless the config asks for RoPE
    scaling (`model_config: {rope_scaling: ...}`) or the model's own config.json scales RoPE already."""
    path = Path(cfg.base_model_config or cfg.base_model) / "config.json"
    try:
        model = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    model = {**model.get("text_config", {}), **model}  # multimodal configs keep the language model's inside
    overrides = cfg.model_config_overrides or {}
    limit = overrides.get("max_position_embeddings", model.get("max_position_embeddings"))
    if not isinstance(limit, int) or cfg.sequence_len <= limit:
        return []
    if any(
        _scales_rope(source.get(name)) for source in (overrides, model) for name in ("rope_scaling", "rope_parameters")
    ):
        return []
    return [
        f"sequence_len: {cfg.sequence_len} is longer than the model's max_position_embeddings ({limit}, {path}): "
        f"positions past {limit} were never trained. Set sequence_len <= {limit}, or ask for RoPE scaling, e.g. "
        f"model_config: {{rope_scaling: {{rope_type: linear, factor: {-(-cfg.sequence_len // limit)}.0}}}}"
    ]


def _scales_rope(value: Any) -> bool:
    """A `rope_scaling` / `rope_parameters` entry that stretches positions (not plain RoPE)."""
    if not isinstance(value, dict):
        return False
    kind = value.get("rope_type", value.get("type"))
    return kind not in (None, "default") or value.get("factor", 1) not in (None, 1, 1.0)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Top-level keys from the command line replace those of the file (unknown ones are errors)."""
    known = documented_fields(Config)
    unknown = [f"--{k}: unknown key{suggest(k, known)}" for k in overrides if k not in known]
    if unknown:
        raise ConfigError(unknown, source=f"{source} (command-line overrides)")
    return {**data, **overrides}


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """YAML file (+ command-line overrides) → validated, frozen Config."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return validate_mapping(data, source=str(path))
