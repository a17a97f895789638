"""LoRA and QLoRA: quantised loading settings and the PEFT adapter, configured from the Config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError
from dolphin_train.model.kernel_choice import fused_lora_mlp
from dolphin_train.model.lora_kernels import use_fused_lora
from dolphin_train.model.token_rows import use_lean_token_rows

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
    `load_in_8bit`, with `bnb_config_kwargs` over them (as axolotl merges them). The 4-bit storage dtype is
    the compute dtype under DeepSpeed or FSDP, so ZeRO-3 and FSDP can shard the quantised weights like any
    other parameter."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    overrides = cfg.bnb_config_kwargs or {}  # checked against these settings when the config loaded
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **overrides)
    dtype = compute_dtype(runtime)
    storage = dtype if (cfg.deepspeed or cfg.fsdp) else "uint8"
    settings = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": storage,
    }
    return BitsAndBytesConfig(**{**settings, **overrides})


def _module_name(model: Any, module: Any) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


@dataclass(frozen=True)
class EmbeddingTraining:
    """What LoRA trains of the embeddings next to its adapter: whole modules (`modules_to_save`), or only
    the rows of the added tokens (`token_indices`, peft's trainable token indices, per module)."""

    modules_to_save: list[str] | None = None
    token_indices: dict[str, list[int]] | None = None


def embedding_training(cfg: Config, model: Any, new_token_ids: list[int], announce: bool = True) -> EmbeddingTraining:
    """New tokens have untrained embedding rows, which must train next to the adapter. By default only those
    rows train, in the input embedding and (untied models) the output head: for Llama-3-8B that is 2 x 4,096
    values per token instead of two full 525M-parameter copies with their optimizer states. Naming the
    embeddings in `lora_modules_to_save` trains them in full instead."""
    input_name = _module_name(model, model.get_input_embeddings())
    output = model.get_output_embeddings()
    output_name = None if _ties_embeddings(model) else _module_name(model, output)
    embeddings = [n for n in (input_name, output_name) if n]
    if not new_token_ids:
        return EmbeddingTraining(modules_to_save=cfg.lora_modules_to_save)
    if cfg.lora_modules_to_save is None and _zero3_without_cuda():
        if announce:
            log.info("New tokens were added: training %s in full (peft's trainable token rows need CUDA under "
                     "DeepSpeed ZeRO-3)", " and ".join(embeddings))  # fmt: skip
        return EmbeddingTraining(modules_to_save=embeddings)
    if cfg.lora_modules_to_save is None:
        rows = {name: list(new_token_ids) for name in embeddings}
        in_full = []
        if output_name and getattr(output, "bias", None) is not None:
            # peft's trainable token rows drop an output head's bias (Phi-2 has one): train that head in full.
            rows.pop(output_name)
            in_full = [output_name]
        if announce:
            log.info("New tokens were added: training only their %d rows of %s%s", len(new_token_ids),
                     " and ".join(rows), f", and {output_name} in full (it has a bias)" if in_full else "")  # fmt: skip
        return EmbeddingTraining(modules_to_save=in_full or None, token_indices=rows)
    missing = [n for n in embeddings if n not in cfg.lora_modules_to_save]
    if missing:
        raise DolphinError(
            f"lora_modules_to_save: {cfg.lora_modules_to_save} leaves out {missing}, but "
            f"{len(new_token_ids)} token(s) were added whose embeddings would stay untrained; add them, or "
            "remove lora_modules_to_save to train only the new tokens' rows"
        )
    if announce:
        log.info("New tokens were added: training %s in full (lora_modules_to_save)", " and ".join(embeddings))
    return EmbeddingTraining(modules_to_save=cfg.lora_modules_to_save)


def _zero3_without_cuda() -> bool:
    """peft gathers the rows it will train with a CUDA-only collective under ZeRO-3 (CPU runs test ZeRO-3)."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and not torch.cuda.is_available()


def _ties_embeddings(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(cfg: Config, model: Any, embeddings: EmbeddingTraining) -> Any:
    """The PEFT LoRA settings from the config (also used by `plan` on a meta-device model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets,
        modules_to_save=embeddings.modules_to_save,
        trainable_token_indices=embeddings.token_indices,
        # Tied input and output embeddings (Llama-3.2-1B, Qwen2.5 small) trained in full stay one matrix:
        # two copies would train apart, and the merged model would lose one of them. (Trainable token rows
        # of a tied embedding are tied by peft itself.)
        ensure_weight_tying=_ties_embeddings(model) and bool(embeddings.modules_to_save),
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        fan_in_fan_out=bool(cfg.lora_fan_in_fan_out),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_base_for_adapter(cfg: Config, model: Any) -> Any:
    """The frozen base as LoRA trains over it: every base weight frozen, and a gradient path through the
    frozen embeddings when checkpointing (the Trainer turns checkpointing itself on).

    Why not peft's `prepare_model_for_kbit_training` for 4-/8-bit bases: it also upcasts every weight that
    is not quantised to float32. For Llama-3-8B that is the input embedding and the head, 2 x 525M values
    that are frozen anyway (4.2 GB instead of 2.1 GB), and the float32 norms turn the whole residual stream,
    and so every activation kept for the backward pass, into float32. Here the frozen base keeps the compute
    dtype throughout, as torchtune and unsloth keep it; LoRA's own weights are float32 (peft's default)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return model


def new_adapter(cfg: Config, model: Any, new_token_ids: list[int], announce: bool = True) -> Any:
    """A new trainable LoRA adapter over the prepared base (also built by `plan` on a meta-device model)."""
    from peft import get_peft_model

    settings = lora_config(cfg, model, embedding_training(cfg, model, new_token_ids, announce))
    try:
        adapted = get_peft_model(model, settings)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise DolphinError(no_target_message(cfg, model)) from None
    return _with_our_forwards(cfg, adapted)


def no_target_message(cfg: Config, model: Any) -> str:
    """lora_target_modules that match no module (e.g. a regex written for a multimodal checkpoint's
    `model.language_model.layers...` over a text-only one's `model.layers...`): say what the names look like."""
    import torch

    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return (f"lora_target_modules: {cfg.lora_target_modules!r} matches no module of {type(model).__name__}; its "
            f"linear layers are named like {', '.join(linear[:3])}")  # fmt: skip


def apply_adapter(cfg: Config, model: Any, new_token_ids: list[int], resuming: bool = False) -> Any:
    """Wrap the model with a trainable LoRA adapter (new, or continued from `lora_model_dir`). A new adapter
    with `peft.loftq_config` starts from LoftQ; a LoftQ adapter continues over the base it was trained on, and
    a resumed LoftQ run over the base its first start saved in `output_dir` (its adapter comes from the
    checkpoint)."""
    from peft import PeftModel

    from dolphin_train.model.loftq import has_loftq_base, initialise_with_loftq, load_loftq_base

    model = prepare_base_for_adapter(cfg, model)
    if cfg.lora_model_dir:
        log.info("Continuing from the adapter in %s", cfg.lora_model_dir)
        if has_loftq_base(cfg.lora_model_dir):
            load_loftq_base(model, cfg.lora_model_dir)
        return _with_our_forwards(cfg, PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True))
    if cfg.loftq is not None and resuming and has_loftq_base(cfg.output_dir):
        load_loftq_base(model, cfg.output_dir)
        return new_adapter(cfg, model, new_token_ids)
    adapted = new_adapter(cfg, model, new_token_ids)
    if cfg.loftq is not None:
        initialise_with_loftq(adapted, cfg.loftq)
    return adapted


def _with_our_forwards(cfg: Config, model: Any) -> Any:
    """The lean token rows always; the fused LoRA functions where the config asks for them."""
    model = use_lean_token_rows(model)
    return use_fused_lora(model, mlp=fused_lora_mlp(cfg), qkv=cfg.lora_qkv_kernel, o=cfg.lora_o_kernel)
