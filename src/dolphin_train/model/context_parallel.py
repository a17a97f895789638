"""Context parallelism (Ulysses-style): one sequence spread over the N processes of a context-parallel group.

Each process of a group holds a contiguous 1/N of the batch's tokens (train/context_parallel.py cuts them)
and runs every layer on its share; only attention needs the whole sequence. Around the attention kernel of
our entry point (model/attention.py), an all-to-all trades "my tokens, all heads" for "all tokens, my heads"
(N-th of the query and key/value heads), the kernel runs over the whole sequence with the batch's own
sequence boundaries (computed once by the collator, over the uncut rows), and a second all-to-all gives
each process its tokens back with every head. Causal attention within each conversation is therefore
computed exactly, wherever the cut falls; rotary embeddings are applied before the exchange, each process
with its tokens' own position ids.

Heads: the query heads must divide by N (checked at load). Key/value heads that do not divide by N
(grouped-query attention with fewer of them than N) are repeated to one per query head before the exchange,
which is exact (that is what grouped-query attention means) and costs only those activations.

The exchange is an autograd function over `torch.distributed.all_to_all_single` (gloo on the CPU, NCCL on
GPUs): the gradient of an all-to-all is the reverse all-to-all of the gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dolphin_train.model.attention_kernels import VarlenKernel


@dataclass(frozen=True)
class ContextGroup:
    """This process's context-parallel group: `size` consecutive ranks that share their rows."""

    size: int
    rank: int  # within the group
    group: Any  # torch.distributed ProcessGroup


def split_ranks(world_size: int, size: int) -> list[list[int]]:
    """Consecutive ranks form a group: with 4 processes and size 2, [[0, 1], [2, 3]]."""
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def join_context_group(size: int) -> ContextGroup:
    """Create every group (each process must create all of them, in the same order) and return this one's."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for ranks in split_ranks(world, size):
        group = dist.new_group(ranks) if size < world else dist.group.WORLD
        if rank in ranks:
            mine = ContextGroup(size, ranks.index(rank), group)
    assert mine is not None
    return mine


class _AllToAll(torch.autograd.Function):
    """Equal splits along dim 0 exchanged within the group; backward: the same exchange of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def tokens_to_heads(x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    """(local tokens, heads, dim) -> (all tokens, heads / N, dim): this process's heads over the whole sequence,
    the processes' shares in rank order (which is the sequence's order)."""
    n, heads, dim = x.shape
    by_destination = x.view(n, cp.size, heads // cp.size, dim).transpose(0, 1).reshape(cp.size * n, -1, dim)
    return _AllToAll.apply(by_destination, cp.group)


def heads_to_tokens(x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
    """The inverse: (all tokens, heads / N, dim) -> (local tokens, heads, dim)."""
    total, part, dim = x.shape
    received = _AllToAll.apply(x, cp.group).view(cp.size, total // cp.size, part, dim)
    return received.transpose(0, 1).reshape(total // cp.size, cp.size * part, dim)


_sharding: ContextGroup | None = None  # set while a context-parallel forward pass runs


@contextmanager
def sharded_sequence(cp: ContextGroup) -> Iterator[None]:
    """Within this, the kernel below exchanges heads for tokens: the model's forward runs on this process's
    share of the tokens. Outside it (generation, a plain forward) the kernel is the wrapped one, unchanged."""
    global _sharding
    previous, _sharding = _sharding, cp
    try:
        yield
    finally:
        _sharding = previous


@dataclass(frozen=True)
class ContextParallelKernel(VarlenKernel):
    """A varlen kernel of the entry point run over the whole sequence while `sharded_sequence` is active:
    the boundaries it is given are the whole batch's, the q/k/v only this process's tokens."""

    @classmethod
    def around(cls, kernel: VarlenKernel) -> ContextParallelKernel:
        return cls(kernel.fn, kernel.name)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        cp = _sharding
        if cp is None:
            return super().__call__(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        if int(cu_q[-1]) != q.shape[0] * cp.size:
            raise RuntimeError(f"context parallelism: the boundaries cover {int(cu_q[-1])} tokens, but {cp.size} "
                               f"processes hold {q.shape[0]} each")  # fmt: skip
        if k.shape[1] % cp.size:  # fewer key/value heads than processes: one per query head (exact)
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        q, k, v = (tokens_to_heads(t, cp) for t in (q, k, v))
        out = super().__call__(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        return heads_to_tokens(out, cp)


def check_heads(config: Any, size: int) -> str | None:
    """Why a model's attention cannot be spread over `size` processes (None if it can)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if heads is None:
        return None
    if heads % size:
        return (f"context_parallel_size: {size} must divide the model's {heads} attention heads (each process "
                f"attends with heads / {size} of them): choose a divisor of {heads}")  # fmt: skip
    return None
