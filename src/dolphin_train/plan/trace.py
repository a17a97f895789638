"""Activation memory, measured by running the model's own forward pass on the meta device.

Why our own code: activation memory depends on the implementation (which tensors each op keeps for the
backward pass, in which dtype, what a frozen weight spares), and any closed formula drifts from it
across architectures and library versions. Meta tensors have shapes and dtypes but no storage, so the
real forward pass runs in milliseconds at the real sequence length; a saved-tensors hook records every
tensor autograd keeps, counted once per storage and never for parameters. Attention runs through a
stand-in that keeps what a flash-attention kernel keeps (q, k, v, output, log-sum-exp), since the plan
is for a GPU run with flash or varlen attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

from dolphin_train.model.layers import decoder_layers

TRACE_ATTENTION = "dolphin_plan_trace"


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes autograd keeps after the forward pass of one micro-batch (decoder only, no output head)."""

    per_layer: tuple[int, ...]  # saved inside each decoder layer
    inputs: tuple[int, ...]  # each layer's input hidden states: what checkpointing keeps of a checkpointed layer
    outside_layers: int  # saved by the embeddings, rotary tables, final norm
    hidden_bytes: int  # one hidden-state tensor (tokens x hidden size) as the head receives it
    attention_backward: int = 0  # working memory of one layer's attention backward pass (flash-attn 2's)
    saved_through_attention: int = 0  # what a layer has saved by the end of its attention block
    mlp_backward: int = 0  # one MLP's backward pass (tiled: one chunk's), beyond what it saved

    @property
    def largest_layer(self) -> int:
        """Saved by the largest single layer (recomputed at once under checkpointing)."""
        return max(self.per_layer, default=0)

    def scaled(self, factor: int) -> ActivationTrace:
        """The same model at `factor` times the rows per micro-batch: every saved tensor has a batch dimension
        (the rotary tables do not, a few kB over-counted)."""
        return ActivationTrace(tuple(b * factor for b in self.per_layer), tuple(b * factor for b in self.inputs),
                               self.outside_layers * factor, self.hidden_bytes * factor,
                               self.attention_backward * factor, self.saved_through_attention * factor,
                               self.mlp_backward * factor)  # fmt: skip

    @property
    def layer_backward(self) -> int:
        """The peak of one decoder layer's backward pass beyond all it saved: the gradient coming in and the
        one going out (two hidden-state tensors), and then either the MLP's working memory (first, with all
        the layer saved still held) or the attention's (later, when what the layer saved after its attention
        block is freed), whichever is larger."""
        after_attention = self.largest_layer - self.saved_through_attention
        return 2 * self.hidden_bytes + max(self.mlp_backward, self.attention_backward - after_attention)

    def checkpointed(self, every_n_layers: int) -> list[bool]:
        """Which layers transformers checkpoints with `every_n_layers` (0: none): layer i when i % n == 0."""
        return [every_n_layers > 0 and i % every_n_layers == 0 for i in range(len(self.per_layer))]

    def saved(self, every_n_layers: int, offload: bool = False) -> int:
        """Kept on the device: a checkpointed layer keeps its input (in CPU memory when offloaded), the others
        all they save."""
        kept = self.outside_layers
        for whole, layer_input, checkpointed in zip(self.per_layer, self.inputs, self.checkpointed(every_n_layers),
                                                     strict=True):  # fmt: skip
            kept += (0 if offload else layer_input) if checkpointed else whole
        return kept


_ATTENTION_BACKWARD: list[int] = []  # per attention call of the trace running


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _FlashLikeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, seq, dim = q.shape
        out = q.new_empty(batch, seq, heads, dim)
        lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        # flash-attn 2's backward: the output's gradient, a float32 accumulator for dq (twice q's bytes in
        # 16 bits), dq, dk and dv expanded to every query head (grouped-query attention), then dk and dv
        _ATTENTION_BACKWARD.append(6 * _bytes(q) + _bytes(k) + _bytes(v))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the trace has no backward pass
        raise NotImplementedError


