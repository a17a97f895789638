"""Our transformers attention backends: ONE entry point for every variable-length kernel (flash-attn 2 and 3,
PyTorch's own varlen flash attention), and flex attention compiled with the user's torch.compile arguments.

Why our own entry point: transformers' flash-attention path treats a batch as packed only when it has one
row (`_is_packed_sequence` returns False for any other batch size), so packed rows at `micro_batch_size > 1`
would attend across conversations; and each kernel spells its arguments differently. `packed_attention_forward`
has transformers' attention signature and takes the kernel as an argument (attention_kernels.py adapts each
one), so the CUDA kernels and a CPU reference run the very same code. Sequence boundaries, in this order:
  1. a padding mask (generation with left padding, evaluation with right padding): the real tokens of each row;
  2. `cu_seq_lens_q/k` and `max_length_q/k` (transformers' FlashAttentionKwargs, which the model forwards to
     every layer): computed once per batch by the collator, from the packed rows' lengths;
  3. restarting position ids, read once per forward (the same tensor reaches every layer);
  4. otherwise one sequence per row, the queries being each row's last keys (decoding with a cache).
It is registered through transformers' AttentionInterface, with AttentionMaskInterface's flash-attention mask
(None, or the 2-D padding mask).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from dolphin_train.config.resolve import FA2_VARLEN, FA3_VARLEN, FLEX_COMPILED, HYBRID, SDPA_VARLEN, VARLEN
from dolphin_train.model.attention_kernels import (
    UnsupportedAttention,
    VarlenKernel,
    flash_attn_2_kernel,
    flash_attn_3_kernel,
    sdpa_kernel,
    torch_varlen_kernel,
)

# transformers' FlashAttentionKwargs: the names a model passes through `**kwargs` to its attention function.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Our backends and the kernel each runs.
BACKEND_KERNELS: dict[str, Callable[[], VarlenKernel]] = {
    VARLEN: torch_varlen_kernel, FA2_VARLEN: flash_attn_2_kernel, FA3_VARLEN: flash_attn_3_kernel,
    SDPA_VARLEN: sdpa_kernel,
}  # fmt: skip

Boundaries = tuple[torch.Tensor, torch.Tensor, int, int]  # cu_seqlens_q, cu_seqlens_k, max_q, max_k


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


def sequence_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """The boundary kwargs of a batch of (packed) rows, as the collator adds them: computed on the CPU, once
    per batch, so that no layer reads the position ids back from the GPU."""
    cu, longest = cu_seqlens_from_position_ids(position_ids)
    return dict(zip(BOUNDARY_KEYS, (cu, cu, longest, longest), strict=True))


class _PositionBoundaries:
    """Boundaries derived from the position ids, kept for the tensor they came from: every layer of a forward
    pass receives the same position-ids tensor, so the first layer derives them and the others reuse them."""

    def __init__(self) -> None:
        self._source: tuple[Any, tuple[int, int, int], Boundaries] | None = None

    def __call__(self, position_ids: torch.Tensor, batch: int, length: int) -> Boundaries:
        key = (position_ids._version, batch, length)  # the same tensor, unchanged, for the same shape
        if self._source is not None:
            ref, source_key, found = self._source
            if ref() is position_ids and source_key == key:
                return found
        cu, longest = cu_seqlens_from_position_ids(position_ids.expand(batch, length))
        found = (cu, cu, longest, longest)
        self._source = (weakref.ref(position_ids), key, found)
        return found


_from_positions = _PositionBoundaries()


def _boundaries(batch: int, q_len: int, k_len: int, device: torch.device, kwargs: dict[str, Any]) -> Boundaries:
    """Sequence boundaries over the flattened rows, when there is no padding mask (see the module's notes)."""
    given = [kwargs.get(name) for name in BOUNDARY_KEYS]
    if q_len == k_len and all(value is not None for value in given):
        cu_q, cu_k, max_q, max_k = given
        return cu_q.to(device, torch.int32), cu_k.to(device, torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if q_len == k_len and position_ids is not None:
        return _from_positions(position_ids, batch, q_len)
    rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return rows * q_len, rows * k_len, q_len, k_len


def _unpad_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The flat indices of a padding mask's real tokens, and their rows' cumulative starts and longest."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    index = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return index, cu, int(lengths.max())


def _kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mixed precision with float32 master weights: rotary embeddings promote q/k to float32, but the CUDA
    flash kernels take 16-bit inputs; they run in the autocast dtype (the caller gets its own dtype back)."""
    if not (q.is_cuda and q.dtype == torch.float32):
        return q, k, v
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
    return q.to(half), k.to(half), v.to(half)


def _refuse_non_causal(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    if not causal or kwargs.get("s_aux") is not None:
        what = "attention sinks" if kwargs.get("s_aux") is not None else "bidirectional attention"
        raise UnsupportedAttention(f"{type(module).__name__} uses {what}, which our variable-length attention "
                                   "does not compute: set attn_implementation: sdpa or eager")  # fmt: skip


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    kernel: VarlenKernel,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v are (batch, heads, length, dim), the key possibly
    longer than the query (a cache); returns (batch, q_length, heads, dim). Causal attention within each
    sequence (see the module's notes for where the boundaries come from), computed by `kernel`."""
    _refuse_non_causal(module, kwargs)
    batch, heads, q_len, dim = query.shape
    q, k, v = _kernel_dtype(*(t.transpose(1, 2) for t in (query, key, value)))
    scale = scaling if scaling is not None else dim**-0.5
    run = functools.partial(kernel, scale=scale, sliding_window=sliding_window, softcap=softcap, dropout=dropout)
    if attention_mask is not None:
        out = _attend_unpadded(run, q, k, v, attention_mask.bool())
    else:
        cu_q, cu_k, max_q, max_k = _boundaries(batch, q_len, k.shape[1], q.device, kwargs)
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
        out = run(*flat, cu_q, cu_k, max_q, max_k).reshape(batch, q_len, heads, -1)
    return out.to(query.dtype), None


def _attend_unpadded(run: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Rows with padding (a 2-D mask over the keys): only the real tokens go to the kernel, each row one
    sequence; the queries are the keys' last `q_len` positions (left padding, as generation pads)."""
    batch, q_len, heads, _ = q.shape
    k, v = k[:, : mask.shape[-1]], v[:, : mask.shape[-1]]  # a static cache is longer than what it holds
    k_index, cu_k, max_k = _unpad_index(mask)
    q_index, cu_q, max_q = _unpad_index(mask[:, -q_len:])
    q_flat, k_flat, v_flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    out = run(q_flat[q_index], k_flat[k_index], v_flat[k_index], cu_q, cu_k, max_q, max_k)
    full = out.new_zeros(batch * q_len, *out.shape[1:])
    full[q_index] = out
    return full.view(batch, q_len, heads, -1)


def no_mask(*args: Any, **kwargs: Any) -> None:
    """For backends that take sequence boundaries (or nothing), not a mask: transformers builds none."""
    return None


def register_packed_attention(name: str, kernel: VarlenKernel | Callable[..., Any]) -> str:
    """Register `packed_attention_forward` running `kernel` (idempotent) under `name`, and return it. Its mask
    is transformers' flash-attention mask: None, or the 2-D padding mask when a row has padding."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    kernel = kernel if isinstance(kernel, VarlenKernel) else VarlenKernel(kernel)
    AttentionInterface.register(name, functools.partial(packed_attention_forward, kernel=kernel))
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def register_backend(name: str) -> str:
    """Register one of our backends (`BACKEND_KERNELS`) with its real kernel."""
    return register_packed_attention(name, BACKEND_KERNELS[name]())


def register_varlen_attention() -> str:
    """PyTorch's varlen flash attention through the entry point (idempotent); returns its name."""
    return register_backend(VARLEN)


def takes_sequence_boundaries(model: Any) -> bool:
    """Whether the model runs our entry point (in some layers at least): its batches then carry the sequence
    boundaries (train/collator.py), which other backends do not read."""
    return getattr(model.config, "_attn_implementation", None) in (*BACKEND_KERNELS, HYBRID)


def model_attention_needs(config: Any) -> tuple[int | None, float | None, float]:
    """What a model's attention layers ask of a kernel: (sliding window, logit softcap, dropout)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None  # e.g. Qwen2 with use_sliding_window: false names a window no layer uses
    return window, getattr(text, "attn_logit_softcapping", None), float(getattr(text, "attention_dropout", 0.0) or 0)


def backend_for_model(name: str, kernel: VarlenKernel, config: Any, longest: int) -> tuple[str, str | None]:
    """`name` if `kernel` computes everything the model's attention needs for sequences of up to `longest`
    tokens, else the transformers backend that does, with the reason to log: never a feature dropped."""
    window, softcap, dropout = model_attention_needs(config)
    window = window if window is not None and window < longest else None  # no sequence reaches past it
    missing = kernel.missing(window, softcap, dropout)
    if not missing:
        return name, None
    model = getattr(config, "model_type", "the model")
    if missing == ["sliding window"]:  # our entry point still, with SDPA as the kernel
        return SDPA_VARLEN, f"{kernel.name} has no sliding window, which {model} uses: PyTorch SDPA instead"
    return "eager", (f"{kernel.name} has no {' or '.join(missing)}, which {model} uses: eager attention instead "
                     "(block-diagonal mask when packed)")  # fmt: skip


def hybrid_mask(*args: Any, local_size: int | None = None, **kwargs: Any) -> torch.Tensor | None:
    """`gemma4_hybrid_attn_impl`'s masks, one per layer type (transformers builds each once per forward): the
    sliding-window layers run flash-attn through our entry point, which takes a padding mask or none (sequence
    boundaries come from the batch); the global layers run SDPA, which takes the causal mask, block-diagonal
    when rows are packed. transformers names the window (`local_size`) only when it builds the sliding-window mask."""
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


def use_hybrid_attention(model: torch.nn.Module, sliding: str = FA2_VARLEN) -> int:
    """Hand the sliding-window attention layers (head_dim 256) to flash-attn, through our entry point (packed
    rows stay apart at any micro batch size): each gets its own copy of the config naming that backend, which is
    where a transformers attention layer looks its function up; the global layers (head_dim 512, beyond
    flash-attn) keep the model's SDPA. `sliding`: a registered attention backend (tests register the entry
    point with a reference kernel). Returns the layers handed over."""
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
