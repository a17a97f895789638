"""Load (or initialise) the model at the right precision and attention backend, sized to the tokenizer.

The decisions made here (load dtype, model-config overrides, quantisation) are the ones `dolphin-train plan`
calls too, on a meta-device copy of the model, so the plan and the run cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from dolphin_train.config.load import missing_local_model
from dolphin_train.config.resolve import FA2_VARLEN, FLEX_COMPILED, HYBRID, RuntimeSettings
from dolphin_train.config.schema import Config, unfrozen_pattern
from dolphin_train.errors import DolphinError
from dolphin_train.model.adapters import apply_adapter, compute_dtype, quantization_config
from dolphin_train.model.attention import (
    BACKEND_KERNELS,
    backend_for_model,
    check_hybrid_layers,
    register_backend,
    register_compiled_flex_attention,
    register_hybrid_attention,
    register_packed_attention,
    use_hybrid_attention,
)
from dolphin_train.model.quantised import keep_standard_layout
from dolphin_train.model.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


def load_dtype(cfg: Config, runtime: RuntimeSettings) -> Any:
    """The dtype the weights are loaded in. Without DeepSpeed, full fine-tuning keeps float32 master
    weights and autocasts to bf16/fp16: pure bf16 weights lose small Adam updates. DeepSpeed keeps its own
    float32 master copy, so the model loads in the compute dtype there; so do frozen adapter bases."""
    import torch

    if cfg.bfloat16:  # asked for: bfloat16 weights, no float32 master copy
        return torch.bfloat16
    if cfg.float16:  # asked for: float16 weights and arithmetic, no mixed precision
        return torch.float16
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
    if cfg.rope_parameters is not None:
        apply_rope_parameters(config, cfg.rope_parameters)
    config.use_cache = False
    return config


def apply_rope_parameters(config: Any, asked: dict[str, Any]) -> None:
    """`rope_scaling` / `rope_theta` over the model's RoPE settings (transformers' `rope_parameters`): a new
    `rope_type` replaces the model's scaling (its type-specific keys would not apply), keeping its base
    frequency unless `rope_theta` sets one; `rope_theta` alone keeps the model's scaling."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    current = dict(getattr(text, "rope_parameters", None) or {})
    if text.nested_rope_parameter_keys(current) if hasattr(text, "nested_rope_parameter_keys") else False:
        raise DolphinError("rope_scaling/rope_theta: this model sets RoPE per layer type; set it with "
                           "model_config: {rope_parameters: ...} instead")  # fmt: skip
    if "rope_type" in asked:
        current = {"rope_theta": current.get("rope_theta", getattr(text, "rope_theta", None))}
    params = {k: v for k, v in {**current, **asked}.items() if v is not None}
    text.rope_parameters = params
    try:
        text.standardize_rope_params()
        text.validate_rope()
    except (KeyError, ValueError) as exc:
        raise DolphinError(f"rope_scaling: {params} is not a RoPE setting transformers accepts: {exc}") from None


def load_model_config(cfg: Config) -> Any:
    from transformers import AutoConfig

    source = cfg.base_model_config or cfg.base_model
    missing = missing_local_model("base_model_config" if cfg.base_model_config else "base_model", source)
    if missing:
        raise DolphinError(missing)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DolphinError(f"cannot load the model config from {source!r}: {exc}") from None
    check_declared_family(cfg, config)
    return apply_config_overrides(config, cfg)


