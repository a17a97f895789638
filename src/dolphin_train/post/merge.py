"""`dolphin-train merge-lora`: base model + LoRA adapter → one full model in safetensors, with its tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MergeSettings:
    base: str
    adapter: str
    dtype: str  # one of DTYPES
    quantization: Any  # the adapter's 4-bit base settings (QLoRA), else None
    trust_remote_code: bool


def merge_settings(cfg: Config, dtype: str | None = None) -> MergeSettings:
    """What a config's run trained: its base, its adapter (output_dir), the dtype it computed in (unless
    `dtype` is given) and, for QLoRA, the 4-bit settings its base was loaded with."""
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.adapters import quantization_config

    runtime = resolve_runtime(cfg)
    return MergeSettings(
        base=cfg.base_model,
        adapter=cfg.output_dir,
        dtype=dtype or ("bfloat16" if runtime.bf16 else "float32"),
        quantization=quantization_config(cfg, runtime) if cfg.load_in_4bit else None,
        trust_remote_code=cfg.trust_remote_code,
    )


def _tokenizer_for(adapter: Path, base: str) -> Any:
    from transformers import AutoTokenizer

    source = adapter if (adapter / "tokenizer_config.json").exists() else base
    return AutoTokenizer.from_pretrained(source)


def load_base(base: str, dtype_name: str, quantization: Any = None, trust_remote_code: bool = False) -> Any:
    """The base weights as the adapter saw them. For a QLoRA adapter the base is loaded in 4 bits and
    dequantised, so the merged weights are the ones the adapter was trained against."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, quantization_config=quantization, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise DolphinError(f"cannot load the base model {base!r}: {exc}") from None
    if quantization is not None:
        from dolphin_train.model.quantised import dequantized_model

        model = dequantized_model(model).to(dtype)
    return model


def merge_lora(base_model: Any, adapter: str | Path, out: str | Path, tokenizer: Any = None) -> Path:
    from peft import PeftModel

    from dolphin_train.model.load import sync_special_token_ids
    from dolphin_train.model.loftq import has_loftq_base, load_loftq_base

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise DolphinError(f"{adapter} holds no LoRA adapter (adapter_config.json)")
    tokenizer = tokenizer or _tokenizer_for(adapter, base_model.name_or_path)
    if len(tokenizer) != base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter saved the rows
    if has_loftq_base(adapter):  # a LoftQ adapter: merged into the quantised base it trained over
        load_loftq_base(base_model, adapter)
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    sync_special_token_ids(merged, tokenizer)
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("Merged model saved to %s", out)
    return out
