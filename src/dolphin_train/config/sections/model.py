"""The model's keys: the base model and its config, the tokenizer and added tokens, bitsandbytes quantisation."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import field_validator

from dolphin_train.config.keys import Section, Strict, key

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
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")  # transformers' rope_type values
ROPE_TYPES_WITH_FACTOR = ("linear", "dynamic", "yarn", "llama3")


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


class SpecialTokens(Strict):
    """`special_tokens:` tokens set on the tokenizer (added to the vocabulary when new)."""

    bos_token: str | None = key(None, "Beginning-of-sequence token.", "model")
    eos_token: str | None = key(None, "End-of-sequence token; `<|im_end|>` for ChatML chat models.", "model")
    pad_token: str | None = key(None, "Padding token (never trained on).", "model")
    unk_token: str | None = key(None, "Unknown token.", "model")


class ModelKeys(Section):
    """The model to load, its tokenizer and tokens, and the quantisation of its weights."""

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
