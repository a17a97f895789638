"""Reference variable-length attention kernels for the CPU tests, each with the exact signature of a real one
(flash-attn 2.8's and 3's `flash_attn_varlen_func`, and `torch.nn.attention.varlen.varlen_attn` as PyTorch
2.10 to 2.13 spelled it), so that our attention entry point runs on the CPU with the very arguments it gives
the CUDA kernels. Each computes plain softmax attention in float32, one sequence at a time, with the real
kernels' conventions: the causal mask aligned to the bottom right when a sequence has fewer queries than
keys, a window of (left, right) keys around the diagonal inclusive, `softcap * tanh(score / softcap)`.

Where the signatures come from: flash-attn 2.8 (flash_attn/flash_attn_interface.py) and flash-attn 3
(hopper/flash_attn_interface.py) as published; PyTorch 2.10's from its documentation (`is_causal`,
`return_aux`); 2.12's from its documentation and 2.13's from the installed source (keyword-only `scale`,
`window_size`, `enable_gqa`, `seqused_k`, `block_table`, `num_splits`). Between them PyTorch's main branch
went through the two intermediate signatures below (`scale` added after `is_causal`; then keyword-only
`window_size` replacing `is_causal`; then `seqused_k`, `block_table`, `num_splits` before `enable_gqa`): 2.11
shipped one of these, which of them could not be checked here, so the adapter is tested against each.
"""

from __future__ import annotations

import types
from typing import Any

import torch

CALLS: list[dict[str, Any]] = []  # each call: the kernel's name and what it was given


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *,
           scale: float | None, causal: bool, window: tuple[int, int] = (-1, -1),
           softcap: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Attention within each [cu[i], cu[i+1]) segment; q (tokens, heads, dim), k/v (tokens, kv_heads, dim)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.zeros_like(q)
    bounds = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True)
    for qa, qb, ka, kb in bounds:
        scores = torch.einsum("qhd,khd->hqk", q[qa:qb].float(), k[ka:kb].float()) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(qb - qa)[:, None] + (kb - ka) - (qb - qa)  # bottom-right alignment
        j = torch.arange(kb - ka)[None, :]
        allowed = torch.ones_like(i * j, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()  # an empty row gives 0
        out[qa:qb] = torch.einsum("hqk,khd->qhd", probs, v[ka:kb].float()).to(q.dtype)
    return out


def _same_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    assert q.shape[1] == k.shape[1], "this kernel takes as many key/value heads as query heads"


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """flash-attn 2.8's signature (fewer key/value heads served natively)."""
    assert dropout_p == 0.0 and alibi_slopes is None and block_table is None
    CALLS.append({"kernel": "flash_attn_2", "cu_q": cu_seqlens_q.tolist(), "max_q": max_seqlen_q,
                  "window_size": window_size, "softcap": softcap})  # fmt: skip
    window = (window_size[0], 0 if causal else window_size[1])
    return attend(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, causal=causal, window=window,
                  softcap=softcap)  # fmt: skip


def flash_attn_3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                             seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                             k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                             num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                             return_attn_probs=False):  # fmt: skip
    """flash-attn 3's signature (hopper/flash_attn_interface.py): no dropout; returns (out, softmax_lse)."""
    CALLS.append({"kernel": "flash_attn_3", "cu_q": cu_seqlens_q.tolist(), "max_q": max_seqlen_q,
                  "window_size": window_size})  # fmt: skip
    window = (window_size[0], 0 if causal else window_size[1])
    out = attend(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, causal=causal, window=window,
                 softcap=softcap)  # fmt: skip
    return out, torch.zeros(q.shape[1], q.shape[0])


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.10: causal flag, no scale, no window, as many key/value heads as query heads."""
    _same_heads(query, key)
    CALLS.append({"kernel": "torch_2_10", "cu_q": cu_seq_q.tolist(), "max_q": max_q})
    return attend(query, key, value, cu_seq_q, cu_seq_k, scale=None, causal=is_causal)


def varlen_attn_main_scale(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None,
                           scale=None):  # fmt: skip
    """PyTorch's main branch after 2.10: `scale` added after the causal flag."""
    _same_heads(query, key)
    CALLS.append({"kernel": "torch_main_scale", "cu_q": cu_seq_q.tolist(), "max_q": max_q})
    return attend(query, key, value, cu_seq_q, cu_seq_k, scale=scale, causal=is_causal)


def _torch_window(window_size: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """PyTorch 2.11+: (-1, 0) is plain causal attention, (W, 0) causal with W keys to the left."""
    return tuple(window_size) == (-1, 0), tuple(window_size)


def varlen_attn_main_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1)):  # fmt: skip
    """PyTorch's main branch later: keyword-only, the causal flag replaced by `window_size`."""
    _same_heads(query, key)
    CALLS.append({"kernel": "torch_main_window", "cu_q": cu_seq_q.tolist(), "window_size": window_size})
    causal, window = _torch_window(window_size)
    return attend(query, key, value, cu_seq_q, cu_seq_k, scale=scale, causal=causal, window=window)


def varlen_attn_main_paged(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1), seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """PyTorch's main branch later still: paged KV-cache arguments, no `enable_gqa` yet."""
    _same_heads(query, key)
    assert seqused_k is None and block_table is None
    CALLS.append({"kernel": "torch_main_paged", "cu_q": cu_seq_q.tolist(), "window_size": window_size})
    causal, window = _torch_window(window_size)
    return attend(query, key, value, cu_seq_q, cu_seq_k, scale=scale, causal=causal, window=window)


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """PyTorch 2.12 and 2.13 (the installed `torch.nn.attention.varlen.varlen_attn`)."""
    if not enable_gqa:
        _same_heads(query, key)
    assert seqused_k is None and block_table is None
    CALLS.append({"kernel": "torch_2_13", "cu_q": cu_seq_q.tolist(), "max_q": max_q, "window_size": window_size})
    causal, window = _torch_window(window_size)
    return attend(query, key, value, cu_seq_q, cu_seq_k, scale=scale, causal=causal, window=window)


# Every signature, by the name the tests give it.
KERNELS = {
    "flash_attn_2": flash_attn_varlen_func,
    "flash_attn_3": flash_attn_3_varlen_func,
    "torch_2_10": varlen_attn_2_10,
    "torch_main_scale": varlen_attn_main_scale,
    "torch_main_window": varlen_attn_main_window,
    "torch_main_paged": varlen_attn_main_paged,
    "torch_2_13": varlen_attn,
}


def fake_flash_attn_module() -> types.ModuleType:
    """A stand-in `flash_attn` package whose varlen function is the reference: the code that imports the real
    one (`from flash_attn import flash_attn_varlen_func`) gets this."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.__version__ = "2.8.3"
    return module
