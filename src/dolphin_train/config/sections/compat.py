"""axolotl-only keys, accepted for compatibility: metadata read from the model itself, and switches of axolotl's
old kernel paths (read as their Liger equivalents, or refused with what to use instead)."""

from __future__ import annotations

from dolphin_train.config.keys import Section, key


class CompatKeys(Section):
    """axolotl's model metadata, GPTQ and old flash-attn kernel switches."""

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


class DeferredInitKeys(Section):
    """axolotl's deferred initialisation (torchdistx). A class apart from `CompatKeys` for the reference's order
    only: this key follows the LoRA kernels in the `model` table."""

    torchdistx_path: str | None = key(
        None, "torchdistx deferred initialisation.", "model", unsupported=True,
        alternative="nothing: DeepSpeed ZeRO-3 and FSDP shard the weights as they load",
    )  # fmt: skip