class _LigerLikeGlu(torch.autograd.Function):
    """What Liger's SwiGLU/GeGLU kernel keeps for its backward pass: the gate and up projections (it recomputes
    the activation and their product)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Any) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the trace has no backward pass
        raise NotImplementedError


def _liger_like_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_LigerLikeGlu.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def use_liger_like_mlps(model: Any) -> int:
    """Give each gated MLP what Liger's MLP kernel keeps, bound on the instance as Liger binds its own forward.
    Returns the MLPs changed."""
    changed = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            mlp.__dict__["forward"] = _liger_like_mlp_forward.__get__(mlp, type(mlp))
            changed += 1
    return changed


class _LigerLikeRmsNorm(torch.autograd.Function):
    """What Liger's RMSNorm keeps for its backward pass: its input, its weight and one float32 reciprocal root
    mean square per token (the model's own RMSNorm keeps a float32 copy of its input and its bf16 output)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the trace has no backward pass
        raise NotImplementedError


def _liger_like_rms_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return _LigerLikeRmsNorm.apply(x, self.weight)


def use_liger_like_rms_norms(model: Any) -> int:
    """Give each RMSNorm with a weight what Liger's RMSNorm keeps, bound on the instance as Liger binds its own
    forward (the gated RMSNorms of linear-attention layers are another kernel). Returns the norms changed."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.__dict__["forward"] = _liger_like_rms_norm_forward.__get__(module, type(module))
            changed += 1
    return changed


def _trace_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    return _FlashLikeAttention.apply(query, key, value), None


def _attention_module(layer: Any) -> Any:
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def register_trace_attention() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    from dolphin_train.model.attention import no_mask

    AttentionInterface.register(TRACE_ATTENTION, _trace_attention)
    AttentionMaskInterface.register(TRACE_ATTENTION, no_mask)
    return TRACE_ATTENTION


class AutocastLike(TorchFunctionMode):
    """torch.autocast for meta tensors (autocast has no meta dispatch): matrix products run in the 16-bit
    dtype, each float32 weight cast once per pass (autocast's weight cache), other ops untouched."""

    _CAST: ClassVar[set[Any]] = {torch.nn.functional.linear, torch.matmul, torch.bmm, torch.mm, torch.addmm,
                                 torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__}  # fmt: skip

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.weight_cache: dict[int, torch.Tensor] = {}

    def _cast(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == self.dtype:
            return value
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            if id(value) not in self.weight_cache:
                self.weight_cache[id(value)] = value.to(self.dtype)
            return self.weight_cache[id(value)]
        return value.to(self.dtype)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._CAST:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _SavedTensorCounter:
    """saved_tensors_hooks pack hook: bytes per storage, attributed to the decoder layer running."""

    def __init__(self, parameter_storages: set[int]) -> None:
        self.parameters = parameter_storages
        self.seen: set[int] = set()
        self.layer: int | None = None
        self.per_layer: dict[int, int] = {}
        self.outside = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.parameters or key in self.seen:
            return tensor
        self.seen.add(key)
        if self.layer is None:
            self.outside += storage.nbytes()
        else:
            self.per_layer[self.layer] = self.per_layer.get(self.layer, 0) + storage.nbytes()
        return tensor


def trace_activations(model: Any, batch: int, seq: int, autocast_dtype: torch.dtype | None) -> ActivationTrace:
    """Run `model`'s decoder (a meta-device causal LM, training mode, gradient checkpointing off) on one
    micro-batch of `batch` x `seq` tokens and count what autograd keeps."""
    decoder = model.get_decoder()
    layers = decoder_layers(decoder)
    counter = _SavedTensorCounter({p.untyped_storage()._cdata for p in model.parameters()})
    inputs: list[int] = []

    def enter(index: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(hidden.untyped_storage().nbytes())
            counter.layer = index

        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        counter.layer = None

    _ATTENTION_BACKWARD.clear()
    through_attention: list[int] = []

    def attention_done(module: Any, args: Any, output: Any) -> None:
        through_attention.append(counter.per_layer.get(counter.layer, 0) if counter.layer is not None else 0)

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    handles += [a.register_forward_hook(attention_done) for a in map(_attention_module, layers) if a is not None]
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # An explicit all-ones mask: without one, transformers inspects the position ids for packed rows,
    # which needs values that meta tensors do not have. The trace attention ignores it.
    mask = torch.ones(batch, seq, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            mode = AutocastLike(autocast_dtype) if autocast_dtype is not None else None
            if mode is not None:
                with mode:
                    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return ActivationTrace(
        per_layer=tuple(counter.per_layer.get(i, 0) for i in range(len(layers))),
        inputs=tuple(inputs),
        outside_layers=counter.outside,
        hidden_bytes=hidden.untyped_storage().nbytes(),
        attention_backward=max(_ATTENTION_BACKWARD, default=0),
        saved_through_attention=max(through_attention, default=0),
        mlp_backward=_mlp_backward(layers, batch, seq, hidden, autocast_dtype),
    )


def _mlp_backward(layers: Any, batch: int, seq: int, hidden: torch.Tensor, autocast_dtype: torch.dtype | None) -> int:
    """Working memory of one MLP's backward pass, on top of what it saved: the gradients of its saved
    intermediates (as large as they are), measured by running the MLP's own (untiled) forward pass; a tiled
    MLP recomputes one chunk at a time (model/tiled_mlp.py), so it has one chunk's intermediates and their
    gradients."""
    from dolphin_train.model.tiled_mlp import shards_for

    mlp = getattr(layers[0], "mlp", None)
    if mlp is None:
        return 0
    tiled = hasattr(mlp, "tiled_mlp_shards")
    shards = shards_for(seq, hidden.shape[-1], mlp.tiled_mlp_shards) if tiled else 1
    x = torch.empty(batch, -(-seq // shards), hidden.shape[-1], dtype=hidden.dtype, device="meta", requires_grad=True)
    counter = _SavedTensorCounter({p.untyped_storage()._cdata for p in mlp.parameters()} | {x.untyped_storage()._cdata})
    compute = type(mlp).__mro__[1].forward if tiled else type(mlp).forward  # a tiled MLP: the class it wraps
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        if autocast_dtype is not None:
            with AutocastLike(autocast_dtype):
                out = compute(mlp, x)
        else:
            out = compute(mlp, x)
    return 2 * counter.outside + _bytes(out) if tiled and shards > 1 else counter.outside
