"""Load a YAML config into a frozen `Config`, turning every problem into a message a person can act on."""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from dolphin_train.config.schema import (
    Config,
    DatasetConfig,
    LoftQSettings,
    PeftSettings,
    SpecialTokens,
    documented_fields,
)
from dolphin_train.errors import ConfigError, where_not_utf8

log = logging.getLogger(__name__)

# Nested mappings whose keys are checked against a schema (other dict-valued keys are free-form), by the
# model that holds them.
_NESTED_MODELS: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    Config: {"datasets": DatasetConfig, "special_tokens": SpecialTokens, "peft": PeftSettings},
    PeftSettings: {"loftq_config": LoftQSettings},
}


def _nested_model(model: type[BaseModel] | None, name: Any) -> type[BaseModel] | None:
    """The schema of the mapping (or list of mappings) under key `name` of `model`, if it has one."""
    return _NESTED_MODELS.get(model, {}).get(name) if model is not None else None


class _DuplicateTrackingLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of silently keeping the last one."""

    duplicates: list[tuple[str, Any, Any, int]]
    # Anchors whose value is being read, with where each starts: an alias to one of them is a value that
    # contains itself (`model_config: &x` then `  self: *x`).
    open_anchors: dict[str, yaml.Mark]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self.open_anchors:
            raise yaml.composer.ComposerError(
                f"while reading the value anchored &{event.anchor}", self.open_anchors[event.anchor],
                f"found the alias *{event.anchor} inside it: a value cannot contain itself", event.start_mark,
            )  # fmt: skip
        anchor = None if isinstance(event, yaml.AliasEvent) else event.anchor
        if anchor is None or anchor in self.open_anchors:  # a duplicate anchor: the composer says so
            return super().compose_node(parent, index)
        self.open_anchors[anchor] = event.start_mark
        try:
            return super().compose_node(parent, index)
        finally:
            del self.open_anchors[anchor]


def _construct_mapping(loader: _DuplicateTrackingLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: a key must be a name
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, "a key is a list or a mapping, not a name",
                key_node.start_mark,
            )  # fmt: skip
        k = loader.construct_object(key_node, deep=deep)
        v = loader.construct_object(value_node, deep=deep)
        if k in seen:
            loader.duplicates.append((k, seen[k], v, key_node.start_mark.line + 1))
        seen[k] = v
    return seen


_DuplicateTrackingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# Nodes a config may expand to once aliases are followed: real configs hold a few hundred; a "billion laughs"
# of nested aliases holds billions, and building them would take minutes and all the memory.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes under `node` counting each alias as a copy (memoised per node, so the count itself stays linear
    in the document; a value that contains itself was refused while composing)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


def _config_text(path: Path) -> str:
    """The file as UTF-8 text, or a ConfigError naming the encoding (UTF-16 from some Windows editors) or
    the first byte that is not UTF-8, by line."""
    raw = path.read_bytes()
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):  # fmt: skip
        if raw.startswith(bom):
            raise ConfigError([f"the file is {name} text: save it as UTF-8"], source=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, said = where_not_utf8(raw, exc)
        raise ConfigError([f"line {line}: {said}: save the file as UTF-8"], source=str(path)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file safely. Repeated keys with equal values are tolerated (the Dolphin 2.9 config
    repeats `logging_steps: 1`); repeated keys with different values are an error, since which one wins
    would be a guess."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(["is a directory, not a config file"], source=str(path))
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    loader = _DuplicateTrackingLoader(_config_text(path))
    loader.name = str(path)  # YAML errors say `in "<path>", line N`
    loader.duplicates = []
    loader.open_anchors = {}
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise ConfigError([f"aliases expand to more than {MAX_EXPANDED_NODES:,} values (a YAML alias bomb?); "
                               "refused before building them"], source=str(path))  # fmt: skip
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(path)) from None
    except RecursionError:  # PyYAML reads nested values recursively: `[[[[...` a few hundred deep
        raise ConfigError(["values nested too deeply to read (hundreds of levels)"], source=str(path)) from None
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


def parse_override_value(text: str, name: str = "value") -> Any:
    """`--learning_rate 1e-5` → 1e-05: values are read as YAML scalars, so numbers, booleans and
    lists (`--tokens '[a, b]'`) work as they would in the file. A value that starts a list or a mapping
    but is not valid YAML is an error (as text it would only fail later, as "not a valid list")."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if text.lstrip().startswith(("[", "{")):
            raise ConfigError([f"--{name}: not valid YAML: {' '.join(str(exc).split())}"], "command line") from None
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
            k: _drop_nulls(v, _nested_model(model, k))
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
        model = _nested_model(model, part) or model
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


# Keys older axolotl versions read that today's axolotl no longer accepts, under their new names.
RENAMED_IN_AXOLOTL = {"relora_steps": "jagged_restart_steps", "relora_warmup_steps": "jagged_restart_warmup_steps",
                      "relora_anneal_steps": "jagged_restart_anneal_steps"}  # fmt: skip


def _describe_error(err: Mapping[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_MEMBERS.match(p)))
    where = _format_loc(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        name = loc[-1]
        known = documented_fields(_model_at(loc[:-1]))
        if name in RENAMED_IN_AXOLOTL:
            return f"{where}: unknown key (axolotl renamed it `{RENAMED_IN_AXOLOTL[name]}`)"
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


def _takes_number_not_bool(annotation: Any) -> bool:
    """A field typed int or float (alone or in a union) and not bool: YAML's `true` must not become 1."""
    found: set[type] = set()

    def walk(tp: Any) -> None:
        if tp in (int, float, bool):
            found.add(tp)
        elif get_origin(tp) in (Union, UnionType, Annotated):
            for arg in get_args(tp):
                walk(arg)

    walk(annotation)
    return bool(found & {int, float}) and bool not in found


def _booleans_as_numbers(data: Mapping[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """pydantic reads `true` as 1 for an int field; a boolean where a number belongs is a mistake."""
    problems = []
    fields = documented_fields(model)
    for name, value in data.items():
        info = fields.get(name)
        nested = _nested_model(model, name)
        if nested is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    problems += _booleans_as_numbers(item, nested, f"{where}{name}[{i}].")
        elif nested is not None and isinstance(value, Mapping):
            problems += _booleans_as_numbers(value, nested, f"{where}{name}.")
        elif isinstance(value, bool) and info is not None and _takes_number_not_bool(info.annotation):
            problems.append(f"{where}{name}: {value!r} is not allowed: a number is expected, not a boolean")
    return problems


# Keys that name a file or directory: an empty string would mean the current directory (or nothing).
PATH_KEYS = ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir", "dataset_prepared_path",
             "output_dir", "deepspeed", "torchdistx_path")  # fmt: skip


def _empty_paths(data: Mapping[str, Any]) -> list[str]:
    empty = [k for k in PATH_KEYS if isinstance(data.get(k), str) and not data[k].strip()]
    datasets = data.get("datasets")
    for i, ds in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(ds, Mapping) and isinstance(ds.get("path"), str) and not ds["path"].strip():
            empty.append(f"datasets[{i}].path")
    return [f"{k}: an empty path is not allowed: name a file or directory" for k in empty]


def _deepspeed_file_problems(cfg: Config) -> list[str]:
    """A DeepSpeed JSON file is read at load, so that a syntax error is found by `validate`, naming the
    file and line (a missing file is only a warning there: it may exist on the training machine)."""
    if not isinstance(cfg.deepspeed, str) or not Path(cfg.deepspeed).is_file():
        return []
    try:
        settings = json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return [f"deepspeed: {cfg.deepspeed} is not UTF-8 text"]
    except json.JSONDecodeError as exc:
        return [f"deepspeed: {cfg.deepspeed}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"]
    if not isinstance(settings, dict):
        return [f"deepspeed: {cfg.deepspeed} holds a JSON {type(settings).__name__}, not a mapping of settings"]
    return []


def _directories_that_are_files(cfg: Config) -> list[str]:
    return [f"{k}: {v} is a file; it must be a directory (or not exist yet)"
            for k, v in (("output_dir", cfg.output_dir), ("dataset_prepared_path", cfg.dataset_prepared_path))
            if Path(v).expanduser().is_file()]  # fmt: skip


def validate_mapping(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    cleaned = _drop_nulls(dict(data))
    early = _booleans_as_numbers(cleaned, Config) + _empty_paths(cleaned)
    try:
        cfg = Config.model_validate(cleaned)
    except ValidationError as exc:
        problems = _merged_union_errors([_describe_error(e) for e in exc.errors()])
        raise ConfigError(early + [p for p in problems if p.split(":")[0] not in {e.split(":")[0] for e in early}],
                          source=source) from None  # fmt: skip
    problems = early + _unsupported_settings(cfg) + _deepspeed_file_problems(cfg) + _directories_that_are_files(cfg)
    problems += _position_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def missing_local_model(key: str, name: str) -> str | None:
    """For a model or tokenizer named by a local path that does not exist: the message saying so (a hub id is
    `org/name`; a path starts with `/`, `.` or `~`, or has more than one `/`). None otherwise."""
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not Path(name).expanduser().exists():
        return (
            f"{key}: {name} is a local path, and that directory does not exist (relative paths are resolved "
            f"from {Path.cwd()}; a hub model is named org/name)"
        )
    return None


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but do nothing as written: said by `validate` and logged by every command."""
    warnings = []
    if (cfg.evals_per_epoch or cfg.eval_steps) and not cfg.val_set_size:
        key = "evals_per_epoch" if cfg.evals_per_epoch else "eval_steps"
        warnings.append(f"{key} is set but there is no evaluation set (val_set_size is 0): no evaluation will run")
    return warnings
def _position_problems(cfg: Config) -> list[str]:
    """A `sequence_len` past the positions the model was trained for, when base_model is a local directory
    (a hub id is checked when the model loads): an error before any work, unless the config asks for RoPE
    scaling that reaches it (`rope_scaling`, or `model_config: {rope_scaling: ...}`), raises `rope_theta`, or
    the model's own config.json scales RoPE already."""
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
    if cfg.rope_scaling is not None and _scales_rope(cfg.rope_scaling):
        return _scaling_reach(cfg, limit, path)
    theta = model.get("rope_theta", (model.get("rope_parameters") or {}).get("rope_theta"))
    if cfg.rope_theta is not None and isinstance(theta, (int, float)) and cfg.rope_theta > theta:
        return []  # a raised base frequency ("adjusted base frequency"): the config's deliberate choice
    if any(
        _scales_rope(source.get(name)) for source in (overrides, model) for name in ("rope_scaling", "rope_parameters")
    ):
        return []
    return [
        f"sequence_len: {cfg.sequence_len} is longer than the model's max_position_embeddings ({limit}, {path}): "
        f"positions past {limit} were never trained. Set sequence_len <= {limit}, or ask for RoPE scaling, e.g. "
        f"rope_scaling: {{rope_type: yarn, factor: {-(-cfg.sequence_len // limit)}.0, "
        f"original_max_position_embeddings: {limit}}}"
    ]


def _scaling_reach(cfg: Config, limit: int, path: Path) -> list[str]:
    """`rope_scaling`'s factor times the positions it starts from must reach `sequence_len`."""
    scaling = cfg.rope_scaling or {}
    base = scaling.get("original_max_position_embeddings", limit)
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or not isinstance(base, int) or factor * base >= cfg.sequence_len:
        return []
    return [f"sequence_len: {cfg.sequence_len} is past what rope_scaling reaches: factor {factor} x {base} positions "
            f"({path}) = {int(factor * base)}; set factor: {-(-cfg.sequence_len // base)}.0 or more"]  # fmt: skip


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
    cfg = validate_mapping(data, source=str(path))
    for warning in config_warnings(cfg):
        log.warning("%s: %s", path, warning)
    return cfg
