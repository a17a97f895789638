"""The config schema: the one place where every key is named, typed, defaulted and documented.

Key names follow axolotl so that existing configs (the Dolphin recipes among them) load unchanged.
Each field's description is its documentation: the README's config reference is generated from it
(`scripts/gen_config_reference.py`, checked by a test).

A field marked `unsupported` is known (so a config using it gets a precise message instead of "unknown
key"), but setting it to anything other than its default fails with "not supported yet".
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Optimizers whose update can run per parameter during the backward pass (`optimizer_in_backward`).
IN_BACKWARD_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                          "adamw_torch")  # fmt: skip

# `eval_causal_lm_metrics` names (axolotl's list); `comet` is known so that it is refused with the reason.
CausalLMMetric = Literal["sacrebleu", "chrf", "ter", "perplexity", "comet"]
DEFAULT_CAUSAL_LM_METRICS = ("sacrebleu", "ter", "chrf")

# Optimizers whose moments ReLoRA prunes (torch's exp_avg/exp_avg_sq, bitsandbytes' state1/state2).
RELORA_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit")  # fmt: skip

SECTIONS = ("model", "data", "training", "distributed", "logging")

# Optimizers by their transformers names. A curated list (rather than transformers' own enum) keeps
# config validation free of a torch import; a test checks every name against transformers.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "adagrad",
    "rmsprop",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
    "ademamix",
    "ademamix_8bit",
    "schedule_free_adamw",
)

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def key(
    default: Any = None,
    doc: str = "",
    section: str = "training",
    unsupported: bool = False,
    alternative: str | None = None,
    **kw: Any,
):
    """A documented config key. `section` groups it in the reference; `unsupported` marks keys that only take
    their default: planned ones, or, with `alternative` (what to use instead), axolotl keys we do not carry."""
    extra: dict[str, Any] = {"section": section}
    if unsupported:
        extra["unsupported"] = True
    if alternative:
        extra["alternative"] = alternative
    return Field(default, description=doc, json_schema_extra=extra, **kw)


# `chat_template` values: ChatML, the tokenizer's own template, and the named formats of named_templates.py
# (listed here so that validating a config needs no import of the data stage; a test checks they agree).
TEMPLATE_NAMES = (
    "chatml",
    "llama3",
    "llama3_2",
    "llama4",
    "gemma",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "phi_3",
    "phi_35",
    "qwen_25",
    "qwen3",
    "deepseek_v2",
    "mistral_v1",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "cohere",
    "falcon_h1",
)
TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"

# transformers' BitsAndBytesConfig parameters that `bnb_config_kwargs` may set, with the values each takes
# (listed here so that validating a config needs no import of transformers; a test checks they agree). The
# quantisation itself (`load_in_4bit`/`load_in_8bit`) is chosen by the top-level keys.
_DTYPES = ("bfloat16", "float16", "float32")
BNB_CONFIG_VALUES: dict[str, tuple[type, ...] | tuple[str, ...]] = {
    "llm_int8_threshold": (int, float),
    "llm_int8_skip_modules": (list,),
    "llm_int8_enable_fp32_cpu_offload": (bool,),
    "llm_int8_has_fp16_weight": (bool,),
    "bnb_4bit_compute_dtype": _DTYPES,
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_use_double_quant": (bool,),
    "bnb_4bit_quant_storage": ("uint8", *_DTYPES),
}
BNB_TOP_LEVEL = ("load_in_4bit", "load_in_8bit")


def _bnb_value_problem(name: str, value: Any) -> str | None:
    allowed = BNB_CONFIG_VALUES[name]
    if all(isinstance(a, str) for a in allowed):
        return None if value in allowed else f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}"
    if isinstance(value, bool) and bool not in allowed:
        return f"{name}: {value!r} is not a number"
    if not isinstance(value, allowed):  # type: ignore[arg-type]
        return f"{name}: {value!r} is not a {' or '.join(t.__name__ for t in allowed)}"  # type: ignore[union-attr]
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        return f"{name}: {value!r} must be a list of module names"
    return None


# axolotl's plugins that map onto what dolphin-train does itself.
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
SPARSE_PLUGIN = "axolotl.integrations.llm_compressor.LLMCompressorPlugin"
KNOWN_PLUGINS = (LIGER_PLUGIN, CCE_PLUGIN, SPARSE_PLUGIN)

# transformers' FSDP sharding options (FSDP1 names; FSDP2 reads full_shard/shard_grad_op as resharding or not).
FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")

# `attention:` (axolotl's short names) and short forms of `attn_implementation` -> transformers' names.
# xformers is read as SDPA: PyTorch's memory-efficient SDPA kernel is xformers' (same attention, same memory).
ATTENTION_NAMES = {"flash": "flash_attention_2", "sdp": "sdpa", "sdpa": "sdpa", "eager": "eager",
                   "flex": "flex_attention", "xformers": "sdpa"}  # fmt: skip
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "dolphin_varlen")
# `torch.compile` arguments that `flex_attn_compile_kwargs` may set (a test checks them against torch.compile).
FLEX_COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
FLEX_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Parameter-name patterns of `unfrozen_parameters`, as axolotl reads them: a dot is a literal dot (unless
# followed by `+`), and the pattern matches from the start of the name.
_UNFROZEN_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


def unfrozen_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\.(?!\+)", "\\.", pattern))


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")  # transformers' rope_type values
ROPE_TYPES_WITH_FACTOR = ("linear", "dynamic", "yarn", "llama3")

class _Strict(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` for a float key (a learning rate, a ratio) is always a mistake.
    model_config = ConfigDict(
        frozen=True, extra="forbid", protected_namespaces=(), populate_by_name=True, allow_inf_nan=False
    )


class DatasetConfig(_Strict):
    """One entry of `datasets:`."""

    path: str = key(
        ...,
        "A local file (`.jsonl`, `.json`, `.parquet`, `.csv`, `.arrow`), a directory or glob of such files, or a "
        "Hugging Face hub dataset id (loaded with `datasets.load_dataset`).",
        "data",
    )
    type: Literal["sharegpt", "chat_template", "alpaca", "alpaca:chat", "alpaca:phi", "completion"] = key(
        "sharegpt",
        "Row format. `sharegpt`: a `conversations` list of `{from, value}` turns. `chat_template`: a `messages` "
        "list of `{role, content}` turns (OpenAI style). `alpaca`: `instruction`, optional `input`, `output`, "
        "optional `system`, trained as a one-turn conversation in the run's `chat_template`; `alpaca:chat` and "
        "`alpaca:phi` (axolotl's spellings that also pick a fixed text prompt) read the same rows the same way: "
        "the chat template formats them, so the model is trained in the format it is served with. `completion`: "
        "raw text in `field`, every token trained.",
        "data",
    )
    conversation: Literal["chatml"] = key(
        "chatml", "Prompt format for `sharegpt` rows (axolotl 0.4 key); only `chatml`.", "data"
    )
    ds_type: Literal["json", "parquet", "csv", "arrow"] | None = key(
        None, "File type, when the extension does not say it.", "data"
    )
    data_files: str | list[str] | None = key(
        None, "Files to load inside `path` (a directory or a hub dataset).", "data"
    )
    split: str = key("train", "Split to load from a hub dataset.", "data")
    name: str | None = key(None, "Configuration name of a hub dataset.", "data")
    field_messages: str | None = key(
        None,
        "Column holding the turns (default: `conversations` for sharegpt, `messages` for chat_template).",
        "data",
    )
    message_property_mappings: dict[str, str] | None = key(
        None,
        "Keys of each turn: `{role: ..., content: ...}` (default `from`/`value` for sharegpt, "
        "`role`/`content` for chat_template).",
        "data",
    )
    message_field_role: str | None = key(
        None, "Deprecated axolotl spelling of `message_property_mappings: {role: ...}`.", "data"
    )
    message_field_content: str | None = key(
        None, "Deprecated axolotl spelling of `message_property_mappings: {content: ...}`.", "data"
    )
    roles: dict[str, list[str]] | None = key(
        None,
        "Role names in the data for each role (`system`, `user`, `assistant`, `tool`), e.g. "
        "`{user: [human, user], assistant: [gpt, bot]}`; replaces the default mapping.",
        "data",
    )
    field: str | None = key(None, "Column holding the text of `completion` rows (default `text`).", "data")
    roles_to_train: list[Literal["system", "user", "assistant", "tool"]] = key(
        ["assistant"], "Roles whose turns are trained.", "data"
    )
    train_on_eos: Literal["turn", "last", "all", "none"] = key(
        "turn",
        "Which end-of-turn tokens are trained: `turn` those closing a trained turn, `last` only the last one, "
        "`all` every turn's, `none` no end-of-turn token.",
        "data",
    )
    drop_system_message: bool = key(False, "Remove system turns from this dataset's conversations.", "data")

    @model_validator(mode="after")
    def _one_spelling_per_field(self) -> DatasetConfig:
        mapped = self.message_property_mappings or {}
        for name, old in (("role", self.message_field_role), ("content", self.message_field_content)):
            if old is not None and mapped.get(name, old) != old:
                raise ValueError(
                    f"message_field_{name}: {old!r} and message_property_mappings.{name}: {mapped[name]!r} "
                    "disagree; keep message_property_mappings"
                )
        return self

    @property
    def property_mappings(self) -> dict[str, str]:
        """Keys of each turn, merging the deprecated `message_field_*` spellings."""
        old = {"role": self.message_field_role, "content": self.message_field_content}
        return {**{k: v for k, v in old.items() if v is not None}, **(self.message_property_mappings or {})}


class SpecialTokens(_Strict):
    """`special_tokens:` tokens set on the tokenizer (added to the vocabulary when new)."""

    bos_token: str | None = key(None, "Beginning-of-sequence token.", "model")
    eos_token: str | None = key(None, "End-of-sequence token; `<|im_end|>` for ChatML chat models.", "model")
    pad_token: str | None = key(None, "Padding token (never trained on).", "model")
    unk_token: str | None = key(None, "Unknown token.", "model")


class SparseFinetuning(_Strict):
    """`llmcompressor:` axolotl's sparse fine-tuning block (LLM Compressor's recipe format)."""

    recipe: dict[str, Any] | str = key(
        ...,
        "An LLM Compressor recipe: stages whose `*_modifiers` hold one `ConstantPruningModifier` with `targets` "
        "(parameter names, or `re:` regular expressions matched from the start of the name); the zeros of the "
        "targeted weights stay zero for the whole run. Other modifiers are refused.",
        "training",
    )
    save_compressed: bool = key(
        False,
        "Accepted as LLM Compressor reads it today: compressed-tensors no longer has a sparse storage format, so "
        "the model is written dense either way (safetensors), with the recipe next to it as `recipe.yaml`.",
        "training",
    )

    @field_validator("recipe")
    @classmethod
    def _only_constant_pruning(cls, recipe: dict[str, Any] | str) -> dict[str, Any] | str:
        pruning_targets(recipe)
        return recipe

    @property
    def targets(self) -> tuple[str, ...]:
        return pruning_targets(self.recipe)


def pruning_targets(recipe: Any) -> tuple[str, ...]:
    """The `targets` of the recipe's ConstantPruningModifier(s); anything else in the recipe is an error."""
    if not isinstance(recipe, dict):
        raise ValueError("give the recipe inline, as a mapping of stages to their *_modifiers")
    targets: list[str] = []
    for stage_name, stage in recipe.items():
        groups = stage.items() if isinstance(stage, dict) else ()
        modifiers = [(g, m) for g, m in groups if g.endswith("_modifiers") and isinstance(m, dict)]
        if not modifiers:
            raise ValueError(f"recipe stage {stage_name}: expected `<name>_modifiers:` holding the modifiers")
        for _, group in modifiers:
            for name, args in group.items():
                targets += _constant_pruning_targets(name, args or {})
    if not targets:
        raise ValueError("the recipe names no ConstantPruningModifier targets")
    return tuple(targets)


