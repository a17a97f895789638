"""Model shapes for planning, without downloading anything: the model's config.json when it is on this machine
(a local directory, or a hub id in the Hugging Face cache), else a table of well-known architectures shipped
with the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError

_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}  # fmt: skip
_LLAMA32_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
               "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
               "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True}  # fmt: skip
_LLAMA32_3B = {**_LLAMA32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
               "head_dim": 128}  # fmt: skip
_LLAMA3_70B = {**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64}  # fmt: skip
_PHI2 = {"model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "partial_rotary_factor": 0.4, "max_position_embeddings": 2048, "tie_word_embeddings": False}  # fmt: skip
_MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 32768, "tie_word_embeddings": False}  # fmt: skip
_QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "max_position_embeddings": 32768, "tie_word_embeddings": False}  # fmt: skip
# Gemma 4 31B (dense): five sliding-window layers (head_dim 256) per global one (head_dim 512, keys doubling as
# values); the multimodal checkpoint's text tower, so module names are `model.language_model.layers...` as
# loaded (30.7B parameters, the published count).
_GEMMA4_31B = {"model_type": "gemma4", "text_config": {
    "vocab_size": 262144, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60,
    "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4, "head_dim": 256,
    "global_head_dim": 512, "attention_k_eq_v": True, "sliding_window": 1024, "max_position_embeddings": 262144,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10, "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True}}  # fmt: skip

# Hub ids (lower case, without the owner) -> published architecture hyper-parameters.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama-3-8b": _LLAMA3_8B,
    "meta-llama-3-8b-instruct": _LLAMA3_8B,
    "llama-3.1-8b": _LLAMA3_8B,
    "llama-3.1-8b-instruct": _LLAMA3_8B,
    "meta-llama-3-70b": _LLAMA3_70B,
    "llama-3.1-70b": _LLAMA3_70B,
    "llama-3.2-1b": _LLAMA32_1B,
    "llama-3.2-1b-instruct": _LLAMA32_1B,
    "llama-3.2-3b": _LLAMA32_3B,
    "llama-3.2-3b-instruct": _LLAMA32_3B,
    "phi-2": _PHI2,
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-v0.3": {**_MISTRAL_7B, "vocab_size": 32768},
    "qwen2.5-7b": _QWEN25_7B,
    "qwen2.5-7b-instruct": _QWEN25_7B,
    "gemma-4-31b": _GEMMA4_31B,
    "gemma-4-31b-it": _GEMMA4_31B,
}


# Tokens in each family's tokenizer, where the embedding matrix has spare rows beyond them: added tokens
# fill spare rows before the vocabulary grows (Phi-2: 50,295 tokens in 51,200 rows).
KNOWN_TOKENIZER_SIZES = {"phi": 50295, "qwen2": 151665}


def _key(model_id: str) -> str:
    return model_id.rstrip("/").rsplit("/", 1)[-1].lower()


def known_architecture(model_id: str) -> dict[str, Any] | None:
    return KNOWN_ARCHITECTURES.get(_key(model_id))


def text_config(config: Any) -> Any:
    """The language model's part of a config (a multimodal one, like Gemma 4's, nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rows_after_added_tokens(config: Any, added: int, to_32x: bool = False) -> int:
    """Embedding rows once `added` tokens are added, when the tokenizer itself is not at hand (a grown matrix
    rounded up to a multiple of 32 with `resize_token_embeddings_to_32x`, as `model/load.py` grows it)."""
    from dolphin_train.model.load import embedding_rows

    rows = int(text_config(config).vocab_size)
    return embedding_rows(rows, KNOWN_TOKENIZER_SIZES.get(config.model_type, rows) + added, to_32x)


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub model repository as the Hugging Face cache holds it (latest cached `main`), or None.
    Never goes to the network."""
    from huggingface_hub import try_to_load_from_cache

    if Path(repo_id).exists() or repo_id.count("/") != 1:
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repository id
        return None
    return Path(found) if isinstance(found, str) else None


def model_config_for_plan(cfg: Config) -> tuple[Any, str]:
    """(transformers config, where it came from). A local directory (`base_model_config`, else
    `base_model`), or a hub id whose config.json is in the Hugging Face cache, wins over the table, so a plan
    for a real checkpoint is exact; either way the config's `model_config` overrides apply as training
    applies them."""
    from transformers import AutoConfig

    from dolphin_train.model.load import apply_config_overrides, load_model_config

    source = cfg.base_model_config or cfg.base_model
    if (Path(source) / "config.json").exists():
        return load_model_config(cfg), f"{source}/config.json"
    cached = cached_hub_file(source, "config.json")
    if cached is not None:
        config = AutoConfig.from_pretrained(str(cached.parent), trust_remote_code=cfg.trust_remote_code)
        return apply_config_overrides(config, cfg), f"{source} (config.json in the Hugging Face cache)"
    known = known_architecture(cfg.base_model)
    if known is not None:
        values = dict(known)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        return apply_config_overrides(config, cfg), "dolphin-train's table of known architectures"
    names = ", ".join(sorted(KNOWN_ARCHITECTURES))
    raise DolphinError(
        f"cannot plan {cfg.base_model!r} without its config.json: download it next to the config and set "
        f"base_model_config to its directory, or use one of the known architectures ({names})"
    )
