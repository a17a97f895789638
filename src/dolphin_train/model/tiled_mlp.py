"""Tiled MLP (`tiled_mlp`, axolotl's key; the TiledMLP of Snowflake's Arctic Long Sequence Training).

Why: in a decoder layer the MLP's intermediates are the largest activations, several tensors of
`tokens x intermediate_size` (for Llama-3-8B, 14,336 values per token each: 28 KB in bf16). At a million
tokens one of them is 27 GiB, so even with gradient checkpointing, the one layer recomputed in the backward
pass does not fit a GPU. Here the MLP runs over the sequence a chunk (a "shard") at a time: the forward pass
keeps only the MLP's input, and the backward pass recomputes one chunk at a time and takes its gradients
before moving to the next, so what is alive scales with a chunk, not with the sequence. Every token's MLP is
independent of the others', so the result is the same up to the floating-point order of the parameter
gradients' sum over chunks.

How: the decoder layers' MLP modules get a subclass (as the fused LoRA kernels do, model/lora_kernels.py:
parameter names, `isinstance` checks and peft's wrappers stay as they were) whose forward calls
`TiledMLPFunction` with the class's own forward as the computation: peft's LoRA projections, the fused LoRA
MLP and quantised layers all run inside it unchanged. The parameter gradients are summed over the chunks
and returned from the function's backward (not accumulated into `.grad` chunk by chunk), so DDP, DeepSpeed
ZeRO-1/2 and FSDP2 (whose decoder-layer unit holds the MLP's weights gathered, as plain parameters, while
it runs) see each gradient once, as from any other module. DeepSpeed ZeRO-3 gathers a weight only inside
its own linear layer's call, so its weights cannot be inputs of the function: there each chunk's backward
accumulates into `.grad`, and DeepSpeed's `ds_grad_is_ready` flag (its hook for tiled computation, which its
own TiledMLP uses) holds the reduction back until the last chunk. FSDP1 computes with views of its flat
parameter, not the module's parameters, so it is refused at load (config/checks.py). Dropout inside the MLP
(LoRA dropout) draws the same masks in the recomputation: the random state is restored first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from typing import Any

import torch

from dolphin_train.model.layers import decoder_layers

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


CHUNK_TOKENS = 1024  # the default chunk: still a large matrix product per projection on a GPU


def shards_for(tokens: int, hidden_size: int, num_shards: int | None) -> int:
    """Chunks per MLP call: the config's `tiled_mlp_num_shards`, else chunks of about `CHUNK_TOKENS` tokens
    (or `hidden_size`, when smaller: a chunk's intermediates are then at most the size of an MLP weight)."""
    if num_shards:
        return max(1, min(num_shards, tokens))
    return max(1, math.ceil(tokens / min(CHUNK_TOKENS, hidden_size)))


class _RandomState:
    """The CPU's and the input's GPU's random state, to replay dropout in the recomputation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay(self) -> Any:
        devices = [self.device] if self.gpu is not None else []
        context = torch.random.fork_rng(devices=devices, device_type="cuda")
        context.__enter__()
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            torch.cuda.set_rng_state(self.gpu, self.device)
        return context


class TiledMLPFunction(torch.autograd.Function):
    """`compute(x)` over `shards` chunks of the sequence (dimension -2), keeping only `x`; the backward pass
    recomputes one chunk at a time. `params`: the trainable parameters `compute` uses, inputs of the function
    so that their gradients (summed over the chunks) come back through it. `zero3_params`: ZeRO-3's instead,
    whose gradients are accumulated chunk by chunk (see the module's docstring)."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shards: int,
                zero3_params: tuple[torch.Tensor, ...], *params: torch.Tensor) -> torch.Tensor:  # fmt: skip
        device = x.device.type
        ctx.compute, ctx.shards, ctx.device, ctx.params = compute, shards, device, params
        ctx.zero3_params = zero3_params
        ctx.autocast = (
            (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            if device in AUTOCAST_DEVICES
            else None
        )
        ctx.random = _RandomState(x.device) if device != "meta" else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            if x.device.type == "meta":  # the plan's trace: shapes only, and the chunks' outputs make this one
                return compute(x)
            return torch.cat([compute(chunk) for chunk in x.chunk(shards, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[4 + i]]
        totals: dict[int, torch.Tensor] = {}
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        cast = ctx.autocast
        autocast = torch.autocast(ctx.device, dtype=cast[1], enabled=cast[0]) if cast is not None else nullcontext()
        replay = ctx.random.replay() if ctx.random is not None else None
        try:
            start = 0
            chunks = zip(x.chunk(ctx.shards, dim=-2), grad.chunk(ctx.shards, dim=-2), strict=True)
            for index, (chunk, chunk_grad) in enumerate(chunks):
                chunk = chunk.detach().requires_grad_(grad_x is not None)
                with torch.enable_grad(), autocast:
                    out = ctx.compute(chunk)
                if ctx.zero3_params:
                    last = index == ctx.shards - 1
                    chunk_grad_x = _accumulate_zero3(out, chunk_grad, chunk, ctx.zero3_params, last)
                else:
                    inputs = ([chunk] if grad_x is not None else []) + [ctx.params[i] for i in wanted]
                    grads = list(torch.autograd.grad(out, inputs, chunk_grad, allow_unused=True))
                    chunk_grad_x = grads.pop(0) if grad_x is not None else None
                    for i, g in zip(wanted, grads, strict=True):
                        if g is not None:
                            totals[i] = totals[i].add_(g) if i in totals else g
                if grad_x is not None:
                    grad_x.narrow(-2, start, chunk.shape[-2]).copy_(chunk_grad_x)
                start += chunk.shape[-2]
        finally:
            if replay is not None:
                replay.__exit__(None, None, None)
        return (None, grad_x, None, None, *(totals.get(i) for i in range(len(ctx.params))))


def _accumulate_zero3(out: torch.Tensor, out_grad: torch.Tensor, chunk: torch.Tensor,
                      params: tuple[torch.Tensor, ...], last: bool) -> torch.Tensor | None:  # fmt: skip
    """One chunk's backward under ZeRO-3: the weights' gradients accumulate into `.grad`, and DeepSpeed adds
    them to its reduction bucket only once the last chunk's are in (`ds_grad_is_ready`, read by its gradient
    hook). Returns the chunk's input gradient."""
    for param in params:
        param.ds_grad_is_ready = last
    try:
        torch.autograd.backward(out, out_grad, inputs=[*([chunk] if chunk.requires_grad else []), *params])
    finally:
        for param in params:
            param.ds_grad_is_ready = True
    return chunk.grad


# Left out of a compiled decoder layer (`torch_compile`): dynamo cannot trace the random state's replay or the
# backward's own autograd calls, and would split the layer into several graphs around them. This way the
# layer compiles into its graphs before and after the MLP, and the MLP's chunks run eagerly.
@torch.compiler.disable
def tiled_mlp(compute: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shards: int,
              params: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """`compute(x)` tiled over `shards` chunks of the sequence; `params`: the trainable parameters it uses."""
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3's partitioned weights
        return TiledMLPFunction.apply(compute, x, shards, tuple(params))
    if any(type(p).__name__ == "DTensor" for p in params):  # sharded while it runs: not a case we know
        from dolphin_train.errors import EnvironmentProblem

        raise EnvironmentProblem("tiled_mlp: the MLP's trained weights are sharded tensors (DTensor) while it "
                                 "runs, which the tiled MLP does not support: set tiled_mlp: false")  # fmt: skip
    return TiledMLPFunction.apply(compute, x, shards, (), *params)


def _trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


@cache
def tiled_mlp_class(cls: type) -> type:
    """`cls` (a decoder layer's MLP, possibly already a fused-LoRA subclass) with its forward run tiled."""

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shards = shards_for(x.shape[-2], x.shape[-1], self.tiled_mlp_shards) if x.dim() >= 2 else 1
        if args or kwargs or shards == 1 or not torch.is_grad_enabled():
            return cls.forward(self, x, *args, **kwargs)
        return tiled_mlp(lambda chunk: cls.forward(self, chunk), x, shards, _trainable(self))

    return type("Tiled" + cls.__name__, (cls,), {"forward": forward, "__module__": __name__})


def use_tiled_mlp(model: Any, num_shards: int | None) -> int:
    """Run each decoder layer's MLP (`layer.mlp`) tiled over the sequence; returns how many. `num_shards`:
    chunks per call (None: `shards_for`'s default)."""
    swapped = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        if not type(mlp).__name__.startswith("Tiled"):
            mlp.__class__ = tiled_mlp_class(type(mlp))
        mlp.tiled_mlp_shards = num_shards
        swapped += 1
    if not swapped:
        from dolphin_train.errors import EnvironmentProblem

        raise EnvironmentProblem("tiled_mlp: this model's decoder layers have no `mlp` module to tile: set "
                                 "tiled_mlp: false")  # fmt: skip
    return swapped