def _constant_pruning_targets(name: str, args: dict[str, Any]) -> list[str]:
    if name != "ConstantPruningModifier":
        raise ValueError(f"{name}: not supported; dolphin-train runs LLM Compressor's ConstantPruningModifier only "
                         "(sparse fine-tuning that keeps a sparse model's zeros)")  # fmt: skip
    unknown = set(args) - {"targets", "start", "end"}
    if unknown:
        raise ValueError(f"ConstantPruningModifier: unknown argument(s) {', '.join(sorted(unknown))}")
    if args.get("start") not in (None, 0, -1) or args.get("end") not in (None, -1):
        raise ValueError("ConstantPruningModifier: the zeros are held for the whole run; a start or end epoch "
                         "other than 0 / -1 is not supported")  # fmt: skip
    targets = args.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError("ConstantPruningModifier: targets must name parameters (e.g. 're:.*q_proj.weight')")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ValueError(f"ConstantPruningModifier target {t!r}: not a regular expression ({e})") from e
    return targets


class LoftQSettings(_Strict):
    """`peft.loftq_config:` LoftQ initialisation of a new LoRA adapter."""

    loftq_bits: Literal[4, 8] = key(
        4,
        "LoftQ: start a new LoRA adapter (`adapter: lora`) over the base quantised to this many bits (4: NF4, "
        "8: row-wise int8, bitsandbytes' quantisers), with the adapter initialised so that quantised base + "
        "adapter is close to the original weights. The quantised base is what trains (kept in the compute "
        "dtype) and is saved next to the adapter (`loftq_base.safetensors`), which `merge-lora` and `chat` use.",
        "model",
    )
    loftq_iter: int = key(
        1,
        "LoftQ's alternating rounds (quantise, then fit the low-rank correction to what quantisation missed); "
        "peft's `loftq_iter`.",
        "model",
        ge=1,
        le=20,
    )


class PeftSettings(_Strict):
    """`peft:` axolotl's extra peft settings."""

    loftq_config: LoftQSettings | None = key(
        None, "LoftQ initialisation of the adapter (the `peft.loftq_config.*` keys).", "model"
    )  # fmt: skip


