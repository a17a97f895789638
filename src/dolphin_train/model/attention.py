"""Our transformers attention backends: PyTorch's own variable-length flash attention, and flex attention
compiled with the user's torch.compile arguments.

Why our own code: on a CUDA machine without the flash-attn package, packed rows would otherwise fall
back to SDPA with a dense block-diagonal mask (quadratic memory in the row length). PyTorch 2.10+ ships
`torch.nn.attention.varlen.varlen_attn`, a flash-attention kernel over concatenated sequences. We plug
it in through transformers' supported extension points (AttentionInterface for the attention,
AttentionMaskInterface to skip building a mask it would not use); sequence boundaries come from the
restarting position ids, exactly as flash-attn's varlen path derives them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from dolphin_train.config.resolve import FLEX_COMPILED, HYBRID, VARLEN


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts over the flattened batch: a sequence starts where the position id is
    0 (or does not follow the previous one) and at every row start. Returns (cu_seqlens, longest)."""
    flat = position_ids.reshape(-1)
    n = flat.numel()
    row_len = position_ids.shape[-1]
    index = torch.arange(n, device=flat.device)
    follows = torch.ones(n, dtype=torch.bool, device=flat.device)
    follows[1:] = flat[1:] == flat[:-1] + 1
    starts = (~follows) | (index % row_len == 0)
    start_idx = torch.nonzero(starts, as_tuple=False).flatten()
    cu = torch.cat([start_idx, torch.tensor([n], device=flat.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, longest


def _causal_kwargs(kernel: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """The causal flag's spelling changed across PyTorch releases."""
    params = inspect.signature(kernel).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel: Callable[..., torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: q/k/v are (batch, heads, seq, dim); returns
    (batch, seq, heads, dim). `kernel` defaults to PyTorch's varlen flash attention (tests pass a
    reference implementation to check the plumbing on the CPU)."""
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    batch, q_heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
    cu, longest = cu_seqlens_from_position_ids(position_ids.expand(batch, seq))
    q = query.transpose(1, 2).reshape(batch * seq, q_heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    out_dtype = q.dtype
    if q.is_cuda and q.dtype == torch.float32:
        # Mixed precision with float32 master weights: rotary embeddings promote q/k to float32, but the
        # flash kernel takes 16-bit inputs; run it in the autocast dtype and return the caller's dtype.
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    extra: dict[str, Any] = {}
    if kv_heads != q_heads:
        if "enable_gqa" in inspect.signature(kernel).parameters:
            extra["enable_gqa"] = True
        else:  # older kernels: give every query head its key/value head
            k = k.repeat_interleave(q_heads // kv_heads, dim=1)
            v = v.repeat_interleave(q_heads // kv_heads, dim=1)
    out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling, **_causal_kwargs(kernel), **extra)
    return out.to(out_dtype).reshape(batch, seq, q_heads, dim), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """For backends that take sequence boundaries (or nothing), not a mask: transformers builds none."""
    return None


def register_varlen_attention() -> str:
    """Register the backend with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, no_mask)
    return VARLEN


def hybrid_mask(*args: Any, local_size: int | None = None, **kwargs: Any) -> torch.Tensor | None:
    """`gemma4_hybrid_attn_impl`'s masks, one per layer type (transformers builds each once per forward): the
    sliding-window layers run flash-attn, which takes a padding mask or none (sequence boundaries come from
    the position ids); the global layers run SDPA, which takes the causal mask, block-diagonal when rows are
    packed. transformers names the window (`local_size`) only when it builds the sliding-window mask."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if local_size is not None:
        return flash_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def register_hybrid_attention() -> str:
    """Register the hybrid backend (idempotent) and return its name: SDPA for every attention layer that
    `use_hybrid_attention` does not hand to flash-attn, with `hybrid_mask`'s masks."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(HYBRID, sdpa_attention_forward)
    AttentionMaskInterface.register(HYBRID, hybrid_mask)
    return HYBRID


def use_hybrid_attention(model: torch.nn.Module, sliding: str = "flash_attention_2") -> int:
    """Hand the sliding-window attention layers (head_dim 256) to flash-attn: each gets its own copy of the
    config naming that backend, which is where a transformers attention layer looks its function up (and
    flash-attn its kernel); the global layers (head_dim 512, beyond flash-attn) keep the model's SDPA.
    `sliding`: a registered attention backend (tests pass a reference). Returns the layers handed over."""
    import copy

    handed = 0
    for module in model.modules():
        if getattr(module, "is_sliding", False) and hasattr(module, "config"):
            module.config = copy.copy(module.config)
            module.config._attn_implementation = sliding
            handed += 1
    return handed


def check_hybrid_layers(config: Any) -> None:
    """`gemma4_hybrid_attn_impl` splits sliding-window from global layers: a model without both has nothing
    to split (the key is refused rather than ignored)."""
    from dolphin_train.errors import DolphinError

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ())
    if "sliding_attention" not in kinds or len(kinds) < 2:
        raise DolphinError(
            f"gemma4_hybrid_attn_impl: the model ({getattr(config, 'model_type', '?')}) does not mix sliding-window "
            "and global attention layers (its config has no such layer_types): remove the key"
        )


class _TrainingFlag:
    """What transformers' flex-attention function reads from the attention module (whether it trains),
    without the module itself: each layer is its own module, and a compiled function that took it would
    recompile for every layer."""

    def __init__(self, training: bool) -> None:
        self.training = training


def compiled_flex_attention(compile_kwargs: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """transformers' flex attention compiled with `compile_kwargs` (`flex_attn_compile_kwargs`). transformers
    compiles `flex_attention` once with fixed arguments; here the whole attention function is compiled with
    the user's, and transformers then calls the uncompiled kernel inside it (it does so while compiling)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    def flex_core(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, training: bool,
                  **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
        return flex_attention_forward(_TrainingFlag(training), query, key, value, attention_mask, **kwargs)

    compiled = torch.compile(flex_core, **compile_kwargs)

    # Not traced into a compiled decoder layer (`torch_compile`): there it would be compiled with the layer's
    # settings; this way it runs as its own graph, compiled with the user's arguments.
    @torch.compiler.disable
    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
        return compiled(query, key, value, attention_mask, module.training, **kwargs)

    return forward


def register_compiled_flex_attention(compile_kwargs: dict[str, Any]) -> str:
    """Register flex attention compiled with `compile_kwargs` (with transformers' flex block mask) and return
    its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flex_attention_mask

    AttentionInterface.register(FLEX_COMPILED, compiled_flex_attention(compile_kwargs))
    AttentionMaskInterface.register(FLEX_COMPILED, flex_attention_mask)
    return FLEX_COMPILED
