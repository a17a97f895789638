"""Load (or initialise) the model at the right precision and attention backend, sized to the tokenizer.

The decisions made here (load dtype, model-config overrides, quantisation) are the ones `dolphin-train plan`
calls too, on a meta-device copy of the model, so the plan and the run cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from dolphin_train.config.resolve import VARLEN, RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError
from dolphin_train.model.adapters import apply_adapter, compute_dtype, quantization_config
from dolphin_train.model.attention import register_varlen_attention
from dolphin_train.model.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


def load_dtype(cfg: Config, runtime: RuntimeSettings) -> Any:
    """The dtype the weights are loaded in. Without DeepSpeed, full fine-tuning keeps float32 master
    weights and autocasts to bf16/fp16: pure bf16 weights lose small Adam updates. DeepSpeed keeps its own
    float32 master copy, so the model loads in the compute dtype there; so do frozen adapter bases."""
    import torch

    if cfg.adapter or cfg.deepspeed:
        return compute_dtype(runtime)
    return torch.float32


def model_class(cfg: Config) -> Any:
    import transformers

    cls = getattr(transformers, cfg.model_type, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DolphinError(f"model_type: {cfg.model_type!r} is not a transformers model class")
    return cls


def apply_config_overrides(config: Any, cfg: Config) -> Any:
    """`model_config` values over the model's config.json; no KV cache while training (transformers
    recognises packed rows, from restarting position ids, only when no cache is built)."""
    for name, value in (cfg.model_config_overrides or {}).items():
        setattr(config, name, value)
    config.use_cache = False
    return config


def load_model_config(cfg: Config) -> Any:
    from transformers import AutoConfig

    source = cfg.base_model_config or cfg.base_model
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DolphinError(f"cannot load the model config from {source!r}: {exc}") from None
    return apply_config_overrides(config, cfg)


def init_new_embeddings(model: Any, new_token_ids: list[int]) -> None:
    """Rows of newly added tokens start at the mean of the existing rows (input and output embeddings):
    a random row would give the new token an arbitrary, often huge, initial logit."""
    import torch

    if not new_token_ids:
        return
    first_new = min(new_token_ids)
    layers = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    weights = [layer.weight for layer in layers]
    with torch.no_grad(), _gathered(weights):
        for weight in weights:
            mean = weight[:first_new].float().mean(dim=0).to(weight.dtype)
            weight[new_token_ids] = mean


def _gathered(params: list[Any]) -> Any:
    """Under DeepSpeed ZeRO-3 each process holds a shard: gather the full tensors to edit them (rank 0's
    edit is what every process keeps)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def load_model(
    cfg: Config, runtime: RuntimeSettings, tok: LoadedTokenizer, weights_from_checkpoint: bool = False
) -> Any:
    """The model ready to train. `weights_from_checkpoint`: a resumed run, whose weights the Trainer then
    loads from the checkpoint (only said in the log)."""
    import torch

    config = load_model_config(cfg)
    cls = model_class(cfg)
    if runtime.attn_implementation == VARLEN:
        register_varlen_attention()
    kwargs = {"dtype": load_dtype(cfg, runtime), "attn_implementation": runtime.attn_implementation}
    quantization = quantization_config(cfg, runtime)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if cfg.train_from_scratch:
        torch.manual_seed(cfg.seed)
        model = cls.from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
        if weights_from_checkpoint:
            log.info("Built %s; its weights come from the checkpoint", type(model).__name__)
        else:
            log.info("Initialised %s from scratch", type(model).__name__)
    else:
        try:
            model = cls.from_pretrained(
                cfg.base_model, config=config, trust_remote_code=cfg.trust_remote_code, **kwargs
            )
        except OSError as exc:
            raise DolphinError(f"cannot load the model {cfg.base_model!r}: {exc}") from None
    tokenizer = tok.tokenizer
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_new_embeddings(model, tok.new_token_ids)
    sync_special_token_ids(model, tokenizer)
    model.config.use_cache = False  # `save_final_model` turns it back on for inference
    if cfg.adapter:
        # LoRA's A matrices start random: `seed` decides them, whatever ran before in this process.
        torch.manual_seed(cfg.seed)
        model = apply_adapter(cfg, model, tok.new_token_ids)
    return model


def sync_special_token_ids(model: Any, tokenizer: Any) -> None:
    """The saved config and generation config name the tokenizer's bos/eos/pad, so `generate`, vLLM and
    GGUF converters stop at `<|im_end|>` without extra flags."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)