class Config(_Strict):
    """A whole run. Immutable once loaded; values derived from it live in `RuntimeSettings` and plans."""

    # ---- model ---------------------------------------------------------------------------------
    base_model: str = key(
        ...,
        "Hugging Face model id or local directory. With `train_from_scratch: true`, only its config.json "
        "is used and the weights are randomly initialised.",
        "model",
    )
    base_model_config: str | None = key(
        None, "Where to read the model's config.json from, if not `base_model`.", "model"
    )
    model_type: str = key(
        "AutoModelForCausalLM",
        "transformers class used to load the model (`AutoModelForCausalLM` or a `...ForCausalLM` class).",
        "model",
    )
    tokenizer_config: str | None = key(None, "Tokenizer id or directory, if not `base_model`.", "model")
    tokenizer_type: str = key(
        "AutoTokenizer",
        "transformers tokenizer class that loads the tokenizer (`AutoTokenizer`, or a class such as "
        "`PreTrainedTokenizerFast`); it must give a fast (Rust) tokenizer.",
        "model",
    )
    tokenizer_use_fast: bool = key(
        True,
        "axolotl's switch for the slow tokenizer. dolphin-train always uses the Rust (fast) tokenizer, whose "
        "character offsets the masking relies on and whose ids equal the slow tokenizer's; `false` says so in "
        "the log (the Dolphin 2.9 recipe sets it).",
        "model",
    )
    trust_remote_code: bool = key(
        False, "Allow model code from the hub repository to run. Off unless you opt in.", "model"
    )
    model_config_overrides: dict[str, Any] | None = key(
        None,
        "Values that override the model's config.json (for example `rope_scaling`).",
        "model",
        alias="model_config",
    )
    rope_theta: float | None = key(
        None,
        "RoPE's base frequency, over the model's config.json (axolotl's key). Raising it (\"adjusted base "
        "frequency\") is one way to train past the positions the model was trained for.",
        "model",
        gt=0,
    )
    rope_scaling: dict[str, Any] | None = key(
        None,
        "RoPE scaling over the model's config.json, as transformers reads it (axolotl's key), e.g. "
        "`{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8192}`; `rope_type` one of "
        "linear, dynamic, yarn, longrope, llama3 (older configs' `type` is read as `rope_type`).",
        "model",
    )
    train_from_scratch: bool = key(
        False, "Initialise the weights randomly from the model config instead of loading them.", "model"
    )
    special_tokens: SpecialTokens = key(SpecialTokens(), "Tokens to set as bos/eos/pad/unk.", "model")
    tokens: list[str] = key(
        [],
        "Extra tokens added to the vocabulary (for example `<|im_start|>`, `<|im_end|>`); embeddings are "
        "resized and new rows start at the mean of the existing ones.",
        "model",
    )
    added_tokens_overrides: dict[int, str] | None = key(
        None,
        "Give existing tokens new strings instead of growing the vocabulary, e.g. `{128002: \"<|im_start|>\", "
        "128003: \"<|im_end|>\"}` on Llama-3, whose 248 `<|reserved_special_token_N|>` are untrained: nothing is "
        "resized, and their rows start at the mean of the others, as new rows do. `tokens` and the ChatML "
        "markers then find them in the vocabulary.",
        "model",
    )
    load_in_8bit: bool = key(
        False, "Load the base weights in 8 bits (bitsandbytes LLM.int8); needs `adapter: lora`.", "model"
    )
    load_in_4bit: bool = key(
        False,
        "Load the base weights in 4 bits (bitsandbytes NF4, double quantisation, compute dtype from "
        "bf16/fp16, quant storage set for ZeRO-3 sharding); needs `adapter: qlora`.",
        "model",
    )
    bnb_config_kwargs: dict[str, Any] | None = key(
        None,
        "bitsandbytes settings over the ones `load_in_4bit`/`load_in_8bit` choose, as transformers' "
        "`BitsAndBytesConfig` names them: `bnb_4bit_use_double_quant`, `bnb_4bit_quant_type` (`nf4`, `fp4`), "
        "`bnb_4bit_compute_dtype`, `bnb_4bit_quant_storage`, `llm_int8_threshold`, `llm_int8_skip_modules`, "
        "`llm_int8_has_fp16_weight`, `llm_int8_enable_fp32_cpu_offload`. Keys that contradict the config "
        "(a compute dtype other than bf16/fp16's, a storage dtype under DeepSpeed/FSDP, 4-bit keys with "
        "`load_in_8bit`) are refused; `plan` counts the quantisation constants they imply.",
        "model",
    )
    adapter: Literal["lora", "qlora"] | None = key(
        None,
        "Train a LoRA adapter (`lora`) or a LoRA over 4-bit base weights (`qlora`) instead of all weights.",
        "model",
    )
    lora_r: int = key(8, "LoRA rank.", "model", ge=1)
    lora_alpha: int = key(16, "LoRA scaling numerator (the update is scaled by alpha / r).", "model", ge=1)
    lora_dropout: float = key(0.0, "Dropout on the LoRA input.", "model", ge=0, lt=1)
    lora_target_modules: list[str] | str | None = key(
        None,
        "Module names LoRA adapts (e.g. `[q_proj, v_proj]`), or one regular expression over full module names "
        "(as peft reads a string, e.g. `model.layers.[0-9]+.self_attn.(q|v)_proj`); default every linear layer.",
        "model",
    )
    lora_target_linear: bool | None = key(
        None,
        "Adapt every linear layer except the output head (the default when no modules are named; with "
        "`lora_target_modules` too, as in axolotl, the union: every linear layer); `false` requires "
        "`lora_target_modules`.",
        "model",
    )
    lora_modules_to_save: list[str] | None = key(
        None,
        "Modules trained in full next to the adapter. When tokens are added, the input and output embeddings "
        "are added automatically; a list without them is rejected then, since the new rows would stay untrained.",
        "model",
    )
    lora_model_dir: str | None = key(None, "Continue training from this saved adapter.", "model")
    peft_use_dora: bool = key(False, "DoRA: weight-decomposed LoRA.", "model")
    peft_use_rslora: bool = key(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.", "model")
    lora_fan_in_fan_out: bool | None = key(
        None,
        "peft's `fan_in_fan_out`: the adapted layers store their weight as (in, out), as GPT-2's Conv1D layers "
        "do. Passed to peft, which sets it from each layer's type anyway (and warns when the value disagrees).",
        "model",
    )
    peft: PeftSettings | None = key(
        None, "axolotl's extra peft settings: `loftq_config` (below).", "model"
    )  # fmt: skip
    low_cpu_mem_usage: Literal[True] = key(
        True,
        "axolotl's switch for loading weights without a first random initialisation: transformers always "
        "loads so now, so only `true` is accepted.",
        "model",
    )
    strict: bool = key(
        False,
        "axolotl's `strict`; only `false` (dolphin-train always rejects unknown keys).",
        "model",
        unsupported=True,
    )
    gemma4_hybrid_attn_impl: bool = key(
        False,
        "Gemma 4's global-attention layers have head_dim 512, more than flash-attn serves (256): run the "
        "sliding-window layers under flash-attn (`attn_implementation: flash_attention_2`, the default with this "
        "key) and the global layers under PyTorch SDPA, with a block-diagonal mask when rows are packed. On a "
        "machine without flash-attn (or without CUDA) every layer runs SDPA, as the log says. The model must "
        "mix sliding-window and global layers.",
        "model",
    )
    flash_attention: bool = key(
        False,
        "Use flash-attn 2 varlen kernels when installed on a CUDA machine; otherwise the best available "
        "backend is used and logged (PyTorch SDPA with a block-diagonal mask for packed rows).",
        "model",
    )
    sdp_attention: bool = key(False, "Use PyTorch scaled-dot-product attention (the default).", "model")
    xformers_attention: bool = key(
        False,
        "axolotl's xformers attention, read as PyTorch SDPA (`attn_implementation: sdpa`): PyTorch's "
        "memory-efficient SDPA kernel is xformers' own, so the attention and its memory are the same; the "
        "xformers package is not used, and the log says so.",
        "model",
    )
    attn_implementation: str | None = key(
        None,
        "Force a transformers attention implementation: "
        + ", ".join(f"`{a}`" for a in ATTN_IMPLEMENTATIONS)
        + " (axolotl's short forms `flash`, `sdp`, `flex` are read as those, `xformers` as `sdpa`: see "
        "`xformers_attention`), or a kernel from the hub "
        "(`org/name`).",
        "model",
    )
    attention: Literal["flash", "sdpa", "sdp", "eager", "flex", "xformers"] | None = key(
        None,
        "axolotl's short name for the attention backend: `flash` is `flash_attention: true` (flash-attn, else "
        "PyTorch's varlen flash attention, on CUDA), the others set `attn_implementation` (`sdpa`, `eager`, "
        "`flex_attention`; `xformers`: `sdpa`).",
        "model",
    )
    flex_attn_compile_kwargs: dict[str, Any] | None = key(
        None,
        "With `attn_implementation: flex_attention`: the `torch.compile` arguments for flex attention ("
        + ", ".join(f"`{k}`" for k in FLEX_COMPILE_KEYS)
        + "), e.g. `{dynamic: false, mode: max-autotune-no-cudagraphs}`; transformers compiles it with the "
        "defaults otherwise. With `torch_compile`, the attention then runs as its own compiled graph inside each "
        "compiled layer.",
        "model",
    )
    liger_kernel: bool = key(
        True,
        "Use Liger's Triton kernels on a CUDA machine where `liger-kernel` is installed (its fused linear "
        "cross-entropy, plus the kernels the `liger_*` keys pick); `false`: never.",
        "model",
    )
    plugins: list[str] | None = key(
        None,
        "axolotl plugins. dolphin-train has no plugin system; these map onto its own paths: "
        f"`{LIGER_PLUGIN}` (`liger_kernel` and the `liger_*` keys), `{CCE_PLUGIN}` (the chunked loss, see "
        f"`cut_cross_entropy`) and `{SPARSE_PLUGIN}` (`llmcompressor`). Any other plugin is refused.",
        "model",
    )
    liger_rope: bool | None = key(None, "Liger's rotary-embedding kernel (with `liger_kernel`, on CUDA).", "model")
    liger_rms_norm: bool | None = key(None, "Liger's RMSNorm kernel (with `liger_kernel`, on CUDA).", "model")
    liger_rms_norm_gated: bool | None = key(
        None,
        "A fused RMSNorm + SiLU-gate kernel for the gated RMSNorm layers of linear-attention models (transformers' "
        "`...RMSNormGated` modules: Qwen 3.5, Qwen3-Next, Mamba-2 hybrids), as axolotl fuses them: each such layer "
        "is compiled with torch.compile, which fuses the normalisation and the gate into one kernel (with "
        "`liger_kernel`, on CUDA; Liger itself has no gated-RMSNorm kernel). A model without such layers (Gemma 4, "
        "whose axolotl example sets it) has nothing to fuse: the log says so.",
        "model",
    )
    liger_layer_norm: bool | None = key(None, "Liger's LayerNorm kernel (with `liger_kernel`, on CUDA).", "model")
    liger_glu_activation: bool | None = key(
        None, "Liger's SwiGLU/GeGLU MLP kernel (with `liger_kernel`, on CUDA).", "model"
    )
    liger_cross_entropy: bool | None = key(
        None, "Liger's cross-entropy kernel (with `liger_kernel`, on CUDA).", "model"
    )
    fused_attn_kernel: bool = key(
        False,
        "axolotl's fused q/k RMSNorm + rotary-embedding kernel for attention, read as `liger_rms_norm` and "
        "`liger_rope`: Liger's kernels for the same operations (with `liger_kernel`, on CUDA).",
        "model",
    )
    liger_fused_linear_cross_entropy: bool | None = key(
        None,
        "Liger's fused output-head + cross-entropy kernel (with `liger_kernel`, on CUDA; on by default there).",
        "model",
    )
    resize_token_embeddings_to_32x: bool = key(
        False,
        "When tokens are added, round the embedding matrix up to a multiple of 32 rows (faster matrix shapes on "
        "GPUs); the extra rows belong to no token.",
        "model",
    )
    unfrozen_parameters: list[str] | None = key(
        None,
        "Train only the parameters whose names match one of these patterns (axolotl's reading: a pattern matches "
        "from the start of the name, `.` is a literal dot, e.g. `^lm_head.weight$`, `model.layers.2[0-9]+`); "
        "every other parameter is frozen, with an adapter too (its weights in non-matching modules). Counted in "
        "the plan's trainable parameters.",
        "model",
    )
    bfloat16: bool = key(
        False,
        "Keep the weights themselves in bfloat16 (no float32 master copy for full fine-tuning: half the weight "
        "memory, at some cost in precision for small updates); `bf16` still decides the compute precision.",
        "model",
    )
    float16: bool = key(
        False,
        "Keep the weights in float16 and compute in float16, without mixed precision or a loss scaler "
        "(axolotl's `float16`): half the weight memory, but updates smaller than a weight's float16 precision "
        "are lost and small gradients can underflow to zero (the log warns). `fp16: true` (mixed precision with "
        "a loss scaler) or `bfloat16: true` are the safer choices. `bf16: auto` resolves to off with it.",
        "model",
    )
    is_llama_derived_model: bool | None = key(
        None,
        "axolotl metadata, accepted: the architecture is read from the model's config.json; a value that "
        "contradicts it is reported as a warning when the model config loads.",
        "model",
    )
    is_mistral_derived_model: bool | None = key(None, "As `is_llama_derived_model`, for Mistral.", "model")
    is_qwen_derived_model: bool | None = key(None, "As `is_llama_derived_model`, for Qwen.", "model")
    is_falcon_derived_model: bool | None = key(None, "As `is_llama_derived_model`, for Falcon.", "model")
    gptq: bool = key(
        False, "GPTQ-quantised base weights.", "model", unsupported=True,
        alternative="load_in_4bit: true with adapter: qlora (bitsandbytes NF4)",
    )  # fmt: skip
    gptq_groupsize: int | None = key(
        None, "GPTQ group size.", "model", unsupported=True, alternative="load_in_4bit: true with adapter: qlora"
    )
    gptq_model_v1: bool | None = key(
        None, "GPTQ v1 checkpoint.", "model", unsupported=True, alternative="load_in_4bit: true with adapter: qlora"
    )
    flash_attn_cross_entropy: bool = key(
        False, "flash-attn's fused cross-entropy (axolotl's old path).", "model", unsupported=True,
        alternative="chunked_cross_entropy: true, or liger_kernel on CUDA",
    )  # fmt: skip
    flash_attn_rms_norm: bool = key(
        False,
        "axolotl's fused RMSNorm of its old flash-attn path, read as `liger_rms_norm: true`: Liger's fused "
        "RMSNorm kernel (with `liger_kernel`, on CUDA), the same normalisation.",
        "model",
    )
    flash_attn_fuse_qkv: bool = key(
        False, "Fused QKV projection (axolotl's old flash-attn path).", "model", unsupported=True,
        alternative="flash_attention: true (the fusion is not carried)",
    )  # fmt: skip
    flash_attn_fuse_mlp: bool = key(
        False,
        "axolotl's fused SwiGLU MLP of its old flash-attn path (xformers' SwiGLU), read as "
        "`liger_glu_activation: true`: Liger's fused SwiGLU kernel (with `liger_kernel`, on CUDA), the same MLP.",
        "model",
    )
    flash_optimum: bool = key(
        False, "BetterTransformer attention through optimum.", "model", unsupported=True,
        alternative="flash_attention: true or attn_implementation: sdpa",
    )  # fmt: skip
    lora_mlp_kernel: bool = key(
        False,
        "Run each LoRA-adapted gated MLP (Llama, Mistral, Qwen, Gemma) as one fused function that keeps half the "
        "activations the plain one keeps for the backward pass (same values and gradients; checked against the "
        "model's own MLP before training). Needs `lora_dropout: 0`.",
        "model",
    )
    lora_qkv_kernel: bool = key(
        False,
        "Compute each LoRA-adapted q/k/v projection (base and LoRA) as one fused function that keeps only its "
        "input and the rank-sized LoRA intermediate. Needs `lora_dropout: 0`.",
        "model",
    )
    lora_o_kernel: bool = key(
        False, "As `lora_qkv_kernel`, for the attention's output projection (`o_proj`).", "model"
    )
    torchdistx_path: str | None = key(
        None, "torchdistx deferred initialisation.", "model", unsupported=True,
        alternative="nothing: DeepSpeed ZeRO-3 and FSDP shard the weights as they load",
    )  # fmt: skip

    # ---- data ----------------------------------------------------------------------------------
    datasets: list[DatasetConfig] = key(..., "Training data, mixed together.", "data", min_length=1)
    chat_template: str | None = key(
        None,
        "Template that turns conversations into tokens, saved with the tokenizer: `chatml`; a model family's "
        "published format: " + ", ".join(f"`{n}`" for n in TEMPLATE_NAMES[1:]) + "; `tokenizer_default`: the "
        "tokenizer's own Jinja template; or `tokenizer_default_fallback_NAME`: the tokenizer's, else NAME. Same "
        "masking rule for all. Default, as in axolotl: `tokenizer_default` when a dataset has `type: "
        "chat_template`, else `chatml`.",
        "data",
    )
    eot_tokens: list[str] | None = key(
        None,
        "End-of-turn tokens trained after each trained turn, where the template writes one right after the "
        "content (default: the named template's own, e.g. `<|eot_id|>`, `<end_of_turn>`; for "
        "`tokenizer_default`, any added token). Each must be a single token.",
        "data",
    )
    push_dataset_to_hub: str | None = key(
        None, "Upload the prepared data to the hub.", "data", unsupported=True,
        alternative="the prepared data is a local cache (dataset_prepared_path)",
    )  # fmt: skip
    max_packed_sequence_len: int | None = key(
        None, "axolotl's old packing length.", "data", unsupported=True,
        alternative="sample_packing: true with sequence_len",
    )  # fmt: skip
    default_system_message: str | None = key(None, "System message added to conversations that have none.", "data")
    skip_invalid_rows: bool = key(
        False,
        "Drop malformed rows (counted per reason) instead of failing before tokenization.",
        "data",
    )
    dataset_exact_deduplication: bool = key(
        False,
        "Drop every row whose tokens and labels repeat an earlier row's exactly (as axolotl: after tokenization, "
        "before the evaluation split, so no evaluation row repeats a training row); counted in the report.",
        "data",
    )
    special_tokens_in_content: bool = key(
        False,
        "Whether special-token text inside a message (`<|im_end|>`, `<|eot_id|>`, the BOS/EOS strings...) becomes "
        "the special token. By default it is tokenized as ordinary text, so only the chat template writes turn "
        "markers (scraped text holds such strings); rows that held some are counted in the preparation report. "
        "`true` keeps them as tokens, for data that means them.",
        "data",
    )
    shuffle_merged_datasets: bool = key(
        True,
        "Shuffle the mixed datasets with `seed` (not with `curriculum_sampling`, which keeps their order).",
        "data",
    )
    dataset_prepared_path: str = key(
        "last_run_prepared",
        "Directory for the tokenized-data cache; each preparation lives in a subdirectory named by a "
        "fingerprint of the data files' contents, the tokenizer and the keys that change tokens.",
        "data",
    )
    dataset_num_proc: int | None = key(
        None, "Processes used for tokenization (default: the number of CPU cores, at most 8).", "data", ge=1
    )
    val_set_size: float = key(
        0.0,
        "Held-out evaluation set: a fraction of the rows (0 < x < 1) or a number of rows (x >= 1); split with `seed`.",
        "data",
        ge=0,
    )
    sequence_len: int = key(2048, "Maximum tokens per training row.", "data", ge=16)
    excess_length_strategy: Literal["drop", "truncate"] = key(
        "drop",
        "What happens to a conversation longer than `sequence_len`: `drop` it, or `truncate` it to "
        "`sequence_len` tokens. Either way it is counted and reported.",
        "data",
    )
    train_on_inputs: bool = key(
        False, "Train on every token (system and user turns included), not only assistant turns.", "data"
    )
    sample_packing: bool = key(
        False,
        "Pack several conversations into each row of `sequence_len` tokens (position ids restart per "
        "conversation; attention never crosses conversations).",
        "data",
    )
    sample_packing_sequentially: bool = key(
        False,
        "Pack by next fit in dataset order (each conversation joins the current row, or starts a new one when "
        "it does not fit) instead of best fit by length: conversations keep their order within and across "
        "rows, for a few percent more rows. With `curriculum_sampling`, training sees the data in file order.",
        "data",
    )
    curriculum_sampling: bool = key(
        False,
        "Train on the rows in dataset order, not shuffled (curriculum learning): the datasets are not "
        "shuffled when mixed (the held-out split keeps the order too) and the Trainer reads rows in order. "
        "With `sample_packing`, needs `sample_packing_sequentially` (best-fit packing reorders the rows).",
        "data",
    )
    eval_sample_packing: bool | None = key(
        None, "Pack the evaluation set too (default: same as `sample_packing`).", "data"
    )
    pad_to_sequence_len: bool = key(
        False, "Pad every row to exactly `sequence_len` tokens (stable memory use and kernel shapes).", "data"
    )
    group_by_length: bool = key(False, "Batch rows of similar length.", "data", unsupported=True)

    # ---- training ------------------------------------------------------------------------------
    output_dir: str = key("./outputs", "Where checkpoints and the final model are written.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = key(
        1,
        "Rows per device per forward pass. `auto`: the largest that fits the GPU found at launch (`plan "
        "--gpus N --gpu-memory X` and the run overview say which), with `batch_size` kept as the effective batch.",
    )
    batch_size: int | None = key(
        None,
        "Rows per optimizer step per device (axolotl's key): with `micro_batch_size: auto`, accumulation makes "
        "up the rest, so the effective batch stays as set; without `gradient_accumulation_steps`, as in axolotl, "
        "accumulation is batch_size / micro_batch_size; otherwise it must equal micro_batch_size x "
        "gradient_accumulation_steps.",
        ge=1,
    )
    gradient_accumulation_steps: int = key(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_epochs: float = key(1.0, "Passes over the training data.", gt=0)
    max_steps: int | None = key(None, "Stop after this many optimizer steps (overrides `num_epochs`).", ge=1)
    learning_rate: float = key(2e-5, "Peak learning rate.", gt=0)
    lr_scheduler: str = key("cosine", f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}.")
    lr_scheduler_kwargs: dict[str, Any] | None = key(None, "Extra arguments for the scheduler.")
    cosine_min_lr_ratio: float | None = key(
        None,
        "With `lr_scheduler: cosine`: decay to `learning_rate` x this ratio instead of 0 (transformers' "
        "`cosine_with_min_lr` schedule, its `min_lr_rate`); 1.0 keeps the learning rate constant after warmup.",
        ge=0,
        le=1,
    )
    cosine_constant_lr_ratio: float | None = key(
        None,
        "With `cosine_min_lr_ratio`: the cosine reaches its minimum after this fraction of all steps and the "
        "learning rate stays there to the end (e.g. 0.8: constant over the last 20%). 0 reads as unset, as in "
        "axolotl: the decay spans the whole run.",
        ge=0,
        le=1,
    )
    warmup_steps: int | None = key(None, "Linear warmup, in optimizer steps.", ge=0)
    warmup_ratio: float | None = key(None, "Linear warmup, as a fraction of all steps.", ge=0, lt=1)
    weight_decay: float = key(0.0, "Decoupled weight decay.", ge=0)
    optimizer: str = key("adamw_torch", f"Optimizer, by its transformers name: {', '.join(OPTIMIZERS)}.")
    adam_beta1: float | None = key(None, "Adam beta1 (default 0.9).", gt=0, lt=1)
    adam_beta2: float | None = key(None, "Adam beta2 (default 0.999).", gt=0, lt=1)
    adam_epsilon: float | None = key(None, "Adam epsilon (default 1e-8).", gt=0)
    max_grad_norm: float = key(1.0, "Gradient clipping norm (0 disables clipping).", ge=0)
    bf16: bool | Literal["auto"] = key(
        "auto", "bfloat16 mixed precision; `auto`: on when the GPU supports it, off on the CPU."
    )
    fp16: bool | None = key(None, "float16 mixed precision (only when bf16 is off).")
    tf32: bool | Literal["auto"] = key(False, "Allow TF32 matmuls on Ampere or newer GPUs; `auto`: when available.")
    gradient_checkpointing: bool | Literal["offload", "auto"] = key(
        False,
        "Recompute activations in the backward pass to save memory, keeping only each checkpointed layer's "
        "input. `offload` (axolotl's spelling): checkpointing with `activation_offloading`. `auto`: the "
        "cheapest setting that fits the GPU (none, every 4th or every 2nd layer, all layers, then offloading), "
        "chosen by the plan at launch.",
    )
    gradient_checkpointing_layers: int = key(
        1,
        "Checkpoint every N-th decoder layer (1: all of them; 2: half, so half the recomputation for about "
        "half the saving). Selective checkpointing for when all layers' activations almost fit.",
        ge=1,
    )
    activation_offloading: bool | Literal["auto"] = key(
        False,
        "Keep the checkpointed layers' inputs in (pinned) CPU memory and bring each back for its backward "
        "pass: activation memory on the GPU stays at about one layer's, whatever the sequence length. Needs "
        "`gradient_checkpointing`. `auto`: when the plan finds it needed to fit.",
    )
    tiled_mlp: bool | Literal["auto"] = key(
        False,
        "Run each decoder layer's MLP over the sequence a chunk at a time, keeping only its input and "
        "recomputing each chunk in the backward pass (Arctic Long Sequence Training's TiledMLP): the MLP's "
        "intermediates, the largest activations of a layer, then scale with a chunk instead of the sequence. "
        "For long contexts; costs one more MLP forward pass. `auto`: when the plan finds it needed to fit.",
    )
    tiled_mlp_num_shards: int | None = key(
        None,
        "Chunks the sequence is split into for `tiled_mlp` (default: chunks of about 1,024 tokens, or of "
        "`hidden_size` tokens when that is smaller).",
        ge=1,
    )
    fp8: bool = key(
        False,
        "Float8 matrix products for the decoder's linear layers (torchao's float8 training, rowwise scaling: "
        "each row of activations and each column of weights scaled to the float8 range on its own), on GPUs "
        "with compute capability 8.9 or newer (H100, H200, L40S). Full fine-tuning; the output head stays "
        "bf16. Faster matrix products for a small loss in precision (the GPU check compares the loss curve).",
    )
    fp8_enable_fsdp_float8_all_gather: bool = key(
        False,
        "With `fp8: true` and FSDP2: FSDP gathers the sharded weights in float8 rather than bf16 (half the "
        "all-gather traffic; torchao's `enable_fsdp_float8_all_gather`). This needs one scale per weight, so "
        "the float8 layers use tensorwise scaling instead of rowwise.",
        "distributed",
    )
    torch_compile: bool | Literal["auto"] = key(
        False,
        "Compile each decoder layer with torch.compile (regional compilation: minutes less to compile than the "
        "whole model, and it works with checkpointing); the first step's compilation time is reported apart "
        "from the step time. `auto`: on a CUDA GPU.",
    )
    torch_compile_backend: str | None = key(
        None, "torch.compile backend (default `inductor`; `aot_eager` checks the compiled graph without codegen)."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = key(
        None,
        "torch.compile's mode for the compiled layers (inductor only): `max-autotune` searches the fastest "
        "kernels (a longer first step), `reduce-overhead` adds CUDA graphs.",
    )
    optimizer_in_backward: bool = key(
        False,
        "Update each parameter during the backward pass, as soon as its gradient is complete, and free the "
        "gradient at once: full gradients are never held (for full fine-tuning on one GPU, with `bfloat16: "
        "true` and `optimizer: adamw_torch_8bit`, whose updates round stochastically). One process; needs "
        f"`gradient_accumulation_steps: 1` and `max_grad_norm: 0`; optimizers: {', '.join(IN_BACKWARD_OPTIMIZERS)}.",
    )
    lisa_n_layers: int | None = key(
        None,
        "LISA (layerwise importance sampling): full fine-tuning in which only this many decoder layers, drawn "
        "at random, are trained at a time (the embeddings, final norm and output head always are), drawn anew "
        "every `lisa_step_interval` steps; the draw depends only on `seed` and the step, so a resumed run draws "
        "the same layers. One process, no adapter, DeepSpeed or FSDP. The plan counts every layer as trained "
        "(the optimizer keeps states for each layer once drawn).",
        ge=1,
    )
    lisa_step_interval: int | None = key(
        None, "Optimizer steps between two draws of LISA's layers (default 20).", ge=1
    )
    lisa_layers_attribute: str | None = key(
        None,
        "Where LISA finds the decoder layers: a dotted path from the model, e.g. `model.layers` (default: the "
        "model's longest list of modules, its decoder layers).",
    )
    relora: bool | None = key(
        None,
        "ReLoRA (arXiv:2307.05695): every `jagged_restart_steps` optimizer steps, merge the LoRA update into the "
        "base weights (a 4-bit base dequantised, added to and re-quantised), start LoRA again (A drawn anew, B "
        "zero) and prune its optimizer states (`relora_prune_ratio`), with the jagged learning-rate schedule: a "
        "sum of low-rank updates reaches a high-rank one. Needs `adapter: lora` or `qlora` with Adam "
        "(`adamw_torch`, `adamw_torch_fused`, bitsandbytes' AdamW); no DeepSpeed, FSDP, 8-bit base or DoRA. "
        "Checkpoints after the first restart also hold the adapted layers' base weights "
        "(`relora_base.safetensors`, for resuming); the final output is the whole merged model (a 4-bit base "
        "dequantised), not an adapter.",
    )
    relora_prune_ratio: float | None = key(
        None,
        "Fraction of each LoRA parameter's Adam moments zeroed at every ReLoRA restart (default 0.9; 0.999 with "
        "`relora_prune_method: reset`). bitsandbytes' 8-bit moments are pruned by their values.",
        ge=0.0,
        le=1.0,
    )
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = key(
        None,
        "How ReLoRA prunes the moments: `magnitude` (default) zeroes the smallest, `random` a random fraction, "
        "`reset` a random 99.9% unless `relora_prune_ratio` says otherwise (the paper's reset). Random draws "
        "depend on `seed` and the restart.",
    )
    relora_cpu_offload: bool | None = key(
        None, "Do ReLoRA's merge arithmetic (the update and the float32 sum) in CPU memory, to spare GPU memory."
    )
    jagged_restart_steps: int | None = key(
        None,
        "Optimizer steps between two ReLoRA restarts; on its own, the period of the jagged learning-rate "
        "schedule: the configured schedule multiplied by a factor that falls to 0.001 at each restart, rises "
        "back over `jagged_restart_warmup_steps` and falls over `jagged_restart_anneal_steps` before the next.",
        ge=1,
    )
    jagged_restart_warmup_steps: int | bool | None = key(
        None, "Warmup steps after each jagged restart (default 10; 0 or `false` too means 10, as in axolotl).", ge=0
    )
    jagged_restart_anneal_steps: int | bool | None = key(
        None,
        "Steps of the fall before each jagged restart after the first; the factor is (steps left)/(this), "
        "so 1, the default (also for 0 or `false`), means none.",
        ge=0,
    )
    chunked_cross_entropy: bool | None = key(
        None,
        "Compute the loss from hidden states in chunks, only at trained positions, so the full logits "
        "(tokens x vocabulary) are never materialised. Default: on for vocabularies of 64k tokens or more, "
        "unless `lm_head` is in `lora_target_modules` (not supported).",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = key(
        None, "Arguments for gradient checkpointing, e.g. `use_reentrant: false`."
    )
    seed: int = key(
        42,
        "Seed for data splitting, shuffling, packing order and initialisation (a from-scratch model, a new "
        "LoRA adapter).",
    )
    resume_from_checkpoint: str | bool | None = key(
        None,
        "A checkpoint directory to resume from, or `true`/`auto` for the latest complete checkpoint in "
        "`output_dir` (`auto` starts fresh when there is none; `true` requires one).",
    )
    stop_on_nan_loss: bool = key(
        True, "Stop, naming the step, when the training loss or gradient norm becomes NaN or infinite."
    )
    early_stopping_patience: int | None = key(
        None,
        "Stop when the evaluation loss has not improved on its best for this many evaluations in a row (needs "
        "`val_set_size`); the log names the step of the best loss. The final model is the last weights: keep "
        "checkpoints (`save_steps`) to go back to the best one.",
        ge=1,
    )
    llmcompressor: SparseFinetuning | None = key(
        None,
        "Sparse fine-tuning (axolotl's LLM Compressor plugin): full fine-tuning of a sparse model (e.g. 2:4 "
        "sparse) in which the targeted weights' zeros stay zero. Weights of magnitude up to 1e-8 count as zero "
        "(LLM Compressor's threshold) and are set to 0 at the start; their gradients are zeroed and they are set "
        "back to 0 after each optimizer step (a one-bit mask). Keys: `recipe`, `save_compressed`.",
    )
    loss_watchdog_threshold: float | None = key(
        None,
        "Stop, naming the step, when the logged training loss stays above this value for "
        "`loss_watchdog_patience` logs in a row (learning has broken down; about twice the starting loss is a "
        "good value).",
        gt=0,
    )
    loss_watchdog_patience: int | None = key(
        None, "Logged steps in a row above `loss_watchdog_threshold` before stopping (default 3).", ge=1
    )
    auto_resume_from_checkpoints: bool = key(
        False,
        "When `resume_from_checkpoint` is not set: resume from the latest complete checkpoint in `output_dir` "
        "if there is one (as `resume_from_checkpoint: auto`).",
    )
    cut_cross_entropy: bool | None = key(
        None,
        "axolotl's CutCrossEntropy switch (on when its plugin is listed): asks for `chunked_cross_entropy`, "
        "which likewise never materialises the logits.",
    )

    # ---- evaluation and checkpoints ------------------------------------------------------------
    logging_steps: int = key(1, "Log loss and learning rate every N optimizer steps.", "logging", ge=1)
    evals_per_epoch: int | None = key(
        None, "Evaluations per epoch (needs `val_set_size`); 0, as unset: one at each epoch's end.", "logging", ge=0
    )
    eval_steps: int | None = key(None, "Evaluate every N steps (instead of `evals_per_epoch`).", "logging", ge=1)
    saves_per_epoch: int | None = key(None, "Checkpoints per epoch.", "logging", ge=1)
    save_steps: int | None = key(None, "Checkpoint every N steps (instead of `saves_per_epoch`).", "logging", ge=1)
    save_total_limit: int | None = key(None, "Keep at most this many checkpoints.", "logging", ge=1)
    save_only_model: bool = key(
        False,
        "Checkpoints hold the model weights only (no optimizer, scheduler or random-number state): smaller "
        "and faster to write, but a run cannot resume from them (`resume_from_checkpoint` refuses such a "
        "checkpoint rather than restart the optimizer from zero); use one as `base_model` instead.",
        "logging",
    )
    eval_batch_size: int | None = key(
        None, "Rows per device per evaluation forward pass (default: `micro_batch_size`).", "logging", ge=1
    )
    eval_table_size: int | None = key(
        None,
        "At each evaluation, greedy predictions for this many evaluation turns: the prompt (the conversation up "
        "to the turn's first trained token), the model's completion and the reference, written to "
        "`output_dir/eval_predictions/step-N.jsonl` (and a wandb Table when wandb is on). 0 or empty: none.",
        "logging",
        ge=0,
    )
    eval_max_new_tokens: int | None = key(
        None,
        "Tokens generated per prediction of `eval_table_size` and `do_causal_lm_eval` (default 128, as axolotl); "
        "accepted without them, as in axolotl's configs, where it then has no use.",
        "logging",
        ge=1,
    )
    eval_table_max_new_tokens: int | None = key(
        None, "As `eval_max_new_tokens` (axolotl's older name).", "logging", ge=1
    )
    do_causal_lm_eval: bool = key(
        False,
        "At each evaluation, greedy predictions for every evaluation turn, scored against the references by "
        "`eval_causal_lm_metrics`; logged as `eval_<metric>` next to the evaluation loss.",
        "logging",
    )
    eval_causal_lm_metrics: list[CausalLMMetric] | None = key(
        None,
        "Metrics of `do_causal_lm_eval`: `sacrebleu`, `chrf`, `ter` (corpus scores, need `pip install "
        "sacrebleu`) and `perplexity` (the model's perplexity on the reference texts); default: sacrebleu, ter "
        "and chrf (axolotl's list without `comet`, which needs a model from the hub).",
        "logging",
        min_length=1,
    )
    wandb_project: str | None = key(None, "Weights & Biases project; logging to wandb is on when set.", "logging")
    use_wandb: bool | None = key(
        None,
        "axolotl's wandb switch: `true` logs to wandb even without `wandb_project` (wandb then takes its project "
        "from WANDB_PROJECT); `false` is the default when no project is set, and contradicts a `wandb_project`.",
        "logging",
    )
    wandb_entity: str | None = key(None, "Weights & Biases entity (team or user).", "logging")
    wandb_name: str | None = key(None, "Run name shown in wandb.", "logging")
    wandb_run_id: str | None = key(None, "Run id, to resume a wandb run.", "logging")
    wandb_mode: Literal["online", "offline", "disabled"] | None = key(None, "wandb mode.", "logging")
    wandb_watch: Literal["gradients", "parameters", "all", "false"] | None = key(
        None, "Log gradients and/or parameters to wandb.", "logging"
    )
    wandb_log_model: Literal["checkpoint", "end", "false"] | None = key(
        None, "Upload checkpoints or the final model to wandb.", "logging"
    )
    use_tensorboard: bool = key(
        False,
        "Write TensorBoard event files to `output_dir/runs/` (needs `pip install tensorboard`); can be combined "
        "with wandb.",
        "logging",
    )
    use_otel_metrics: bool = key(
        False,
        "Serve every logged number (loss, grad_norm, learning_rate, tokens/s, eval_loss...) as Prometheus "
        "gauges named `dolphin_train_<key>`, with the step and the process's memory, at "
        "http://otel_metrics_host:otel_metrics_port/metrics while the run lasts (main process; needs "
        "`pip install 'dolphin-train[metrics]'`).",
        "logging",
    )
    otel_metrics_host: str | None = key(
        None, "Address the metrics endpoint listens on (default localhost; 0.0.0.0 for every interface).", "logging"
    )
    otel_metrics_port: int | None = key(None, "Port of the metrics endpoint (default 8000).", "logging", ge=1, le=65535)
    debug: bool = key(
        False,
        "Before training, print the first training row token by token with its ids, trained tokens highlighted "
        "(axolotl's label check; `dolphin-train inspect --ids` shows more rows).",
        "logging",
    )

    # ---- distributed ---------------------------------------------------------------------------
    deepspeed: str | dict[str, Any] | None = key(
        None,
        "DeepSpeed config: a JSON file path or an inline mapping (see `deepspeed_configs/`).",
        "distributed",
    )
    fsdp: list[str] | str | None = key(
        None,
        "Fully sharded data parallel, the alternative to DeepSpeed: transformers' options, e.g. "
        "`[full_shard, auto_wrap]` (add `offload` to keep parameters on the CPU).",
        "distributed",
    )
    fsdp_config: dict[str, Any] | None = key(
        None,
        "FSDP settings passed to transformers (`fsdp_` prefixes accepted, as axolotl writes them); FSDP2 "
        "(`version: 2`) unless set otherwise; layers to wrap default to the model's own.",
        "distributed",
    )
    fsdp_version: Literal[1, 2] | None = key(
        None,
        "axolotl's newer FSDP spelling: `fsdp_version` with `fsdp_config` and no `fsdp` list turns FSDP on, "
        "its options read from `fsdp_config` (`sharding_strategy`, else `reshard_after_forward: false` for "
        "sharding gradients and optimizer states only, else full sharding; `offload_params: true` is `offload`, "
        "with either spelling); the version goes to `fsdp_config`.",
        "distributed",
    )
    ddp_find_unused_parameters: bool | None = key(
        None,
        "DDP's search for parameters that get no gradient (needed only when some do, e.g. unused layers); "
        "default off: it costs a graph traversal per step.",
        "distributed",
    )
    use_ray: bool = key(
        False,
        "Launch the run with Ray Train (axolotl's key): `dolphin-train CONFIG` starts `ray_num_workers` training "
        "processes on the Ray cluster that RAY_ADDRESS names (a local one otherwise), joined in one process "
        "group; `output_dir` must be storage every worker reaches. Needs `pip install 'dolphin-train[ray]'`.",
        "distributed",
    )
    ray_num_workers: int | None = key(None, "Ray's training processes (default 1), one per GPU.", "distributed", ge=1)
    ray_run_name: str | None = key(
        None, "Name of the Ray run; Ray's own records go to `output_dir/ray/<name>`.", "distributed"
    )
    resources_per_worker: dict[str, float] | None = key(
        None,
        "Ray resources each worker holds (default `{GPU: 1}` where the launching machine has a GPU, else "
        "`{CPU: 1}`); a `GPU` entry puts the workers on GPUs.",
        "distributed",
    )
    local_rank: int | None = key(
        None,
        "Set by the launcher (torchrun, accelerate); leave it empty in the file.",
        "distributed",
        unsupported=True,
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer; allowed: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("jagged_restart_warmup_steps", "jagged_restart_anneal_steps")
    @classmethod
    def _steps_or_false(cls, value: int | bool | None) -> int | bool | None:
        # axolotl's example writes `false` for "the default"; `true` has no meaning
        if value is True:
            raise ValueError("a number of steps is expected (or false for the default), not true")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"unknown scheduler; allowed: {', '.join(LR_SCHEDULERS)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        name = value.removeprefix(FALLBACK_PREFIX) if value else value
        if value is None or value == TOKENIZER_DEFAULT or name in TEMPLATE_NAMES:
            return value
        names = ", ".join((*TEMPLATE_NAMES, TOKENIZER_DEFAULT))
        close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ValueError(f"unknown chat template{hint}; known: {names}")

    @field_validator("bnb_config_kwargs")
    @classmethod
    def _known_bnb_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        problems = []
        for name, setting in (value or {}).items():
            if name in BNB_TOP_LEVEL:
                problems.append(f"{name}: set the top-level `{name}` key instead")
            elif name not in BNB_CONFIG_VALUES:
                close = difflib.get_close_matches(name, BNB_CONFIG_VALUES, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                known = ", ".join(BNB_CONFIG_VALUES)
                problems.append(f"{name}: not a BitsAndBytesConfig setting{hint}; known: {known}")
            elif problem := _bnb_value_problem(name, setting):
                problems.append(problem)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        if value is None or value in ATTN_IMPLEMENTATIONS or value in ATTENTION_NAMES or "/" in value:
            return value
        if value == "sage":
            raise ValueError("not supported; instead: flash_attention: true (flash-attn or PyTorch's varlen kernel)")
        raise ValueError(f"unknown attention implementation; known: {', '.join(ATTN_IMPLEMENTATIONS)}")

    @field_validator("plugins")
    @classmethod
    def _known_plugins(cls, value: list[str] | None) -> list[str] | None:
        unknown = [p for p in value or [] if p not in KNOWN_PLUGINS]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not supported. dolphin-train has no plugin system; only {LIGER_PLUGIN} "
                f"(liger_kernel), {CCE_PLUGIN} (chunked_cross_entropy) and {SPARSE_PLUGIN} (llmcompressor) map "
                "onto its own paths"
            )
        return value

    @field_validator("unfrozen_parameters")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            if _UNFROZEN_RANGE.match(pattern):
                raise ValueError(
                    f"{pattern!r}: row ranges of a parameter are not supported; name whole parameters "
                    "(new embedding rows are trained with the rest of the matrix)"
                )
            try:
                unfrozen_pattern(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a count of rows (>= 1) must be a whole number; a fraction must be below 1")
        return value

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume_form(cls, value: str | bool | None) -> str | bool | None:
        if value is False or value == "":
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _fsdp_options_from_config(cls, data: Any) -> Any:
        """axolotl's `fsdp_config` keys that are `fsdp` options in transformers (which would not read them in
        `fsdp_config`), and `fsdp_version` with no `fsdp` list: FSDP on, as axolotl reads it."""
        if not isinstance(data, dict) or not isinstance(data.get("fsdp_config"), dict):
            return data
        settings = {k.removeprefix("fsdp_"): v for k, v in data["fsdp_config"].items()}
        new_spelling = data.get("fsdp") is None and data.get("fsdp_version") is not None
        if data.get("fsdp") is None and not new_spelling:
            return data
        if not new_spelling and not {"sharding_strategy", "offload_params"} & settings.keys():
            return data  # nothing to translate
        options = data["fsdp"] if isinstance(data.get("fsdp"), list) else str(data.get("fsdp") or "").split()
        strategy = str(settings.pop("sharding_strategy", "")).lower()
        chosen = [o for o in options if o in FSDP_STRATEGIES]
        if strategy and chosen and strategy not in chosen:
            raise ValueError(f"fsdp_config's sharding_strategy ({strategy}) and fsdp ({chosen[0]}) disagree: set one")
        if new_spelling:
            reshard = settings.get("reshard_after_forward") is not False
            options = [strategy or ("full_shard" if reshard else "shard_grad_op"), "auto_wrap"]
        elif strategy and not chosen:
            options = [strategy, *options]
        if settings.pop("offload_params", False) and "offload" not in options:
            options = [*options, "offload"]
        if data.get("fsdp_version") is not None:
            settings.setdefault("version", data["fsdp_version"])
        return {**data, "fsdp": options, "fsdp_config": settings}

    @model_validator(mode="before")
    @classmethod
    def _accumulation_from_batch_size(cls, data: Any) -> Any:
        """axolotl's reading of `batch_size` with a fixed micro-batch and no `gradient_accumulation_steps`."""
        if not isinstance(data, dict) or data.get("gradient_accumulation_steps") is not None:
            return data
        batch, micro = data.get("batch_size"), data.get("micro_batch_size", 1)
        whole = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, micro))
        if whole and batch % micro == 0:
            return {**data, "gradient_accumulation_steps": batch // micro}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = self._memory_mode_problems() + self._rope_problems()
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append("warmup_steps and warmup_ratio: set one, not both")
        if self.evals_per_epoch is not None and self.eval_steps is not None:
            problems.append("evals_per_epoch and eval_steps: set one, not both")
        if self.saves_per_epoch is not None and self.save_steps is not None:
            problems.append("saves_per_epoch and save_steps: set one, not both")
        if self.adapter == "qlora" and not self.load_in_4bit:
            problems.append("adapter: qlora needs load_in_4bit: true")
        if (self.load_in_4bit or self.load_in_8bit) and self.adapter is None:
            problems.append("load_in_4bit/load_in_8bit: quantised weights cannot be trained in full; set adapter")
        if self.train_from_scratch and (self.load_in_4bit or self.load_in_8bit):
            problems.append("train_from_scratch with load_in_4bit/load_in_8bit: there are no weights to quantise")
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("load_in_4bit and load_in_8bit: choose one")
        if self.load_in_4bit and self.adapter == "lora":
            problems.append("load_in_4bit: true with adapter: lora; use adapter: qlora")
        problems += self._loftq_problems()
        problems += self._bnb_problems()
        if self.lora_target_linear and self.names_output_head:
            problems.append("lora_target_linear: true adapts every linear layer but the output head, and lm_head "
                            "cannot be added to it: list every module in lora_target_modules instead")  # fmt: skip
        if self.adapter and self.lora_target_linear is False and not self.lora_target_modules:
            problems.append("lora_target_linear: false leaves LoRA nothing to adapt: name lora_target_modules "
                            "(e.g. [q_proj, v_proj]) or remove lora_target_linear")  # fmt: skip
        if self.chunked_loss_choice and self.adapts_output_head:
            problems.append("chunked_cross_entropy: true with lm_head in lora_target_modules: the chunked loss "
                            "cannot apply a LoRA-adapted output head; remove one of them")  # fmt: skip
        if self.fsdp and self.deepspeed:
            problems.append("fsdp and deepspeed: choose one way to shard the model")
        if self.fsdp_version and not self.fsdp:
            problems.append("fsdp_version: no effect without fsdp_config (or an fsdp list)")
        if self.fsdp_version and (self.fsdp_config or {}).get("version", self.fsdp_version) != self.fsdp_version:
            problems.append("fsdp_version and fsdp_config's version disagree: set one")
        if self.fsdp_config and not self.fsdp:
            problems.append("fsdp_config is set but fsdp is not: set fsdp, e.g. [full_shard, auto_wrap]")
        if self.bf16 is True and self.fp16:
            problems.append("bf16 and fp16: choose one precision")
        if self.bfloat16 and self.fp16:
            problems.append("bfloat16 weights with fp16 mixed precision: use bf16")
        if self.float16 and (self.bfloat16 or self.bf16 is True or self.fp16):
            problems.append("float16 weights compute in float16 without mixed precision: remove bfloat16, "
                            "bf16: true and fp16: true, or float16")  # fmt: skip
        forced = ATTENTION_NAMES.get(self.attn_implementation or "", self.attn_implementation)
        if self.attention and self.attn_implementation and ATTENTION_NAMES[self.attention] != forced:
            problems.append("attention and attn_implementation disagree: set one")
        if self.gemma4_hybrid_attn_impl and (
            self.attention_backend not in (None, "flash_attention_2") or self.xformers_attention
        ):
            chosen = self.attention_backend or "xformers"
            problems.append(f"gemma4_hybrid_attn_impl runs the sliding-window layers under flash_attention_2, but "
                            f"attention is set to {chosen}: remove one of them")  # fmt: skip
        if self.xformers_attention and (self.flash_attention or self.attention_backend not in (None, "sdpa")):
            problems.append("xformers_attention with another attention backend: choose one")
        asks_liger = LIGER_PLUGIN in (self.plugins or []) or any(self.liger_kernel_config.values())
        asks_liger = asks_liger or bool(self.liger_rms_norm_gated)
        if self.liger_kernel is False and asks_liger:
            problems.append("liger_kernel: false, but the LigerPlugin or liger_* keys ask for Liger's kernels")
        for old, liger in (("flash_attn_fuse_mlp", "liger_glu_activation"), ("flash_attn_rms_norm", "liger_rms_norm"),
                           ("fused_attn_kernel", "liger_rms_norm"), ("fused_attn_kernel", "liger_rope")):
            if getattr(self, old) and getattr(self, liger) is False:
                problems.append(f"{old}: true asks for Liger's fused kernel, but {liger} is false")
        if self.cut_cross_entropy and self.chunked_cross_entropy is False:
            problems.append("cut_cross_entropy: true asks for the chunked loss, but chunked_cross_entropy is false")
        problems += self._lisa_problems()
        problems += self._relora_problems()
        problems += self._schedule_problems() + self._packing_order_problems()
        problems += self._fp8_problems() + self._flex_compile_problems()
        if self.save_only_model and "SHARDED" in str((self.fsdp_config or {}).get("state_dict_type", "")).upper():
            problems.append("save_only_model writes the whole model's weights, which FSDP's sharded checkpoints "
                            "do not: set fsdp_config's state_dict_type: FULL_STATE_DICT, or remove "
                            "save_only_model")  # fmt: skip
        inductor = self.torch_compile is not False and self.torch_compile_backend in (None, "inductor")
        if self.torch_compile_mode and not inductor:
            problems.append("torch_compile_mode applies to layers compiled with the inductor backend: set "
                            "torch_compile: true (or auto) and no other torch_compile_backend")  # fmt: skip
        if self.early_stopping_patience and not self.val_set_size:
            problems.append("early_stopping_patience watches the evaluation loss: set val_set_size")
        problems += self._lora_kernel_problems()
        problems += self._sparse_problems()
        stray = [k for k in ("ray_num_workers", "ray_run_name", "resources_per_worker") if getattr(self, k)]
        if stray and not self.use_ray:
            problems.append(f"{', '.join(stray)}: no effect without use_ray: true")
        problems += self._generation_eval_problems()
        if self.use_wandb is False and self.wandb_project:
            problems.append("use_wandb: false, but wandb_project is set (axolotl then logs to wandb): remove one")
        if not self.use_otel_metrics:
            problems += self._set_without(("otel_metrics_host", "otel_metrics_port"), "use_otel_metrics: true")
        if self.eot_tokens is not None and self.template_name == "chatml" and self.eot_tokens != ["<|im_end|>"]:
            problems.append("eot_tokens: chatml ends every turn with <|im_end|>; set [<|im_end|>] or remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def template_name(self) -> str:
        """The chat template, with axolotl's default: the tokenizer's own for `type: chat_template` rows."""
        if self.chat_template:
            return self.chat_template
        return TOKENIZER_DEFAULT if any(d.type == "chat_template" for d in self.datasets) else "chatml"

    @property
    def attention_backend(self) -> str | None:
        """`attn_implementation` or `attention`, with axolotl's short names spelled out (`flash` stays the
        choice of the best flash path, see config/resolve.py)."""
        name = self.attn_implementation or self.attention
        return ATTENTION_NAMES.get(name, name) if name else None

    @property
    def chunked_loss_choice(self) -> bool | None:
        """`chunked_cross_entropy`, or the CutCrossEntropy plugin's request for the same thing."""
        if self.chunked_cross_entropy is not None:
            return self.chunked_cross_entropy
        if self.cut_cross_entropy or (self.cut_cross_entropy is None and CCE_PLUGIN in (self.plugins or [])):
            return True
        return None

    @property
    def liger_kernel_config(self) -> dict[str, bool]:
        """The Liger kernels the `liger_*` keys pick, named as transformers' `liger_kernel_config` takes them."""
        glu = self.liger_glu_activation if self.liger_glu_activation is not None else self.flash_attn_fuse_mlp or None
        norm = self.flash_attn_rms_norm or self.fused_attn_kernel
        chosen = {
            "rope": self.liger_rope if self.liger_rope is not None else self.fused_attn_kernel or None,
            "rms_norm": self.liger_rms_norm if self.liger_rms_norm is not None else norm or None,
            "layer_norm": self.liger_layer_norm,
            "swiglu": glu,
            "geglu": glu,
            "cross_entropy": self.liger_cross_entropy,
            "fused_linear_cross_entropy": self.liger_fused_linear_cross_entropy,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    @property
    def uses_wandb(self) -> bool:
        return bool(self.wandb_project) or self.use_wandb is True

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the Prometheus endpoint, or None when `use_otel_metrics` is off."""
        if not self.use_otel_metrics:
            return None
        return self.otel_metrics_host or "localhost", self.otel_metrics_port or 8000

    @property
    def loss_watchdog(self) -> tuple[float, int] | None:
        """(threshold, patience) of the loss watchdog, or None when it is off."""
        if self.loss_watchdog_threshold is None:
            return None
        return self.loss_watchdog_threshold, self.loss_watchdog_patience or 3

    @property
    def micro_batch_size_for_eval(self) -> int:
        return self.eval_batch_size or self.micro_batch_size

    def _sparse_problems(self) -> list[str]:
        if SPARSE_PLUGIN in (self.plugins or []) and self.llmcompressor is None:
            return [f"{SPARSE_PLUGIN}: set llmcompressor (its recipe) or remove the plugin"]
        if self.llmcompressor is None:
            return []
        clashes = {"adapter": self.adapter, "deepspeed": self.deepspeed, "fsdp": self.fsdp,
                   "lisa_n_layers": self.lisa_n_layers}  # fmt: skip
        named = [k for k, v in clashes.items() if v]
        if named:
            return [f"llmcompressor: sparse fine-tuning trains the sparse weights themselves, one process or DDP; "
                    f"not with {', '.join(named)}"]  # fmt: skip
        return []

    @property
    def lora_kernels(self) -> list[str]:
        return [k for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if getattr(self, k)]

    def _lora_kernel_problems(self) -> list[str]:
        kernels = ", ".join(self.lora_kernels)
        if not kernels:
            return []
        problems = []
        if not self.adapter:
            problems.append(f"{kernels}: fuses LoRA projections; set adapter: lora or qlora")
        if self.lora_dropout:
            problems.append(f"{kernels}: the fused functions apply no dropout: set lora_dropout: 0")
        if self.load_in_8bit:
            problems.append(f"{kernels}: not for 8-bit base weights; use load_in_4bit (adapter: qlora) or neither")
        if self.deepspeed or self.fsdp:
            problems.append(f"{kernels} with deepspeed/fsdp: not supported yet (the fused MLP reads its "
                            "projections' weights without calling them, where sharding gathers them)")  # fmt: skip
        return problems

    @property
    def generates_at_evaluation(self) -> bool:
        """A prediction table or causal-LM metrics: evaluation also generates text."""
        return bool(self.eval_table_size) or self.do_causal_lm_eval

    @property
    def eval_new_tokens(self) -> int:
        return self.eval_max_new_tokens or self.eval_table_max_new_tokens or 128

    @property
    def causal_lm_metrics(self) -> tuple[str, ...]:
        """The metrics `do_causal_lm_eval` computes (none when it is off)."""
        if not self.do_causal_lm_eval:
            return ()
        return tuple(dict.fromkeys(self.eval_causal_lm_metrics or DEFAULT_CAUSAL_LM_METRICS))

    def _generation_eval_problems(self) -> list[str]:
        problems = []
        if self.eval_causal_lm_metrics and not self.do_causal_lm_eval:
            problems.append("eval_causal_lm_metrics: no effect without do_causal_lm_eval: true")
        if "comet" in (self.eval_causal_lm_metrics or []):
            problems.append("eval_causal_lm_metrics: comet scores with a neural model downloaded from the hub, "
                            "which a training run does not load: use sacrebleu, chrf, ter or perplexity")  # fmt: skip
        if not self.generates_at_evaluation:
            return problems
        asked = "eval_table_size" if self.eval_table_size else "do_causal_lm_eval"
        if not self.val_set_size:
            problems.append(f"{asked} generates from the evaluation set: set val_set_size")
        if self.deepspeed or self.fsdp:
            problems.append(f"{asked} with {'deepspeed' if self.deepspeed else 'fsdp'}: generating from sharded "
                            "weights needs every process in step for each token, which is not supported: remove "
                            f"{asked}, or train with DDP (several processes, no deepspeed or fsdp)")  # fmt: skip
        if self.train_on_inputs:
            problems.append(f"{asked} with train_on_inputs: true: every token is trained, so no turn has a prompt "
                            "to generate from")  # fmt: skip
        return problems

    def _bnb_problems(self) -> list[str]:
        """`bnb_config_kwargs` that would contradict another key (or configure nothing)."""
        kwargs = self.bnb_config_kwargs or {}
        if not kwargs:
            return []
        if not (self.load_in_4bit or self.load_in_8bit):
            return ["bnb_config_kwargs: configures bitsandbytes quantisation, but neither load_in_4bit nor "
                    "load_in_8bit is set"]  # fmt: skip
        problems = []
        four_bit = [k for k in kwargs if k.startswith("bnb_4bit_")]
        if self.load_in_8bit and four_bit:
            problems.append(f"bnb_config_kwargs: {', '.join(four_bit)} apply to load_in_4bit, not load_in_8bit")
        wanted = "bfloat16" if self.bf16 is True or self.bfloat16 else "float16" if self.fp16 or self.float16 else None
        asked = kwargs.get("bnb_4bit_compute_dtype")
        if asked and wanted and asked != wanted:
            problems.append(f"bnb_config_kwargs: bnb_4bit_compute_dtype: {asked} contradicts the {wanted} "
                            "precision set by bf16/fp16: remove it (the compute dtype follows bf16/fp16)")  # fmt: skip
        if "bnb_4bit_quant_storage" in kwargs and (self.deepspeed or self.fsdp):
            problems.append("bnb_config_kwargs: bnb_4bit_quant_storage is the compute dtype under DeepSpeed/FSDP "
                            "(so the 4-bit weights shard like the others): remove it")  # fmt: skip
        return problems

    def _set_without(self, keys: tuple[str, ...], switch: str) -> list[str]:
        """The keys of `keys` that are set while the feature they configure (`switch`) is off."""
        stray = [k for k in keys if getattr(self, k) is not None]
        return [f"{', '.join(stray)}: no effect without {switch}"] if stray else []

    def _lisa_problems(self) -> list[str]:
        if not self.lisa_n_layers:
            return self._set_without(("lisa_step_interval", "lisa_layers_attribute"), "lisa_n_layers")
        clashes = {"adapter": self.adapter, "deepspeed": self.deepspeed, "fsdp": self.fsdp,
                   "unfrozen_parameters": self.unfrozen_parameters, "optimizer_in_backward": self.optimizer_in_backward}
        named = [k for k, v in clashes.items() if v]  # fmt: skip
        if named:
            why = "lisa_n_layers trains a changing set of whole layers"
            return [f"{why}: it cannot be combined with {', '.join(named)}"]
        return []

    @property
    def loftq(self) -> LoftQSettings | None:
        """LoftQ's settings when a new adapter starts with it (`peft.loftq_config`), else None."""
        return self.peft.loftq_config if self.peft else None

    def _loftq_problems(self) -> list[str]:
        if self.loftq is None:
            return []
        if self.adapter != "lora" or self.load_in_4bit or self.load_in_8bit:
            return ["peft.loftq_config: LoftQ quantises the base itself and initialises the adapter from what the "
                    "quantisation lost (peft: pass it an unquantised model): use adapter: lora without "
                    "load_in_4bit/load_in_8bit"]  # fmt: skip
        if self.lora_model_dir:
            return ["peft.loftq_config initialises a new adapter; lora_model_dir continues a saved one (a LoftQ "
                    "adapter's quantised base is read from its directory): remove one of them"]  # fmt: skip
        if self.peft_use_dora:
            return ["peft.loftq_config with peft_use_dora: DoRA's magnitudes would be taken from the weights "
                    "before LoftQ replaced them; use one of them"]  # fmt: skip
        return []

    def _relora_problems(self) -> list[str]:
        if not self.relora:
            stray = [k for k in ("relora_prune_ratio", "relora_prune_method") if getattr(self, k) is not None]
            stray += ["relora_cpu_offload"] if self.relora_cpu_offload else []
            if not self.jagged_restart_steps:
                stray += [k for k in ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps") if getattr(self, k)]
            return [f"{', '.join(stray)}: no effect without relora: true (and jagged_restart_steps)"] if stray else []
        problems = []
        if not self.jagged_restart_steps:
            problems.append("relora: true restarts LoRA every jagged_restart_steps steps: set jagged_restart_steps")
        if self.adapter not in ("lora", "qlora"):
            problems.append(f"relora: true merges and restarts a LoRA adapter: set adapter: lora or qlora (it is "
                            f"{self.adapter or 'not set'})")  # fmt: skip
        clashes = {"deepspeed": self.deepspeed, "fsdp": self.fsdp, "load_in_8bit": self.load_in_8bit,
                   "peft_use_dora": self.peft_use_dora, "optimizer_in_backward": self.optimizer_in_backward,
                   "peft.loftq_config": self.loftq}
        named = [k for k, v in clashes.items() if v]  # fmt: skip
        if named:
            problems.append(f"relora: true merges whole unsharded 16-bit or 4-bit base weights with a plain LoRA "
                            f"update: it cannot be combined with {', '.join(named)}")  # fmt: skip
        if self.optimizer not in RELORA_OPTIMIZERS:
            problems.append(f"relora: true prunes Adam's moments at each restart; optimizer: {self.optimizer} is not "
                            f"one it knows: use one of {', '.join(RELORA_OPTIMIZERS)}")  # fmt: skip
        return problems

    def _schedule_problems(self) -> list[str]:
        problems = []
        if self.cosine_min_lr_ratio is not None and self.lr_scheduler != "cosine":
            problems.append(f"cosine_min_lr_ratio shapes the cosine schedule, but lr_scheduler is {self.lr_scheduler}: "
                            "set lr_scheduler: cosine (or remove cosine_min_lr_ratio)")  # fmt: skip
        if self.cosine_constant_lr_ratio is not None and self.cosine_min_lr_ratio is None:
            problems.append("cosine_constant_lr_ratio holds the learning rate at the cosine's minimum: set "
                            "cosine_min_lr_ratio too (e.g. 0.1)")  # fmt: skip
        if self.cosine_constant_lr_ratio and self.lr_scheduler_kwargs:
            problems.append("cosine_constant_lr_ratio builds its own schedule, which takes no lr_scheduler_kwargs: "
                            "remove one of them")  # fmt: skip
        return problems

    def _packing_order_problems(self) -> list[str]:
        problems = []
        if self.sample_packing_sequentially and not self.sample_packing:
            problems.append("sample_packing_sequentially: no effect without sample_packing: true")
        if self.curriculum_sampling and self.sample_packing and not self.sample_packing_sequentially:
            problems.append("curriculum_sampling keeps the rows in order, but sample_packing groups them by length: "
                            "set sample_packing_sequentially: true too")  # fmt: skip
        return problems

    def _fp8_problems(self) -> list[str]:
        if not self.fp8_enable_fsdp_float8_all_gather:
            return []
        fsdp_version = (self.fsdp_config or {}).get("version", self.fsdp_version or 2)
        if not (self.fp8 and self.fsdp and fsdp_version == 2):
            return ["fp8_enable_fsdp_float8_all_gather gathers FSDP2's float8 weights: it needs fp8: true and FSDP2 "
                    "(fsdp_version: 2 with fsdp_config)"]  # fmt: skip
        return []

    def _flex_compile_problems(self) -> list[str]:
        if self.flex_attn_compile_kwargs is None:
            return []
        problems = []
        if self.attention_backend != "flex_attention":
            problems.append("flex_attn_compile_kwargs compiles flex attention: set attn_implementation: "
                            "flex_attention (or remove flex_attn_compile_kwargs)")  # fmt: skip
        mode = self.flex_attn_compile_kwargs.get("mode")
        if mode is not None and mode not in FLEX_COMPILE_MODES:
            problems.append(f"flex_attn_compile_kwargs: mode {mode!r} is not a torch.compile mode (one of "
                            f"{', '.join(FLEX_COMPILE_MODES)})")  # fmt: skip
        unknown = sorted(set(self.flex_attn_compile_kwargs) - set(FLEX_COMPILE_KEYS))
        if unknown:
            problems.append(f"flex_attn_compile_kwargs: {', '.join(unknown)} is not a torch.compile argument here "
                            f"(use {', '.join(FLEX_COMPILE_KEYS)})")  # fmt: skip
        return problems

    def _rope_problems(self) -> list[str]:
        problems = []
        overridden = sorted(set(self.model_config_overrides or {}) & {"rope_scaling", "rope_parameters", "rope_theta"})
        if overridden and (self.rope_scaling is not None or self.rope_theta is not None):
            problems.append(f"rope_scaling/rope_theta and model_config: {{{', '.join(overridden)}}} both set RoPE: "
                            "set it in one place")  # fmt: skip
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            factor = self.rope_scaling.get("factor")
            if kind not in ROPE_TYPES:
                problems.append(f"rope_scaling: rope_type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
            elif kind in ROPE_TYPES_WITH_FACTOR and (not isinstance(factor, (int, float)) or factor < 1):
                problems.append(f"rope_scaling: rope_type {kind} needs a factor of 1 or more (how many times the "
                                f"trained positions to reach), got {factor!r}")  # fmt: skip
        return problems

    @property
    def rope_parameters(self) -> dict[str, Any] | None:
        """`rope_scaling` and `rope_theta` as one transformers `rope_parameters` mapping (None: neither set)."""
        if self.rope_scaling is None and self.rope_theta is None:
            return None
        params = {k: v for k, v in (self.rope_scaling or {}).items() if k != "type"}
        if self.rope_scaling is not None:
            params["rope_type"] = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if self.rope_theta is not None:
            params["rope_theta"] = float(self.rope_theta)
        return params

    def _memory_mode_problems(self) -> list[str]:
        problems = []
        if self.activation_offloading is True and not self.gradient_checkpointing:
            problems.append("activation_offloading: true keeps the checkpointed layers' inputs in CPU memory: set "
                            "gradient_checkpointing: true (or auto)")  # fmt: skip
        if self.tiled_mlp_num_shards is not None and self.tiled_mlp is False:
            problems.append("tiled_mlp_num_shards sets the chunks of the tiled MLP: set tiled_mlp: true (or auto), "
                            "or remove tiled_mlp_num_shards")  # fmt: skip
        fixed_micro = self.micro_batch_size != "auto"
        if self.batch_size is not None and fixed_micro and self.batch_size != self.micro_batch_size * (
            self.gradient_accumulation_steps
        ):
            problems.append(f"batch_size: {self.batch_size} is not micro_batch_size x gradient_accumulation_steps "
                            f"({self.micro_batch_size} x {self.gradient_accumulation_steps}): set one of them, or "
                            "micro_batch_size: auto")  # fmt: skip
        if self.fp8 and (self.adapter or self.load_in_4bit or self.load_in_8bit):
            problems.append("fp8: true converts the trained linear layers to float8 training: full fine-tuning only "
                            "(remove adapter, or fp8)")  # fmt: skip
        if self.optimizer_in_backward:
            why = "optimizer_in_backward updates each parameter as soon as its gradient exists"
            if self.gradient_accumulation_steps > 1 or (self.batch_size is not None and not fixed_micro):
                problems.append(f"{why}, so gradients cannot accumulate: set gradient_accumulation_steps: 1 and no "
                                "batch_size (raise micro_batch_size instead)")  # fmt: skip
            if self.max_grad_norm:
                problems.append(f"{why}, before the global gradient norm is known: set max_grad_norm: 0")
            if self.deepspeed or self.fsdp:
                problems.append(f"{why}: it is a single-GPU mode; remove deepspeed/fsdp")
            if self.optimizer not in IN_BACKWARD_OPTIMIZERS:
                problems.append(f"optimizer_in_backward with optimizer: {self.optimizer}: use one of "
                                f"{', '.join(IN_BACKWARD_OPTIMIZERS)}")  # fmt: skip
        return problems

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing on (`auto` resolved first: see plan/auto.py)."""
        return self.gradient_checkpointing in (True, "offload")

    @property
    def offloads_activations(self) -> bool:
        return self.activation_offloading is True or self.gradient_checkpointing == "offload"

    @property
    def has_auto_memory_settings(self) -> bool:
        return "auto" in (self.micro_batch_size, self.gradient_checkpointing, self.activation_offloading,
                          self.tiled_mlp)

    @property
    def eval_packing(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing

    @property
    def lora_targets(self) -> list[str] | str:
        """The modules LoRA adapts: those named (a list, or peft's regular expression), else every linear
        layer but the head (peft's `all-linear`); as in axolotl, `lora_target_linear: true` adds every linear
        layer to those named, so their union is all of them."""
        if self.lora_target_linear or not self.lora_target_modules:
            return "all-linear"
        return self.lora_target_modules

    @property
    def adapts_output_head(self) -> bool:
        """LoRA on the output head (named in `lora_target_modules`; peft's all-linear leaves it out): its
        logits go through the adapter, which the chunked loss does not reproduce."""
        return bool(self.adapter) and self.names_output_head

    @property
    def names_output_head(self) -> bool:
        """`lm_head` among `lora_target_modules` (or matched by its regular expression)."""
        targets = self.lora_target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, "lm_head") is not None
        return "lm_head" in (targets or [])


def documented_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Config keys (by their YAML name) mapped to their pydantic field info."""
    return {(info.alias or name): info for name, info in model.model_fields.items()}
