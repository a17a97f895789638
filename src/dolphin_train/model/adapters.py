"""LoRA and QLoRA: quantised loading settings and the PEFT adapter, configured from the Config."""

from __future__ import annotations

import logging
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)


def parameter_count(param: Any) -> int:
    """Values a parameter holds: bitsandbytes packs two 4-bit values per byte, so a loaded 4-bit weight's
    own numel() is half its count (its quantisation state keeps the real shape)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(quant_state.shape.numel())
    return param.numel()


def compute_dtype(runtime: RuntimeSettings) -> Any:
    """The dtype of the matrix products: bf16 or fp16 in mixed precision, else float32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[runtime.precision]


def quantization_config(cfg: Config, runtime: RuntimeSettings) -> Any:
    """bitsandbytes settings for `load_in_4bit` (NF4 + double quantisation, the QLoRA recipe) or
    `load_in_8bit`. The 4-bit storage dtype is the compute dtype under DeepSpeed or FSDP, so ZeRO-3 and
    FSDP can shard the quantised weights like any other parameter."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = compute_dtype(runtime)
    storage = dtype if (cfg.deepspeed or cfg.fsdp) else "uint8"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def _module_name(model: Any, module: Any) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def modules_to_save(cfg: Config, model: Any, new_token_ids: list[int], announce: bool = True) -> list[str] | None:
    """New tokens have untrained embedding rows: the embeddings must train in full next to the adapter."""
    names = [_module_name(model, model.get_input_embeddings()), _module_name(model, model.get_output_embeddings())]
    embeddings = [n for n in dict.fromkeys(names) if n]
    if not new_token_ids:
        return cfg.lora_modules_to_save
    if cfg.lora_modules_to_save is None:
        if announce:
            log.info("New tokens were added: training %s in full next to the adapter", " and ".join(embeddings))
        return embeddings
    missing = [n for n in embeddings if n not in cfg.lora_modules_to_save]
    if missing:
        raise DolphinError(
            f"lora_modules_to_save: {cfg.lora_modules_to_save} leaves out {missing}, but "
            f"{len(new_token_ids)} token(s) were added whose embeddings would stay untrained; add them "
            "or remove lora_modules_to_save"
        )
    return cfg.lora_modules_to_save


def _ties_embeddings(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(cfg: Config, model: Any, saved: list[str] | None) -> Any:
    """The PEFT LoRA settings from the config (also used by `plan` on a meta-device model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        modules_to_save=saved,
        # Tied input and output embeddings (Llama-3.2-1B, Qwen2.5 small) trained in full stay one matrix:
        # two copies would train apart, and the merged model would lose one of them.
        ensure_weight_tying=_ties_embeddings(model) and bool(saved),
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_base_for_adapter(cfg: Config, model: Any) -> Any:
    """The frozen base as LoRA trains over it: peft's k-bit preparation for quantised bases (norms,
    embeddings and head upcast to float32), or a gradient path through frozen embeddings for checkpointing."""
    from peft import prepare_model_for_kbit_training

    if cfg.load_in_4bit or cfg.load_in_8bit:
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return model


def new_adapter(cfg: Config, model: Any, new_token_ids: list[int], announce: bool = True) -> Any:
    """A new trainable LoRA adapter over the prepared base (also built by `plan` on a meta-device model)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, model, modules_to_save(cfg, model, new_token_ids, announce)))


def apply_adapter(cfg: Config, model: Any, new_token_ids: list[int]) -> Any:
    """Wrap the model with a trainable LoRA adapter (new, or continued from `lora_model_dir`)."""
    from peft import PeftModel

    model = prepare_base_for_adapter(cfg, model)
    if cfg.lora_model_dir:
        log.info("Continuing from the adapter in %s", cfg.lora_model_dir)
        return PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True)
    return new_adapter(cfg, model, new_token_ids)
