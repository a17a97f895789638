"""How the model runs: attention backends, fused kernels and axolotl's plugins, which parameters train, the
weights' dtype."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import field_validator

from dolphin_train.config.keys import Section, key

# axolotl's plugins that map onto what dolphin-train does itself.
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
SPARSE_PLUGIN = "axolotl.integrations.llm_compressor.LLMCompressorPlugin"
KNOWN_PLUGINS = (LIGER_PLUGIN, CCE_PLUGIN, SPARSE_PLUGIN)

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


class KernelKeys(Section):
    """Loading switches, attention, kernels and plugins, trainable parameters and weight dtype."""

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
        "Liger's fused output-head + cross-entropy kernel (with `liger_kernel`, on CUDA; on by default there). It "
        "reads the head's weight, not its forward: off where LoRA adapts `lm_head` or the head has trained rows of "
        "added tokens.",
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

    @property
    def attention_backend(self) -> str | None:
        """`attn_implementation` or `attention`, with axolotl's short names spelled out (`flash` stays the
        choice of the best flash path, see config/resolve.py)."""
        name = self.attn_implementation or self.attention
        return ATTENTION_NAMES.get(name, name) if name else None