# axolotl's `is_*_derived_model` flags, and the model types each one names.
DECLARED_FAMILIES = {
    "is_llama_derived_model": ("llama",),
    "is_mistral_derived_model": ("mistral", "mixtral"),
    "is_qwen_derived_model": ("qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
    "is_falcon_derived_model": ("falcon", "falcon_h1", "falcon_mamba"),
}


def check_declared_family(cfg: Config, config: Any) -> list[str]:
    """The flags are metadata here (the architecture comes from config.json): one that contradicts the model
    is reported, since a config copied from another model's example may carry other wrong settings too."""
    model_type = getattr(config, "model_type", "")
    wrong = [
        f"{flag}: {declared} but the model type is {model_type!r}"
        for flag, types in DECLARED_FAMILIES.items()
        if (declared := getattr(cfg, flag)) is not None and declared != (model_type in types)
    ]
    for message in wrong:
        log.warning("%s (the flag has no effect: the architecture is read from config.json)", message)
    return wrong


def embedding_rows(rows: int, vocabulary: int, to_32x: bool) -> int:
    """Rows of the embedding matrix once the tokenizer's `vocabulary` tokens fit: unchanged when they already
    do, else grown to the vocabulary (rounded up to a multiple of 32 with `resize_token_embeddings_to_32x`)."""
    if vocabulary <= rows:
        return rows
    return -(-vocabulary // 32) * 32 if to_32x else vocabulary


def freeze_except(cfg: Config, model: Any) -> None:
    """`unfrozen_parameters`: only parameters whose names match a pattern stay trainable (names as in the base
    model; an adapter's parameters keep theirs, e.g. `...q_proj.lora_A.default.weight`)."""
    if not cfg.unfrozen_parameters:
        return
    patterns = [unfrozen_pattern(p) for p in cfg.unfrozen_parameters]
    kept = 0
    for name, param in model.named_parameters():
        base_name = name.removeprefix("base_model.model.")
        if param.requires_grad and not any(p.match(base_name) for p in patterns):
            param.requires_grad_(False)
        kept += param.numel() if param.requires_grad else 0
    if kept == 0:
        raise DolphinError(f"unfrozen_parameters: {cfg.unfrozen_parameters} match no trainable parameter")
    if cfg.checkpointing and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad


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


def register_attention(cfg: Config, runtime: RuntimeSettings, config: Any) -> str:
    """Register the resolved attention backend with transformers and return the name the model loads with:
    ours with its kernel, unless the kernel lacks what this model's attention computes, with a warning: a
    sliding window its rows outgrow (our entry point with SDPA as the kernel), a logit softcap or dropout
    (transformers' eager attention)."""
    name = runtime.attn_implementation
    if name in BACKEND_KERNELS:
        kernel = BACKEND_KERNELS[name]()
        chosen, why = backend_for_model(name, kernel, config, cfg.sequence_len)
        if why:
            log.warning("Attention: %s", why)
            name, kernel = chosen, BACKEND_KERNELS.get(chosen, lambda: None)()
        if kernel is not None:
            register_packed_attention(name, kernel)
    if name == HYBRID:
        register_hybrid_attention()
        register_backend(FA2_VARLEN)  # what the sliding-window layers run
    if name == FLEX_COMPILED:
        register_compiled_flex_attention(cfg.flex_attn_compile_kwargs or {})
    return name


def load_model(
    cfg: Config, runtime: RuntimeSettings, tok: LoadedTokenizer, weights_from_checkpoint: bool = False
) -> Any:
    """The model ready to train. `weights_from_checkpoint`: a resumed run, whose weights the Trainer then
    loads from the checkpoint (said in the log; a LoftQ run takes its quantised base from `output_dir`)."""
    import torch

    config = load_model_config(cfg)
    cls = model_class(cfg)
    if cfg.gemma4_hybrid_attn_impl:
        check_hybrid_layers(config)
    kwargs = {"dtype": load_dtype(cfg, runtime), "attn_implementation": register_attention(cfg, runtime, config)}
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
    if quantization is not None:
        keep_standard_layout(model)  # evaluation on an AVX-512 BF16 CPU must not repack what trains
    if runtime.attn_implementation == HYBRID:
        handed = use_hybrid_attention(model)
        log.info("gemma4_hybrid_attn_impl: %d sliding-window attention layers on flash-attn, the others on SDPA",
                 handed)  # fmt: skip
    if cfg.liger_rms_norm_gated:
        fuse_gated_rms_norms(model, runtime)
    tokenizer = tok.tokenizer
    rows = model.get_input_embeddings().weight.shape[0]
    if embedding_rows(rows, len(tokenizer), cfg.resize_token_embeddings_to_32x) != rows:
        multiple = 32 if cfg.resize_token_embeddings_to_32x else None
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False, pad_to_multiple_of=multiple)
    init_new_embeddings(model, tok.new_token_ids)
    sync_special_token_ids(model, tokenizer)
    model.config.use_cache = False  # `save_final_model` turns it back on for inference
    if cfg.adapter:
        # LoRA's A matrices start random: `seed` decides them, whatever ran before in this process.
        torch.manual_seed(cfg.seed)
        model = apply_adapter(cfg, model, tok.new_token_ids, resuming=weights_from_checkpoint)
    freeze_except(cfg, model)
    apply_tiled_mlp(cfg, model)
    return model


def apply_tiled_mlp(cfg: Config, model: Any) -> None:
    """`tiled_mlp: true`: the decoder layers' MLPs run a chunk of the sequence at a time (model/tiled_mlp.py),
    after the adapter and its fused kernels so that the tiles run them. Training and the plan call this."""
    if cfg.tiled_mlp is not True:  # `auto` is decided by the plan before the model is built
        return
    from dolphin_train.model.tiled_mlp import use_tiled_mlp

    tiled = use_tiled_mlp(model, cfg.tiled_mlp_num_shards)
    on_meta = next(model.parameters()).device.type == "meta"  # the plan's model: not worth a line each time
    chunk = f"1/{cfg.tiled_mlp_num_shards}" if cfg.tiled_mlp_num_shards else "about 1,024 tokens"
    log.log(logging.DEBUG if on_meta else logging.INFO, "tiled_mlp: %d MLPs run over %s of the sequence at a time",
            tiled, chunk)  # fmt: skip


def float8_config(fsdp_float8_all_gather: bool = False, emulate: bool = False) -> Any:
    """torchao's float8 training settings: rowwise scaling (each row of activations and column of weights
    scaled on its own: the more accurate recipe), or with `fp8_enable_fsdp_float8_all_gather` tensorwise
    scaling with FSDP2 gathering the weights already in float8 (one scale per weight is what lets a shard
    be cast before the gather). `emulate`: float8 numerics without float8 hardware (the CPU tests)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    if fsdp_float8_all_gather:
        tensorwise = Float8LinearConfig.from_recipe_name("tensorwise")
        base = dataclasses.replace(tensorwise, enable_fsdp_float8_all_gather=True)
    else:
        base = Float8LinearConfig.from_recipe_name("rowwise")
    return dataclasses.replace(base, emulate=emulate)


def convert_to_float8(model: Any, emulate: bool = False, fsdp_float8_all_gather: bool = False) -> int:
    """torchao's float8 training on the decoder's linear layers (`float8_config`); the output head and layers
    whose sizes are not multiples of 16 (the float8 kernels' tile) stay in bf16. Returns the layers converted."""
    import torch
    from torchao.float8 import convert_to_float8_training

    head = model.get_output_embeddings()
    converted = []

    def eligible(module: torch.nn.Module, name: str) -> bool:
        ok = module is not head and module.in_features % 16 == 0 and module.out_features % 16 == 0
        converted.extend([name] if ok else [])
        return ok

    config = float8_config(fsdp_float8_all_gather, emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=eligible)
    scaling = "tensorwise scaling, FSDP2 gathers float8 weights" if fsdp_float8_all_gather else "rowwise scaling"
    log.info("fp8: %d linear layers compute in float8 (%s)", len(converted), scaling)
    return len(converted)


def compile_layers(model: Any, cfg: Config, runtime: RuntimeSettings) -> int:
    """Regional compilation: each decoder layer compiled in place (`nn.Module.compile`), the same graph
    reused by every layer of the same shape; compiling the whole model would trace the loss and the
    optimizer-facing wrappers too, and take minutes. Rows padded to `sequence_len` keep one shape; otherwise
    the lengths are marked dynamic so that a new row length does not recompile. Returns the layers compiled."""
    from dolphin_train.model.layers import decoder_layers

    fixed_shape = cfg.sample_packing and cfg.pad_to_sequence_len
    layers = decoder_layers(model)
    for layer in layers:
        backend = cfg.torch_compile_backend or "inductor"
        layer.compile(backend=backend, dynamic=not fixed_shape, mode=cfg.torch_compile_mode)
    log.info("torch.compile: %d decoder layers (%s shapes); the first step includes the compilation",
             len(layers), "fixed" if fixed_shape else "dynamic")  # fmt: skip
    return len(layers)


def gated_rms_norms(model: Any) -> list[Any]:
    """The gated RMSNorm layers (RMSNorm of the input times SiLU of a gate) of linear-attention models."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNormGated")]


def fuse_gated_rms_norms(model: Any, runtime: RuntimeSettings, **compile_options: Any) -> int:
    """`liger_rms_norm_gated`: each gated RMSNorm layer compiled in place, so the normalisation, the weight and
    the SiLU gate run as one fused kernel instead of six elementwise passes over float32 copies. Returns the
    layers compiled (none off CUDA, where there is no Triton kernel to fuse into; tests pass `backend`)."""
    layers = gated_rms_norms(model)
    if not layers:
        log.info("liger_rms_norm_gated: %s has no gated RMSNorm layers, nothing to fuse", type(model).__name__)
        return 0
    if runtime.device != "cuda" and not compile_options:
        log.info("liger_rms_norm_gated: the fused gated RMSNorm needs CUDA; %d layers stay as they are", len(layers))
        return 0
    for layer in layers:
        layer.compile(**compile_options)
    log.info("liger_rms_norm_gated: %d gated RMSNorm layers fused (torch.compile)", len(layers))
    return len(layers)


def sync_special_token_ids(model: Any, tokenizer: Any) -> None:
    """The saved config and generation config name the tokenizer's bos/eos/pad, so `generate`, vLLM and
    GGUF converters stop at `<|im_end|>` without extra flags."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)
