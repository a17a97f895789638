"""The variable-length attention kernels our attention entry point (model/attention.py) can run, each called
through one adapter whatever its signature.

A kernel takes the tokens of many sequences concatenated, `(tokens, heads, head_dim)`, and the cumulative
sequence starts of queries and keys (`cu_seqlens`), and attends causally within each sequence only. The ones
we run: flash-attn 2's and 3's `flash_attn_varlen_func` and PyTorch's `torch.nn.attention.varlen.varlen_attn`,
whose keyword arguments changed at every release from 2.10 to 2.12. Rather than trusting a version number,
`VarlenKernel` reads the kernel's signature once and adapts each feature the entry point asks for:

| feature | flash-attn 2.8 / 3 | PyTorch 2.10 | later PyTorch (2.11-2.13 signatures) | if the kernel lacks it |
| --- | --- | --- | --- | --- |
| softmax scale | `softmax_scale=` | none | `scale=` | the queries are pre-scaled (exact) |
| causal | `causal=True` | `is_causal=True` | `window_size=(-1, 0)` | (every kernel has one) |
| sliding window | `window_size=(w-1, 0)` | none | `window_size=(w-1, 0)` | refused, unless no sequence is longer |
| logit softcap | `softcap=` (flash-attn 2.6+) | none | none | refused |
| grouped-query heads | native | repeat k/v heads | `enable_gqa=True`, else repeat | k/v heads repeated (exact) |
| attention dropout | `dropout_p=` (flash-attn 2) | none | none | refused |

`sdpa_varlen_attn` is PyTorch SDPA in the same spelling (every feature but the softcap, on any device).
"Refused" raises `UnsupportedAttention`; `model/load.py` checks the model's needs first (`backend_for_model`)
and picks a backend that has them, so a refusal at run time means a caller bypassed that check. Both kernels
align the causal mask to the bottom right when a sequence has fewer queries than keys (decoding with a cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dolphin_train.errors import DolphinError, EnvironmentProblem


class UnsupportedAttention(DolphinError):
    """A model asks the attention kernel for something it cannot compute (never dropped silently)."""


@dataclass(frozen=True)
class VarlenKernel:
    """A variable-length attention kernel and what its signature offers, read once (not in every layer)."""

    fn: Callable[..., Any]
    name: str = ""
    params: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", frozenset(inspect.signature(self.fn).parameters))
        if not self.name:
            object.__setattr__(self, "name", f"{getattr(self.fn, '__module__', '?')}.{self.fn.__name__}")

    @property
    def flash_attn_style(self) -> bool:
        """flash-attn's API (`softmax_scale`, `causal`), which serves fewer key/value heads natively."""
        return "softmax_scale" in self.params or "causal" in self.params

    @property
    def window(self) -> bool:
        return "window_size" in self.params

    @property
    def softcap(self) -> bool:
        return "softcap" in self.params

    @property
    def dropout(self) -> bool:
        return "dropout_p" in self.params

    def missing(self, sliding_window: int | None, softcap: float | None, dropout: float) -> list[str]:
        """The features asked for that this kernel lacks (the adapter emulates the others exactly)."""
        asked = [("sliding window", sliding_window, self.window), ("attention logit softcap", softcap, self.softcap),
                 ("attention dropout", dropout, self.dropout)]  # fmt: skip
        return [feature for feature, value, offered in asked if value and not offered]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """Causal attention within each sequence; q is (tokens_q, heads, dim), k/v (tokens_k, kv_heads, dim)."""
        if sliding_window is not None and max_k <= sliding_window:
            sliding_window = None  # no sequence reaches past the window: plain causal attention, on any kernel
        missing = self.missing(sliding_window, softcap, dropout)
        if missing:
            raise UnsupportedAttention(f"the attention kernel {self.name} has no {' or '.join(missing)}, which this "
                                       "model uses: choose another attention backend (see the log's attention line)")
        kwargs: dict[str, Any] = {}
        q, k, v = self._heads(q, k, v, kwargs)
        q = self._scale(q, scale, kwargs)
        # One query per sequence (decoding): it is the sequence's last token and sees every key, which needs no
        # causal mask, so no reliance on how a kernel aligns one when there are fewer queries than keys.
        self._mask(max_q > 1 or sliding_window is not None, sliding_window, kwargs)
        if softcap:
            kwargs["softcap"] = softcap
        if self.dropout:
            kwargs["dropout_p"] = dropout
        out = self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # flash-attn 3 returns (out, lse)

    def _heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict[str, Any]) -> tuple:
        groups = q.shape[1] // k.shape[1]
        if groups == 1 or self.flash_attn_style:
            return q, k, v
        if "enable_gqa" in self.params:
            kwargs["enable_gqa"] = True
            return q, k, v
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def _scale(self, q: torch.Tensor, scale: float, kwargs: dict[str, Any]) -> torch.Tensor:
        for name in ("softmax_scale", "scale"):
            if name in self.params:
                kwargs[name] = scale
                return q
        default = q.shape[-1] ** -0.5  # the kernel's own scale: scale the queries by what differs
        return q if scale == default else q * (scale / default)

    def _mask(self, causal: bool, sliding_window: int | None, kwargs: dict[str, Any]) -> None:
        # A window of w tokens (transformers' convention, the current one included) is w - 1 keys to the left.
        left = -1 if sliding_window is None else sliding_window - 1
        flag = "causal" if "causal" in self.params else "is_causal" if "is_causal" in self.params else None
        if flag:
            kwargs[flag] = causal
        if self.window and (left >= 0 or not flag):  # PyTorch 2.11+: the window says causal, (-1, 0), too
            kwargs["window_size"] = (left, 0) if causal else (-1, -1)


def sdpa_varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                     cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                     dropout_p: float = 0.0) -> torch.Tensor:  # fmt: skip
    """PyTorch SDPA as a variable-length kernel, in `varlen_attn`'s spelling (its window convention: (-1, 0)
    causal, (W, 0) causal with W keys to the left): each sequence padded to the longest, one row each, with
    a mask of its own keys (causal from the bottom right, the window). For any device; memory grows with
    sequences x longest^2, at most what SDPA's block-diagonal mask over packed rows takes."""
    n = cu_seq_q.numel() - 1
    len_q, len_k = cu_seq_q.diff(), cu_seq_k.diff()
    pos_q = torch.arange(max_q, device=query.device)
    pos_k = torch.arange(max_k, device=query.device)
    real_q = pos_q[None] < len_q[:, None]  # (sequences, max_q); row-major order is the packed order
    real_k = pos_k[None] < len_k[:, None]
    padded = [t.new_zeros(n, width, *t.shape[1:]) for t, width in ((query, max_q), (key, max_k), (value, max_k))]
    padded[0][real_q], padded[1][real_k], padded[2][real_k] = query, key, value
    i = pos_q[None, :, None] + (len_k - len_q)[:, None, None]  # each query's position among its keys
    j = pos_k[None, None, :]
    allowed = real_k[:, None, :].expand(n, max_q, max_k).clone()
    if window_size[1] >= 0:
        allowed &= j <= i + window_size[1]
    if window_size[0] >= 0:
        allowed &= j >= i - window_size[0]
    allowed[..., 0] |= ~real_q  # padding queries (dropped below) see one key rather than none: no NaN
    q, k, v = (t.transpose(1, 2) for t in padded)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale,
                                                           enable_gqa=enable_gqa, dropout_p=dropout_p)  # fmt: skip
    return out.transpose(1, 2)[real_q]


def sdpa_kernel() -> VarlenKernel:
    return VarlenKernel(sdpa_varlen_attn, "PyTorch SDPA (each sequence padded)")


def torch_varlen_kernel() -> VarlenKernel:
    from torch.nn.attention.varlen import varlen_attn

    return VarlenKernel(varlen_attn, "torch.nn.attention.varlen.varlen_attn")


def flash_attn_2_kernel() -> VarlenKernel:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise EnvironmentProblem(f"flash-attn 2 is asked for but cannot be imported ({exc}): install flash-attn, "
                           "or set flash_attention: false") from None  # fmt: skip
    return VarlenKernel(flash_attn_varlen_func, "flash_attn.flash_attn_varlen_func")


def flash_attn_3_kernel() -> VarlenKernel:
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError as exc:
        raise EnvironmentProblem(f"flash-attn 3 is asked for but cannot be imported ({exc}): install flash-attn 3 "
                           "(its hopper/ build), or choose another attn_implementation") from None  # fmt: skip
    return VarlenKernel(flash_attn_varlen_func, "flash_attn_interface.flash_attn_varlen_func")
